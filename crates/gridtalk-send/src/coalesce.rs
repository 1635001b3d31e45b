//! Coalescing: which outbox messages may be merged into a digest, and the digest's request.
//!
//! Guarantees:
//! - Only informational messages are merged: a template without quick-reply buttons, or a text.
//!   A message with buttons asks for an answer and is never merged (the person must be able to
//!   answer each request on its own message); neither is a reply gridtalk gives to something the
//!   person wrote (`gridtalk.answer.*`), nor anything interactive.
//! - A digest lists each merged message as the text the person would have read (the approved
//!   template's wording in the message's language with its parameters), in outbox order, within
//!   Meta's rules for a template parameter (no new lines or tabs, no more than four spaces in a
//!   row) and a bounded length.
//! - Pure: no I/O, no clock.

use gridtalk_config::{CoalesceConfig, TemplateConfig};
use gridtalk_contract::OutboxMessage;
use serde_json::Value;

/// How long the digest's list of texts may be. Meta refuses template parameters that make the
/// body too long; a 1,024-character body leaves room for the template's own words.
const TEXTS_MAX_CHARS: usize = 900;

/// What coalescing needs from the configuration.
#[derive(Debug, Clone)]
pub(crate) struct Coalescing {
    pub window: std::time::Duration,
    pub max_items: usize,
    template: TemplateConfig,
    templates: Vec<TemplateConfig>,
}

impl Coalescing {
    /// `None` when coalescing is off (`window_ms = 0`) or the digest template is not configured
    /// (the configuration check reports that).
    pub(crate) fn new(config: &CoalesceConfig, templates: &[TemplateConfig]) -> Option<Self> {
        if config.window_ms == 0 {
            return None;
        }
        let template = templates
            .iter()
            .find(|t| t.name == config.template)?
            .clone();
        Some(Coalescing {
            window: std::time::Duration::from_millis(config.window_ms),
            max_items: config.max_items.max(2),
            template,
            templates: templates.to_vec(),
        })
    }

    /// Whether the message only informs (may be merged into a digest).
    pub(crate) fn is_informational(&self, message: &OutboxMessage) -> bool {
        if message.event_type.starts_with("gridtalk.answer.")
            || message.event_type == gridtalk_contract::READ_MARK_EVENT_TYPE
        {
            return false;
        }
        let Ok(request) = serde_json::from_str::<Value>(&message.request_json) else {
            return false;
        };
        match request.get("type").and_then(Value::as_str) {
            Some("text") => true,
            Some("template") => {
                let has_buttons = request
                    .pointer("/template/components")
                    .and_then(Value::as_array)
                    .is_some_and(|components| {
                        components.iter().any(|c| {
                            c.get("type")
                                .and_then(Value::as_str)
                                .is_some_and(|t| t.eq_ignore_ascii_case("button"))
                        })
                    });
                let name = request.pointer("/template/name").and_then(Value::as_str);
                let configured_buttons = name
                    .and_then(|n| self.templates.iter().find(|t| t.name == n))
                    .is_none_or(|t| !t.buttons.is_empty());
                !has_buttons && !configured_buttons && name != Some(self.template.name.as_str())
            }
            _ => false,
        }
    }

    /// The text the person would have read for `message`, on one line.
    pub(crate) fn text_of(&self, message: &OutboxMessage) -> String {
        let request: Value = serde_json::from_str(&message.request_json).unwrap_or(Value::Null);
        let text = match request.get("type").and_then(Value::as_str) {
            Some("text") => request
                .pointer("/text/body")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            _ => self
                .rendered_template(&request)
                .unwrap_or_else(|| format!("{} {}", message.event_type, message.document_key)),
        };
        one_line(&text)
    }

    fn rendered_template(&self, request: &Value) -> Option<String> {
        let name = request.pointer("/template/name")?.as_str()?;
        let language = request
            .pointer("/template/language/code")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let template = self.templates.iter().find(|t| t.name == name)?;
        let mut text = template
            .translations
            .get(language)
            .map_or(&template.text, |t| &t.text)
            .clone();
        let body = request
            .pointer("/template/components")?
            .as_array()?
            .iter()
            .find(|c| {
                c.get("type")
                    .and_then(Value::as_str)
                    .is_some_and(|t| t.eq_ignore_ascii_case("body"))
            })?;
        let parameters = body.get("parameters").and_then(Value::as_array);
        for (i, p) in parameters.into_iter().flatten().enumerate() {
            let value = p.get("text").and_then(Value::as_str).unwrap_or_default();
            text = text.replace(&format!("{{{{{}}}}}", i + 1), value);
        }
        Some(text)
    }

    /// The digest's Cloud API request for `members` (at least two, one recipient), in the first
    /// member's language when the digest template has it.
    pub(crate) fn digest_request(&self, members: &[&OutboxMessage]) -> Value {
        let first = members[0];
        let language = if self.template.languages.contains(&first.language) {
            first.language.clone()
        } else {
            self.template
                .languages
                .first()
                .cloned()
                .unwrap_or_else(|| "en_US".into())
        };
        let texts: Vec<String> = members.iter().map(|m| self.text_of(m)).collect();
        let original = serde_json::from_str::<Value>(&first.request_json).unwrap_or(Value::Null);
        let to = original
            .get("to")
            .and_then(Value::as_str)
            .map_or_else(|| first.recipient.clone(), String::from);
        let mut digest = gridtalk_whatsapp::template_message(
            &to,
            &self.template.name,
            &language,
            &[members.len().to_string(), numbered(&texts)],
            &[],
        );
        // To the same kind of recipient (a person or a group).
        if let Some(kind) = original.get("recipient_type") {
            digest["recipient_type"] = kind.clone();
        }
        digest
    }
}

/// `(1) first (2) second …`, each text shortened so that the whole fits `TEXTS_MAX_CHARS`.
fn numbered(texts: &[String]) -> String {
    let share = (TEXTS_MAX_CHARS / texts.len().max(1)).max(24);
    let mut out = String::new();
    for (i, text) in texts.iter().enumerate() {
        let label = format!("({}) ", i + 1);
        let room = share.saturating_sub(label.len() + 1);
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(&label);
        if text.chars().count() > room {
            out.extend(text.chars().take(room.saturating_sub(1)));
            out.push('…');
        } else {
            out.push_str(text);
        }
    }
    out
}

/// New lines and tabs become spaces and runs of spaces one space: Meta refuses a template
/// parameter with new lines, tabs or more than four spaces in a row.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn coalescing() -> Coalescing {
        let config = gridtalk_config::Config::load(None, Vec::new()).expect("defaults load");
        Coalescing::new(&config.send.coalesce, &config.templates).expect("on by default")
    }

    fn message(event_type: &str, request: Value) -> OutboxMessage {
        OutboxMessage {
            message_id: "m".into(),
            event_id: "e".into(),
            event_type: event_type.into(),
            correlation_id: "c".into(),
            document_key: "SH-1".into(),
            partner_id: "ACME".into(),
            phone_number_id: "1".into(),
            contact_id: "c1".into(),
            recipient: "4915112345678".into(),
            template_name: request
                .pointer("/template/name")
                .and_then(Value::as_str)
                .map(String::from),
            language: "de_DE".into(),
            request_json: request.to_string(),
            rule: "r".into(),
            created_at: 0,
            fallback_request_json: None,
        }
    }

    #[test]
    fn only_messages_without_buttons_are_informational() {
        let c = coalescing();
        let notice = gridtalk_whatsapp::template_message(
            "4915112345678",
            "po_large_order_notice",
            "en_US",
            &["PO-1".into(), "ACME".into(), "EUR 1.00".into()],
            &[],
        );
        assert!(c.is_informational(&message("tg.po.received", notice)));
        let request = gridtalk_whatsapp::template_message(
            "4915112345678",
            "po_ack_request",
            "en_US",
            &[
                "PO-1".into(),
                "B".into(),
                "EUR 1.00".into(),
                "2026-12-01".into(),
            ],
            &["gt1.ACCEPT".into(), "gt1.REJECT".into()],
        );
        assert!(!c.is_informational(&message("tg.po.received", request)));
        let text = gridtalk_whatsapp::text_message("4915112345678", "is recorded");
        assert!(c.is_informational(&message("tg.x", text.clone())));
        assert!(
            !c.is_informational(&message("gridtalk.answer.recorded", text)),
            "a reply to the person is not merged"
        );
    }

    #[test]
    fn a_digest_lists_each_text_in_the_recipients_language_on_one_line() {
        let c = coalescing();
        let texts = [
            gridtalk_whatsapp::text_message("4915112345678", "first\nline\t two"),
            gridtalk_whatsapp::template_message(
                "4915112345678",
                "po_large_order_notice",
                "en_US",
                &["PO-7".into(), "ACME".into(), "EUR 9.00".into()],
                &[],
            ),
        ];
        let members: Vec<OutboxMessage> = texts.into_iter().map(|t| message("tg.x", t)).collect();
        let refs: Vec<&OutboxMessage> = members.iter().collect();
        let digest = c.digest_request(&refs);
        assert_eq!(digest["template"]["name"], "alert_digest");
        assert_eq!(digest["template"]["language"]["code"], "de_DE");
        let params = &digest["template"]["components"][0]["parameters"];
        assert_eq!(params[0]["text"], "2");
        assert_eq!(
            params[1]["text"],
            "(1) first line two (2) Large order PO-7 sent to ACME: EUR 9.00."
        );
    }

    #[test]
    fn a_long_digest_stays_within_bounds_and_on_one_line() {
        let texts: Vec<String> = (0..10)
            .map(|i| format!("{i} {}", "x".repeat(500)))
            .collect();
        let out = numbered(&texts);
        assert!(out.chars().count() <= TEXTS_MAX_CHARS + 10, "{}", out.len());
        assert!(!out.contains('\n') && !out.contains("     "));
        assert!(out.contains("(10) 9"));
    }
}
