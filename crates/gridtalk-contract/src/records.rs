//! Typed records of gridtalk's own topics (outbox, sent log, responses, audit). They are written in Avro
//! single-object encoding with the contract's schemas, so any Avro tool can read them, and read
//! back with resolution so a rolling upgrade between two gridtalk versions keeps working. The
//! records gridtalk publishes for others (responses, audit) may instead be written in the
//! Confluent wire format ([`Framing`]) and are read back from either ([`decode_published`],
//! [`WorkflowResponse::decode`]).

use apache_avro::Schema;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::codec::{read_datum, read_published, DecodeError, DecodeErrorKind, Framing};
use crate::registry::RegistryClient;
use crate::schemas::{names_schema, ContractSchemas};

/// A serde record with a contract schema.
pub trait AvroRecord: Serialize + DeserializeOwned {
    fn schema() -> &'static Schema;

    /// Single-object encoding of the record.
    fn to_avro(&self) -> Vec<u8> {
        self.encode(Framing::SingleObject)
    }

    /// The record in `framing`.
    fn encode(&self, framing: Framing) -> Vec<u8> {
        let value = apache_avro::to_value(self).expect("contract record serialises");
        framing
            .encode(Self::schema(), value)
            .expect("contract record matches its schema")
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
                if !names_schema(fingerprint, schema) {
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
        let value = read_datum(schema, body)?;
        apache_avro::from_value(&value).map_err(|e| malformed(e.to_string()))
    }
}

/// Reads a record of type `T` gridtalk published in either framing (Confluent-framed ones with the
/// writer schema from `registry`), resolved to `T`'s schema.
pub async fn decode_published<T: AvroRecord>(
    bytes: &[u8],
    registry: Option<&RegistryClient>,
) -> Result<T, DecodeError> {
    let value = read_published(bytes, T::schema(), registry, "").await?;
    apache_avro::from_value(&value).map_err(|e| DecodeError {
        kind: DecodeErrorKind::Malformed,
        detail: e.to_string(),
    })
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
    /// For a free-form message, the approved-template request to send instead when the
    /// recipient's customer-service window is closed (or WhatsApp answers 131047). Not part of
    /// the Avro record: it travels in the outbox record's [`FALLBACK_HEADER`] header, so records
    /// written without it (and readers that ignore it) are unchanged.
    #[serde(skip)]
    pub fallback_request_json: Option<String>,
}

/// The `event_type` of an outbox record that marks a person's message read (with the typing
/// indicator) rather than sending one: its `request_json` is the mark-as-read request.
pub const READ_MARK_EVENT_TYPE: &str = "gridtalk.read";

/// The outbox record header carrying [`OutboxMessage::fallback_request_json`].
pub const FALLBACK_HEADER: &str = "gridtalk.fallback_request_json";

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

/// A refused inbound on the audit topic (see `schemas/audit_record.avsc`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub audit_id: String,
    pub reason: String,
    pub stage: String,
    pub detail: String,
    pub wa_id: Option<String>,
    pub contact_id: Option<String>,
    pub request_id: Option<String>,
    pub action: Option<String>,
    pub correlation_id: Option<String>,
    pub wa_message_id: Option<String>,
    pub at: i64,
}

impl AvroRecord for AuditRecord {
    fn schema() -> &'static Schema {
        &ContractSchemas::get().audit_record
    }
}

/// What came back from WhatsApp, for workflow systems (see `schemas/workflow_response.avsc`).
/// Enumerations travel as their Avro symbols.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkflowResponse {
    pub response_id: String,
    pub response_type: String,
    pub correlation_id: String,
    pub in_reply_to_event_id: Option<String>,
    pub request_id: Option<String>,
    pub contact_id: Option<String>,
    pub partner_id: Option<String>,
    pub wa_message_id: String,
    pub wa_context_message_id: Option<String>,
    pub received_at: i64,
    pub body: ResponseBody,
}

/// The typed body of a [`WorkflowResponse`]: one branch of the schema's union, named as there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ResponseBody {
    PoAckDecision {
        po_number: String,
        decision: String,
        comment: Option<String>,
    },
    ApprovalDecision {
        approval_id: String,
        decision: String,
        comment: Option<String>,
    },
    OnboardingAcknowledgement {
        onboarding_id: String,
        action: String,
        item_code: Option<String>,
        comment: Option<String>,
    },
    CaseMessage {
        case_id: Option<String>,
        text: String,
    },
    CorrectionAnswer {
        document_key: String,
        answer: String,
        new_eta: Option<i64>,
        comment: Option<String>,
    },
    DeliveryStatus {
        status: String,
        error_code: Option<i32>,
        error_title: Option<String>,
    },
    /// `wa.request.overdue`: a reminder policy's step fired (see `schemas/workflow_response.avsc`).
    RequestOverdue {
        request_kind: String,
        policy: String,
        step: i32,
        steps: i32,
        escalation: bool,
        due_at: i64,
        hours_overdue: i32,
        notified_contact_ids: Vec<String>,
        trigger: String,
    },
}

impl WorkflowResponse {
    /// Single-object encoding. The union branch is chosen by name, so two branches with similar
    /// fields can never be confused.
    pub fn to_avro(&self) -> Vec<u8> {
        self.encode(Framing::SingleObject)
    }

    /// The response in `framing`, its union branch chosen by name.
    pub fn encode(&self, framing: Framing) -> Vec<u8> {
        let schema = &ContractSchemas::get().workflow_response;
        let json = serde_json::to_value(self).expect("response serialises");
        let value = crate::view::json_to_avro(&json, schema).expect("response matches its schema");
        framing.encode(schema, value).expect("response encodes")
    }

    /// Reads a response in either framing (Confluent-framed ones with the writer schema from
    /// `registry`), the body's branch resolved by name.
    pub async fn decode(
        bytes: &[u8],
        registry: Option<&RegistryClient>,
    ) -> Result<Self, DecodeError> {
        let schema = &ContractSchemas::get().workflow_response;
        let value = read_published(bytes, schema, registry, "body").await?;
        Self::from_value(value)
    }

    /// Reads a record written by [`WorkflowResponse::to_avro`].
    pub fn from_avro(bytes: &[u8]) -> Result<Self, DecodeError> {
        let schema = &ContractSchemas::get().workflow_response;
        let body = match bytes {
            [0xC3, 0x01, rest @ ..]
                if rest.len() >= 8
                    && names_schema(
                        u64::from_le_bytes(rest[..8].try_into().expect("8 bytes")),
                        schema,
                    ) =>
            {
                &rest[8..]
            }
            _ => {
                return Err(DecodeError {
                    kind: DecodeErrorKind::UnknownSchema,
                    detail: "not a WorkflowResponse single-object record".into(),
                })
            }
        };
        Self::from_value(read_datum(schema, body)?)
    }

    /// The response held in `value`, shaped like the contract's response schema.
    fn from_value(value: apache_avro::types::Value) -> Result<Self, DecodeError> {
        let schema = &ContractSchemas::get().workflow_response;
        let malformed = |detail: String| DecodeError {
            kind: DecodeErrorKind::Malformed,
            detail,
        };
        let apache_avro::types::Value::Record(fields) = value else {
            return Err(malformed("not a record".into()));
        };
        let branches: Vec<String> = match schema {
            Schema::Record(r) => r
                .fields
                .iter()
                .find(|f| f.name == "body")
                .and_then(|f| match &f.schema {
                    Schema::Union(u) => Some(
                        u.variants()
                            .iter()
                            .map(|v| v.name().map(|n| n.name.clone()).unwrap_or_default())
                            .collect(),
                    ),
                    _ => None,
                })
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        let mut json = serde_json::Map::new();
        for (name, field) in fields {
            let converted = match (&*name, &field) {
                ("body", apache_avro::types::Value::Union(index, inner)) => {
                    let branch = branches
                        .get(*index as usize)
                        .cloned()
                        .ok_or_else(|| malformed(format!("body branch {index}")))?;
                    serde_json::json!({ branch: crate::view::avro_to_json(inner) })
                }
                _ => crate::view::avro_to_json(&field),
            };
            json.insert(name, converted);
        }
        serde_json::from_value(serde_json::Value::Object(json))
            .map_err(|e| malformed(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schemas::single_object_fingerprint;

    /// Anyone who can write to the outbox or the sent log can send these; the send and converse
    /// stages must dead-letter them, not allocate what they declare.
    #[test]
    fn hostile_records_on_our_own_topics_are_malformed() {
        let header = |schema: &Schema| {
            let mut bytes = vec![0xC3, 0x01];
            bytes.extend_from_slice(&single_object_fingerprint(schema).to_le_bytes());
            bytes
        };
        // message_id of 2^40 bytes; then one of 500 MB (below apache-avro's own 512 MiB cap).
        for length in [
            [0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x02],
            [0x80, 0xD0, 0xAC, 0xF3, 0x03, 0, 0],
        ] {
            let mut bytes = header(OutboxMessage::schema());
            bytes.extend_from_slice(&length);
            let error = OutboxMessage::from_avro(&bytes).unwrap_err();
            assert_eq!(error.kind, DecodeErrorKind::Malformed, "{}", error.detail);
            let mut bytes = header(SentMessage::schema());
            bytes.extend_from_slice(&length);
            assert_eq!(
                SentMessage::from_avro(&bytes).unwrap_err().kind,
                DecodeErrorKind::Malformed
            );
        }
        let mut bytes = header(&ContractSchemas::get().workflow_response);
        bytes.extend_from_slice(&[0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x02]);
        assert_eq!(
            WorkflowResponse::from_avro(&bytes).unwrap_err().kind,
            DecodeErrorKind::Malformed
        );
    }

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
            fallback_request_json: None,
        };
        let bytes = message.to_avro();
        assert_eq!(OutboxMessage::from_avro(&bytes).unwrap(), message);
        assert_eq!(
            SentMessage::from_avro(&bytes).unwrap_err().kind,
            DecodeErrorKind::UnknownSchema
        );
    }

    #[test]
    fn workflow_responses_round_trip_with_their_branch() {
        let bodies = [
            ResponseBody::ApprovalDecision {
                approval_id: "APR-1".into(),
                decision: "APPROVE".into(),
                comment: None,
            },
            ResponseBody::CorrectionAnswer {
                document_key: "INV-1".into(),
                answer: "NEW_ETA".into(),
                new_eta: Some(1_700_000_000_000),
                comment: Some("Friday".into()),
            },
            ResponseBody::CaseMessage {
                case_id: None,
                text: "Pallet 3 is damaged".into(),
            },
            ResponseBody::DeliveryStatus {
                status: "FAILED".into(),
                error_code: Some(131026),
                error_title: Some("Message undeliverable".into()),
            },
        ];
        for body in bodies {
            let response = WorkflowResponse {
                response_id: "r".into(),
                response_type: "wa.approval.decided".into(),
                correlation_id: "c".into(),
                in_reply_to_event_id: Some("e".into()),
                request_id: Some("APR-1".into()),
                contact_id: None,
                partner_id: Some("ACME".into()),
                wa_message_id: "wamid.X".into(),
                wa_context_message_id: None,
                received_at: 1_700_000_000_000,
                body,
            };
            assert_eq!(
                WorkflowResponse::from_avro(&response.to_avro()).unwrap(),
                response
            );
        }
    }

    #[test]
    fn audit_records_round_trip() {
        let audit = AuditRecord {
            audit_id: "wamid.X:token_expired".into(),
            reason: "token_expired".into(),
            stage: "converse".into(),
            detail: "button token expired".into(),
            wa_id: Some("14155550101".into()),
            contact_id: None,
            request_id: None,
            action: None,
            correlation_id: None,
            wa_message_id: Some("wamid.X".into()),
            at: 1,
        };
        assert_eq!(AuditRecord::from_avro(&audit.to_avro()).unwrap(), audit);
    }
}
