//! gridtalk's event contract: the Avro schemas in `schemas/`, the two wire formats they travel in, and
//! a JSON view of decoded events that the routing and rendering code reads.
//!
//! Guarantees:
//! - Every record a stage decodes is resolved against *our* reader schema, so a producer may write
//!   with an older or newer compatible schema (an added optional field, a removed defaulted one) and
//!   gridtalk still reads it. Anything that cannot be resolved is an error with a [`DecodeErrorKind`]
//!   that says which dead-letter reason applies; nothing is silently skipped.
//! - Both wire formats are accepted on every input topic: the Confluent Schema Registry framing
//!   (magic byte 0, 4-byte schema id) and Avro single-object encoding (`C3 01` + the CRC-64-AVRO
//!   fingerprint of the schema's Parsing Canonical Form, exactly as the specification defines it;
//!   the fingerprint gridtalk wrote before is still read). Writer schemas fetched from a registry are cached by id for the process lifetime
//!   (schema ids are immutable in a registry).
//! - Bytes from outside never reach `apache-avro` unchecked: a bounded walk first proves that every
//!   length and count fits in the record and that values nest at most [`MAX_DEPTH`] deep, so what
//!   decoding allocates is bounded by the record's own size and no record can crash the process.

mod bounded;
mod canonical;
mod codec;
mod dead_letter;
mod event_types;
mod pointers;
mod records;
mod registry;
pub mod samples;
mod schemas;
mod view;
pub mod webhook_body;
mod webhook_item;

pub use bounded::{check_datum, MAX_DEPTH};
pub use canonical::{crc64_avro, legacy_fingerprint, parsing_canonical_form, standard_fingerprint};
pub use codec::{
    encode_confluent, encode_single_object, read_published, DecodeError, DecodeErrorKind, Decoded,
    EventDecoder, Framing, WireFormat,
};
pub use dead_letter::DeadLetterReason;
pub use event_types::{flow_label_of, payload_type_of, request_kind_of, EVENT_TYPES};
pub use pointers::check_pointer;
pub use records::{
    decode_published, AuditRecord, AvroRecord, OutboxMessage, ResponseBody, SentMessage,
    WorkflowResponse, FALLBACK_HEADER, READ_MARK_EVENT_TYPE,
};
pub use registry::{Compatibility, RegistryClient, RegistryError};
pub use schemas::{
    names_schema, parse_schema, single_object_fingerprint, ContractSchemas, KnownSchema, SchemaSet,
    AUDIT_RECORD_AVSC, TRADING_GRID_EVENT_AVSC, WORKFLOW_RESPONSE_AVSC,
};
pub use view::{avro_to_json, json_to_avro, EventView, MONEY_SCALE};
pub use webhook_item::WebhookItem;
