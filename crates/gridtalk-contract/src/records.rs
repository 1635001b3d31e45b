//! Typed records of gridtalk's internal topics (outbox, sent log). They are written in Avro
//! single-object encoding with the contract's schemas, so any Avro tool can read them, and read
//! back with resolution so a rolling upgrade between two gridtalk versions keeps working.

use apache_avro::Schema;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::codec::{encode_single_object, DecodeError, DecodeErrorKind};
use crate::schemas::{rabin_fingerprint, ContractSchemas};

/// A serde record with a contract schema.
pub trait AvroRecord: Serialize + DeserializeOwned {
    fn schema() -> &'static Schema;

    /// Single-object encoding of the record.
    fn to_avro(&self) -> Vec<u8> {
        let value = apache_avro::to_value(self).expect("contract record serialises");
        encode_single_object(Self::schema(), value).expect("contract record matches its schema")
    }

    /// Reads a record written by [`AvroRecord::to_avro`].
    fn from_avro(bytes: &[u8]) -> Result<Self, DecodeError> {
        let schema = Self::schema();
        let malformed = |detail: String| DecodeError {
            kind: DecodeErrorKind::Malformed,
            detail,
        };
        let body = match bytes {
            [0xC3, 0x01, rest @ ..] if rest.len() >= 8 => {
                let fingerprint = u64::from_le_bytes(rest[..8].try_into().expect("8 bytes"));
                if fingerprint != rabin_fingerprint(schema) {
                    return Err(DecodeError {
                        kind: DecodeErrorKind::UnknownSchema,
                        detail: format!(
                            "fingerprint {fingerprint:016x} is not the {} schema",
                            std::any::type_name::<Self>()
                        ),
                    });
                }
                &rest[8..]
            }
            _ => return Err(malformed("not an Avro single-object record".into())),
        };
        let mut cursor = std::io::Cursor::new(body);
        let value = apache_avro::from_avro_datum(schema, &mut cursor, None)
            .map_err(|e| malformed(e.to_string()))?;
        apache_avro::from_value(&value).map_err(|e| malformed(e.to_string()))
    }
}

/// A rendered WhatsApp message on the outbox topic (see `schemas/outbox_message.avsc`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboxMessage {
    pub message_id: String,
    pub event_id: String,
    pub event_type: String,
    pub correlation_id: String,
    pub document_key: String,
    pub partner_id: String,
    pub phone_number_id: String,
    pub contact_id: String,
    pub recipient: String,
    pub template_name: Option<String>,
    pub language: String,
    pub request_json: String,
    pub rule: String,
    pub created_at: i64,
}

impl AvroRecord for OutboxMessage {
    fn schema() -> &'static Schema {
        &ContractSchemas::get().outbox_message
    }
}

/// A message WhatsApp accepted, on the sent-log topic (see `schemas/sent_message.avsc`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SentMessage {
    pub wamid: String,
    pub message_id: String,
    pub event_id: String,
    pub event_type: String,
    pub correlation_id: String,
    pub document_key: String,
    pub partner_id: String,
    pub phone_number_id: String,
    pub contact_id: String,
    pub recipient: String,
    pub wa_id: String,
    pub template_name: Option<String>,
    pub message_status: String,
    pub attempts: i32,
    pub accepted_at: i64,
}

impl AvroRecord for SentMessage {
    fn schema() -> &'static Schema {
        &ContractSchemas::get().sent_message
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbox_message_round_trips() {
        let message = OutboxMessage {
            message_id: "m1".into(),
            event_id: "e1".into(),
            event_type: "tg.po.received".into(),
            correlation_id: "c1".into(),
            document_key: "PO-1".into(),
            partner_id: "ACME".into(),
            phone_number_id: "1065".into(),
            contact_id: "acme-orders".into(),
            recipient: "15551234567".into(),
            template_name: Some("po_ack_request".into()),
            language: "en_US".into(),
            request_json: "{}".into(),
            rule: "r".into(),
            created_at: 1_700_000_000_000,
        };
        let bytes = message.to_avro();
        assert_eq!(OutboxMessage::from_avro(&bytes).unwrap(), message);
        assert_eq!(
            SentMessage::from_avro(&bytes).unwrap_err().kind,
            DecodeErrorKind::UnknownSchema
        );
    }
}
