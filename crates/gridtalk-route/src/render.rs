//! From one event to the messages it causes: rule matching, audience resolution against the
//! directory, and template rendering. Pure functions of (event, config, directory), so they are
//! tested without Kafka; every failure names the dead-letter reason it maps to.

use std::collections::HashSet;

use chrono::{TimeZone, Utc};
use serde_json::Value;
use sha2::{Digest, Sha256};

use gridtalk_config::{Config, ParamConfig, RuleConfig, TemplateConfig};
use gridtalk_contract::payload_type_of;
use gridtalk_contract::{EventView, OutboxMessage};
use gridtalk_kafka::DeadLetterReason;

use gridtalk_directory::{Contact, Directory};

/// Why an event produced no messages and must be dead-lettered.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteFailure {
    pub reason: DeadLetterReason,
    pub detail: String,
}

pub(crate) fn fail(reason: DeadLetterReason, detail: impl Into<String>) -> RouteFailure {
    RouteFailure {
        reason,
        detail: detail.into(),
    }
}

/// The plan for one event: the messages to produce (empty when no rule matched).
#[derive(Debug, Clone, Default)]
pub struct RoutePlan {
    pub messages: Vec<OutboxMessage>,
    pub matched_rules: usize,
}

fn severity_rank(s: &str) -> u8 {
    match s {
        "CRITICAL" => 2,
        "WARNING" => 1,
        _ => 0,
    }
}

pub(crate) fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn rule_matches(rule: &RuleConfig, view: &EventView) -> bool {
    if !rule.event_types.iter().any(|t| t == view.event_type()) {
        return false;
    }
    if !rule.partners.is_empty() && !rule.partners.iter().any(|p| p == view.partner_id()) {
        return false;
    }
    if let Some(min) = &rule.min_severity {
        if severity_rank(view.severity()) < severity_rank(min) {
            return false;
        }
    }
    if let (Some(path), Some(min)) = (&rule.amount_path, rule.min_amount) {
        let amount = view
            .json
            .pointer(path)
            .and_then(scalar_text)
            .and_then(|s| s.parse::<f64>().ok());
        if amount.is_none_or(|a| a < min) {
            return false;
        }
    }
    if let (Some(path), Some(expected)) = (&rule.when_path, &rule.when_equals) {
        if view.json.pointer(path).and_then(scalar_text).as_deref() != Some(expected.as_str()) {
            return false;
        }
    }
    true
}

/// Formats a decimal string for people: thousands separators, two decimals unless more are needed.
fn format_amount(amount: &str) -> String {
    let (negative, digits) = amount
        .strip_prefix('-')
        .map_or((false, amount), |d| (true, d));
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    let mut fraction = fraction.trim_end_matches('0').to_string();
    while fraction.len() < 2 {
        fraction.push('0');
    }
    let mut grouped = String::new();
    for (i, c) in whole.chars().enumerate() {
        if i > 0 && (whole.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(c);
    }
    format!("{}{grouped}.{fraction}", if negative { "-" } else { "" })
}

/// Renders one template parameter from the event.
fn render_param(
    view: &EventView,
    template: &str,
    index: usize,
    p: &ParamConfig,
) -> Result<String, RouteFailure> {
    let value = view.json.pointer(&p.path).filter(|v| !v.is_null());
    let missing = || {
        p.default.clone().ok_or_else(|| {
            fail(
                DeadLetterReason::MissingField,
                format!(
                    "template {template} parameter {{{{{}}}}} needs {} but the event has none",
                    index + 1,
                    p.path
                ),
            )
        })
    };
    let Some(value) = value else { return missing() };
    let wrong = |what: &str| {
        fail(
            DeadLetterReason::MissingField,
            format!(
                "template {template} parameter {{{{{}}}}}: {} is not {what}: {value}",
                index + 1,
                p.path
            ),
        )
    };
    let text = match p.format.as_str() {
        "money" => {
            let amount = value
                .get("amount")
                .and_then(Value::as_str)
                .ok_or_else(|| wrong("money"))?;
            let currency = value.get("currency").and_then(Value::as_str).unwrap_or("");
            format!("{currency} {}", format_amount(amount))
                .trim()
                .to_string()
        }
        "date" | "datetime" => {
            let ms = value.as_i64().ok_or_else(|| wrong("a timestamp"))?;
            let at = Utc
                .timestamp_millis_opt(ms)
                .single()
                .ok_or_else(|| wrong("a valid timestamp"))?;
            if p.format == "date" {
                at.format("%Y-%m-%d").to_string()
            } else {
                at.format("%Y-%m-%d %H:%M UTC").to_string()
            }
        }
        "list" => match value {
            Value::Array(items) => items
                .iter()
                .filter_map(scalar_text)
                .collect::<Vec<_>>()
                .join(", "),
            other => scalar_text(other).ok_or_else(|| wrong("a list"))?,
        },
        "words" => words(&scalar_text(value).ok_or_else(|| wrong("text"))?),
        _ => scalar_text(value).ok_or_else(|| wrong("text"))?,
    };
    if text.trim().is_empty() {
        return missing();
    }
    // Meta rejects body parameters with newlines, tabs or more than four consecutive spaces.
    Ok(text.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// A code as a person reads it: `ASN_SENT` → "ASN sent", `PENDING_PARTNER` → "pending
/// partner". Known abbreviations stay upper case.
fn words(code: &str) -> String {
    const ABBREVIATIONS: &[&str] = &["ASN", "PO", "EDI", "ETA", "ERP", "API", "POD"];
    code.split(['_', '-'])
        .filter(|w| !w.is_empty())
        .map(|w| {
            if ABBREVIATIONS.contains(&w) {
                w.to_string()
            } else {
                w.to_lowercase()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn message_id(event_id: &str, contact_id: &str, template: &str) -> String {
    let digest = Sha256::digest(format!("{event_id}\u{1f}{contact_id}\u{1f}{template}"));
    hex::encode(&digest[..16])
}

/// The recipients an audience names for the event (`what` names it in logs), before opt-in
/// filtering.
pub(crate) fn audience<'d>(
    a: &gridtalk_config::AudienceConfig,
    what: &str,
    view: &EventView,
    directory: &'d Directory,
) -> Vec<&'d Contact> {
    let mut found = Vec::new();
    if !a.partner_roles.is_empty() {
        found.extend(directory.with_roles(Some(view.partner_id()), &a.partner_roles));
    }
    if !a.internal_roles.is_empty() {
        found.extend(directory.with_roles(None, &a.internal_roles));
    }
    if let Some(pointer) = &a.contacts_from {
        if let Some(ids) = view.json.pointer(pointer).and_then(Value::as_array) {
            for id in ids.iter().filter_map(Value::as_str) {
                match directory.contact(id) {
                    Some(c) => found.push(c),
                    None => {
                        tracing::warn!(
                            contact = id,
                            rule = what,
                            "event names a contact the directory does not know"
                        )
                    }
                }
            }
        }
    }
    found
}

/// Whether `contact` of an audience gets `template`: only opted-in contacts, and a group only
/// what asks for no answer (WhatsApp shows no buttons in groups; requests stay one to one).
pub(crate) fn receives(contact: &Contact, template: &TemplateConfig) -> bool {
    contact.opted_in && (!contact.is_group() || template.buttons.is_empty())
}

/// Plans the messages for one event. `button_secret` signs button tokens (templates with buttons
/// need it); `now_ms` stamps `created_at` and starts the buttons' validity.
pub fn plan(
    view: &EventView,
    config: &Config,
    directory: &Directory,
    button_secret: Option<&[u8]>,
    now_ms: i64,
) -> Result<RoutePlan, RouteFailure> {
    let event_type = view.event_type();
    match payload_type_of(event_type) {
        None => {
            return Err(fail(
                DeadLetterReason::UnknownEventType,
                format!("event type {event_type:?} is not part of the contract"),
            ))
        }
        Some(expected) if expected != view.payload_type() => {
            return Err(fail(
                DeadLetterReason::MissingField,
                format!(
                    "event type {event_type} needs a {expected} payload, got {}",
                    view.payload_type()
                ),
            ))
        }
        Some(_) => {}
    }
    if view.event_id().trim().is_empty() {
        return Err(fail(DeadLetterReason::MissingField, "event_id is empty"));
    }
    let max_age_secs = config.route.max_event_age_secs;
    if let Some(occurred_at) = view.occurred_at_ms().filter(|_| max_age_secs > 0) {
        let age_ms = now_ms.saturating_sub(occurred_at);
        if age_ms > (max_age_secs as i64).saturating_mul(1000) {
            return Err(fail(
                DeadLetterReason::Stale,
                format!(
                    "event occurred {} hours ago (occurred_at {occurred_at}), more than route.max_event_age_secs ({max_age_secs} s); not sent",
                    age_ms / 3_600_000
                ),
            ));
        }
    }
    if directory.partner(view.partner_id()).is_none() {
        return Err(fail(
            DeadLetterReason::UnknownPartner,
            format!("partner {:?} is not in the directory", view.partner_id()),
        ));
    }
    let mut plan = RoutePlan::default();
    let mut seen: HashSet<(String, String)> = HashSet::new();
    for rule in config.rules.iter().filter(|r| rule_matches(r, view)) {
        plan.matched_rules += 1;
        let template = config
            .templates
            .iter()
            .find(|t| t.name == rule.template)
            .ok_or_else(|| {
                fail(
                    DeadLetterReason::UnknownTemplate,
                    format!("rule {} names template {}", rule.name, rule.template),
                )
            })?;
        let recipients: Vec<&Contact> = audience(&rule.audience, &rule.name, view, directory)
            .into_iter()
            .filter(|c| receives(c, template))
            .collect();
        if recipients.is_empty() {
            return Err(fail(
                DeadLetterReason::NoRecipient,
                format!("rule {} matched but no opted-in contact has its audience's roles for partner {}", rule.name, view.partner_id()),
            ));
        }
        for contact in recipients {
            if !seen.insert((contact.id.clone(), template.name.clone())) {
                continue;
            }
            plan.messages.push(render(
                view,
                config,
                &rule.name,
                template,
                contact,
                button_secret,
                now_ms,
            )?);
        }
    }
    Ok(plan)
}

/// Renders `template` for one contact: the exact Cloud API request, its signed buttons and a
/// message id derived from the event id, the contact and the template.
pub(crate) fn render(
    view: &EventView,
    config: &Config,
    rule: &str,
    template: &TemplateConfig,
    contact: &Contact,
    button_secret: Option<&[u8]>,
    now_ms: i64,
) -> Result<OutboxMessage, RouteFailure> {
    let address = contact.address().map_err(|e| {
        fail(
            DeadLetterReason::InvalidPhone,
            format!("contact {}: {e}", contact.id),
        )
    })?;
    let to = address.id().to_string();
    let language = contact
        .language
        .as_deref()
        .filter(|l| template.languages.iter().any(|t| t == l))
        .or(template.languages.first().map(String::as_str))
        .unwrap_or(&config.route.default_language)
        .to_string();
    let params = template
        .body
        .iter()
        .enumerate()
        .map(|(i, p)| render_param(view, &template.name, i, p))
        .collect::<Result<Vec<_>, _>>()?;
    let document_key = view
        .json
        .pointer(&template.document_key)
        .and_then(scalar_text)
        .unwrap_or_else(|| view.correlation_id().to_string());
    // Button payloads are signed tokens naming the action and the document; they come back in the
    // reply webhook, where signature and expiry are checked before anything is believed.
    let expires = now_ms / 1000 + (config.route.button_ttl_hours * 3600) as i64;
    let payloads: Vec<String> = template
        .buttons
        .iter()
        .map(|b| {
            let secret = button_secret.ok_or_else(|| {
                fail(
                    DeadLetterReason::UnknownTemplate,
                    format!(
                        "template {} has buttons but no route.button_secret is set",
                        template.name
                    ),
                )
            })?;
            gridtalk_whatsapp::buttons::sign(secret, &b.action, &document_key, expires).map_err(
                |e| {
                    fail(
                        DeadLetterReason::MissingField,
                        format!("button {} of template {}: {e}", b.action, template.name),
                    )
                },
            )
        })
        .collect::<Result<_, _>>()?;
    let mut body =
        gridtalk_whatsapp::template_message(&to, &template.name, &language, &params, &payloads);
    if let gridtalk_directory::Address::Group(_) = address {
        body["recipient_type"] = serde_json::json!("group");
    }
    Ok(OutboxMessage {
        message_id: message_id(view.event_id(), &contact.id, &template.name),
        event_id: view.event_id().to_string(),
        event_type: view.event_type().to_string(),
        correlation_id: view.correlation_id().to_string(),
        document_key,
        partner_id: view.partner_id().to_string(),
        phone_number_id: config.send.phone_number_id.clone(),
        contact_id: contact.id.clone(),
        recipient: to,
        template_name: Some(template.name.clone()),
        language,
        request_json: body.to_string(),
        rule: rule.to_string(),
        created_at: now_ms,
        fallback_request_json: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_rendered_as_words() {
        assert_eq!(words("ASN_SENT"), "ASN sent");
        assert_eq!(words("PENDING_PARTNER"), "pending partner");
        assert_eq!(words("IN_TRANSIT"), "in transit");
        assert_eq!(words("CORRECTION_REQUIRED"), "correction required");
        assert_eq!(words("Already words"), "already words");
    }

    #[test]
    fn amounts_are_formatted_for_people() {
        assert_eq!(format_amount("1250.0000"), "1,250.00");
        assert_eq!(format_amount("1234567.5000"), "1,234,567.50");
        assert_eq!(format_amount("-17.1250"), "-17.125");
        assert_eq!(format_amount("999.0000"), "999.00");
    }
}
