//! Splitting a verified webhook body into items: one per message, status, error or other change,
//! so that a batched delivery loses nothing and each item can be keyed by its contact.

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// One thing Meta told us, as published on the webhook topic (JSON value, key `contact`).
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookItem {
    /// `message`, `status`, `error`, `other` (a change of another field) or `unparsed`.
    pub kind: String,
    /// Stable id for dropping redeliveries: the message wamid, `wamid:status` for a status, or a
    /// hash of the item for the rest.
    pub item_id: String,
    /// WhatsApp id of the contact (sender of a message, recipient of a status); the business
    /// phone-number id for items about no contact.
    pub contact: String,
    pub phone_number_id: Option<String>,
    /// The contact's profile name, when Meta sent it.
    pub profile_name: Option<String>,
    pub received_at_ms: i64,
    /// The item exactly as Meta sent it.
    pub item: Value,
}

fn digest(value: &[u8]) -> String {
    hex::encode(&Sha256::digest(value)[..12])
}

impl WebhookItem {
    /// A signed body that is not a WhatsApp payload, kept whole.
    pub fn unparsed(body: &[u8], received_at_ms: i64, detail: &str) -> Self {
        WebhookItem {
            kind: "unparsed".into(),
            item_id: format!("unparsed:{}", digest(body)),
            contact: "unknown".into(),
            phone_number_id: None,
            profile_name: None,
            received_at_ms,
            item: json!({"body": String::from_utf8_lossy(body), "error": detail}),
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        json!({
            "kind": self.kind,
            "item_id": self.item_id,
            "contact": self.contact,
            "phone_number_id": self.phone_number_id,
            "profile_name": self.profile_name,
            "received_at_ms": self.received_at_ms,
            "item": self.item,
        })
        .to_string()
        .into_bytes()
    }
}

/// Splits a WhatsApp Business Account webhook body into its items.
pub fn split(body: &[u8], received_at_ms: i64) -> Result<Vec<WebhookItem>, String> {
    let payload: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    if payload.get("object").and_then(Value::as_str) != Some("whatsapp_business_account") {
        return Err("object is not whatsapp_business_account".into());
    }
    let entries = payload
        .get("entry")
        .and_then(Value::as_array)
        .ok_or("no entry array")?;
    let mut items = Vec::new();
    for entry in entries {
        let changes = entry
            .get("changes")
            .and_then(Value::as_array)
            .ok_or("entry without changes")?;
        for change in changes {
            let value = change.get("value").cloned().unwrap_or(Value::Null);
            let phone_number_id = value
                .pointer("/metadata/phone_number_id")
                .and_then(Value::as_str)
                .map(String::from);
            let fallback_contact = phone_number_id.clone().unwrap_or_else(|| "unknown".into());
            let field = change.get("field").and_then(Value::as_str).unwrap_or("");
            if field != "messages" {
                items.push(WebhookItem {
                    kind: "other".into(),
                    item_id: format!("other:{}", digest(change.to_string().as_bytes())),
                    contact: fallback_contact,
                    phone_number_id,
                    profile_name: None,
                    received_at_ms,
                    item: change.clone(),
                });
                continue;
            }
            let profile = |wa_id: &str| {
                value
                    .get("contacts")
                    .and_then(Value::as_array)
                    .and_then(|contacts| {
                        contacts
                            .iter()
                            .find(|c| c.get("wa_id").and_then(Value::as_str) == Some(wa_id))
                            .and_then(|c| c.pointer("/profile/name"))
                            .and_then(Value::as_str)
                            .map(String::from)
                    })
            };
            for message in value
                .get("messages")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let from = message
                    .get("from")
                    .and_then(Value::as_str)
                    .ok_or("message without from")?;
                let id = message
                    .get("id")
                    .and_then(Value::as_str)
                    .ok_or("message without id")?;
                items.push(WebhookItem {
                    kind: "message".into(),
                    item_id: id.to_string(),
                    contact: from.to_string(),
                    phone_number_id: phone_number_id.clone(),
                    profile_name: profile(from),
                    received_at_ms,
                    item: message.clone(),
                });
            }
            for status in value
                .get("statuses")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let id = status
                    .get("id")
                    .and_then(Value::as_str)
                    .ok_or("status without id")?;
                let state = status
                    .get("status")
                    .and_then(Value::as_str)
                    .ok_or("status without status")?;
                let recipient = status
                    .get("recipient_id")
                    .and_then(Value::as_str)
                    .ok_or("status without recipient_id")?;
                items.push(WebhookItem {
                    kind: "status".into(),
                    item_id: format!("{id}:{state}"),
                    contact: recipient.to_string(),
                    phone_number_id: phone_number_id.clone(),
                    profile_name: None,
                    received_at_ms,
                    item: status.clone(),
                });
            }
            for error in value
                .get("errors")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                items.push(WebhookItem {
                    kind: "error".into(),
                    item_id: format!("error:{}", digest(error.to_string().as_bytes())),
                    contact: fallback_contact.clone(),
                    phone_number_id: phone_number_id.clone(),
                    profile_name: None,
                    received_at_ms,
                    item: error.clone(),
                });
            }
        }
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batched_delivery_is_split_into_every_item() {
        let body = json!({
            "object": "whatsapp_business_account",
            "entry": [
                {"id": "WABA", "changes": [{"field": "messages", "value": {
                    "messaging_product": "whatsapp",
                    "metadata": {"display_phone_number": "15550783881", "phone_number_id": "106540352242922"},
                    "contacts": [{"profile": {"name": "Maria"}, "wa_id": "14155550101"}],
                    "messages": [
                        {"from": "14155550101", "id": "wamid.IN1", "timestamp": "1795514400", "type": "text", "text": {"body": "ok"}},
                        {"from": "14155550102", "id": "wamid.IN2", "timestamp": "1795514401", "type": "button",
                         "button": {"payload": "APPROVE", "text": "Approve"}, "context": {"id": "wamid.OUT1"}}
                    ],
                    "statuses": [{"id": "wamid.OUT1", "status": "read", "timestamp": "1795514402", "recipient_id": "14155550101"}]
                }}]},
                {"id": "WABA", "changes": [
                    {"field": "messages", "value": {"metadata": {"phone_number_id": "106540352242922"},
                        "statuses": [{"id": "wamid.OUT2", "status": "failed", "timestamp": "1795514403", "recipient_id": "14155550103",
                                      "errors": [{"code": 131026}]}]}},
                    {"field": "account_update", "value": {"event": "VERIFIED_ACCOUNT"}}
                ]}
            ]
        });
        let items = split(body.to_string().as_bytes(), 1).expect("splits");
        let summary: Vec<(&str, &str, &str)> = items
            .iter()
            .map(|i| (i.kind.as_str(), i.item_id.as_str(), i.contact.as_str()))
            .collect();
        assert_eq!(
            summary[..4],
            [
                ("message", "wamid.IN1", "14155550101"),
                ("message", "wamid.IN2", "14155550102"),
                ("status", "wamid.OUT1:read", "14155550101"),
                ("status", "wamid.OUT2:failed", "14155550103"),
            ]
        );
        assert_eq!(items[4].kind, "other");
        assert_eq!(items.len(), 5);
        assert_eq!(items[0].profile_name.as_deref(), Some("Maria"));
        assert_eq!(items[1].profile_name, None);
    }

    #[test]
    fn non_whatsapp_bodies_are_errors() {
        assert!(split(b"not json", 1).is_err());
        assert!(split(br#"{"object": "page", "entry": []}"#, 1).is_err());
        assert!(split(br#"{"object": "whatsapp_business_account"}"#, 1).is_err());
    }
}
