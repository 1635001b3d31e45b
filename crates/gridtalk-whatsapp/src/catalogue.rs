//! The business account's template catalogue (`GET /{waba-id}/message_templates`) and its
//! comparison with the configured templates: every configured template must exist in each of
//! its languages, be `APPROVED`, have the configured category, as many body parameters as the
//! configuration fills, and quick-reply buttons where the configuration puts button payloads.
//! Every mismatch is reported at once, so one run shows all the drift.

use std::time::Duration;

use gridtalk_config::{Secret, TemplateConfig};
use serde::Deserialize;
use serde_json::Value;

use crate::{success_body, SendError};

/// One template in one language, as Meta lists it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct CatalogueTemplate {
    pub name: String,
    pub language: String,
    /// `APPROVED`, `PENDING`, `REJECTED`, `PAUSED`, `DISABLED`, …
    pub status: String,
    pub category: String,
    #[serde(default)]
    pub components: Vec<Value>,
}

#[derive(Deserialize)]
struct Page {
    #[serde(default)]
    data: Vec<CatalogueTemplate>,
    #[serde(default)]
    paging: Option<Paging>,
}

#[derive(Deserialize)]
struct Paging {
    #[serde(default)]
    next: Option<String>,
}

/// Pages are followed up to this many (at 100 templates a page, far more than any account has).
const MAX_PAGES: usize = 100;

/// Every template of business account `waba_id`, following Meta's `paging.next` links.
pub async fn fetch_catalogue(
    base_url: &str,
    api_version: &str,
    waba_id: &str,
    token: &Secret,
    timeout: Duration,
) -> Result<Vec<CatalogueTemplate>, SendError> {
    let http = reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .expect("HTTP client with static settings");
    let mut url = format!(
        "{}/{api_version}/{waba_id}/message_templates?limit=100&fields=name,language,status,category,components",
        base_url.trim_end_matches('/')
    );
    let mut templates = Vec::new();
    for _ in 0..MAX_PAGES {
        let response = http
            .get(&url)
            .bearer_auth(token.expose())
            .send()
            .await
            .map_err(|e| SendError::Transport(e.to_string()))?;
        let bytes = success_body(response).await?;
        let page: Page = serde_json::from_slice(&bytes)
            .map_err(|e| SendError::Transport(format!("unreadable template list: {e}")))?;
        templates.extend(page.data);
        match page.paging.and_then(|p| p.next) {
            Some(next) => url = next,
            None => return Ok(templates),
        }
    }
    Err(SendError::Transport(format!(
        "the template list has more than {MAX_PAGES} pages"
    )))
}

/// Every way the configured templates differ from the catalogue, one line each.
pub fn mismatches(configured: &[TemplateConfig], catalogue: &[CatalogueTemplate]) -> Vec<String> {
    let mut found = Vec::new();
    for template in configured {
        for language in &template.languages {
            let Some(listed) = catalogue
                .iter()
                .find(|t| t.name == template.name && &t.language == language)
            else {
                found.push(format!(
                    "{} ({language}): not in the business account's templates",
                    template.name
                ));
                continue;
            };
            let what = format!("{} ({language})", template.name);
            if !listed.status.eq_ignore_ascii_case("APPROVED") {
                found.push(format!(
                    "{what}: status {} at Meta, not APPROVED: its messages are refused",
                    listed.status
                ));
            }
            if !listed.category.eq_ignore_ascii_case(&template.category) {
                found.push(format!(
                    "{what}: category {} at Meta, {} configured",
                    listed.category,
                    template.category.to_ascii_uppercase()
                ));
            }
            let body_parameters = listed
                .components
                .iter()
                .find(|c| kind_of(c).eq_ignore_ascii_case("BODY"))
                .and_then(|c| c.get("text").and_then(Value::as_str))
                .map_or(0, placeholders);
            if body_parameters != template.body.len() {
                found.push(format!(
                    "{what}: {body_parameters} body parameters at Meta, {} configured",
                    template.body.len()
                ));
            }
            let buttons: Vec<String> = listed
                .components
                .iter()
                .filter(|c| kind_of(c).eq_ignore_ascii_case("BUTTONS"))
                .flat_map(|c| {
                    c.get("buttons")
                        .and_then(Value::as_array)
                        .cloned()
                        .unwrap_or_default()
                })
                .map(|b| kind_of(&b).to_ascii_uppercase())
                .collect();
            if buttons.len() < template.buttons.len() {
                found.push(format!(
                    "{what}: {} buttons at Meta, {} quick replies configured",
                    buttons.len(),
                    template.buttons.len()
                ));
            }
            for (i, kind) in buttons.iter().take(template.buttons.len()).enumerate() {
                if kind != "QUICK_REPLY" {
                    found.push(format!(
                        "{what}: button {} is {kind} at Meta, a quick reply configured",
                        i + 1
                    ));
                }
            }
            let quick_replies = buttons.iter().filter(|b| *b == "QUICK_REPLY").count();
            if quick_replies > template.buttons.len() {
                found.push(format!(
                    "{what}: {quick_replies} quick replies at Meta, {} configured (a payload is required for each)",
                    template.buttons.len()
                ));
            }
        }
    }
    found
}

fn kind_of(component: &Value) -> &str {
    component.get("type").and_then(Value::as_str).unwrap_or("")
}

/// The number of distinct positional placeholders (`{{1}}`, `{{2}}`, …) in a template text.
fn placeholders(text: &str) -> usize {
    let mut seen = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        match after.find("}}") {
            Some(end) => {
                if let Ok(n) = after[..end].trim().parse::<u32>() {
                    seen.insert(n);
                }
                rest = &after[end + 2..];
            }
            None => break,
        }
    }
    seen.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_counted_once_each() {
        assert_eq!(placeholders("PO {{1}} from {{2}}: {{1}} again"), 2);
        assert_eq!(placeholders("no parameters"), 0);
        assert_eq!(placeholders("broken {{1"), 0);
    }
}
