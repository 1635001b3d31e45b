//! The webhook item: one thing Meta told gridtalk, as the ingest stage publishes it on the webhook
//! topic (a JSON value keyed by the contact's WhatsApp id) and the converse stage reads it. It
//! lives in the contract because it travels on a topic between two stages.

use serde_json::{json, Value};

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

impl WebhookItem {
    /// Reads an item as [`WebhookItem::to_json`] wrote it.
    pub fn from_json(bytes: &[u8]) -> Result<Self, String> {
        let v: Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
        // Empty is missing: an empty item id would be a redelivery of every other one.
        let field = |key: &str| {
            v.get(key)
                .and_then(Value::as_str)
                .filter(|s| !s.trim().is_empty())
                .map(String::from)
                .ok_or_else(|| format!("webhook item without {key}"))
        };
        let optional = |key: &str| v.get(key).and_then(Value::as_str).map(String::from);
        Ok(WebhookItem {
            kind: field("kind")?,
            item_id: field("item_id")?,
            contact: field("contact")?,
            phone_number_id: optional("phone_number_id"),
            profile_name: optional("profile_name"),
            received_at_ms: v
                .get("received_at_ms")
                .and_then(Value::as_i64)
                .ok_or("webhook item without received_at_ms")?,
            item: v.get("item").cloned().unwrap_or(Value::Null),
        })
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
