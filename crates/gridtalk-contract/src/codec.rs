//! The two Avro wire formats gridtalk reads and writes, and decoding with schema resolution.
//!
//! Decoding happens in two explicit steps so that the dead-letter reason is precise:
//! 1. the bytes are read with the *writer* schema: any failure (truncated, trailing bytes, bad
//!    framing) is [`DecodeErrorKind::Malformed`];
//! 2. the writer-shaped value is resolved against our *reader* schema: any failure (a required field
//!    the writer does not have, a payload type we do not know) is [`DecodeErrorKind::Incompatible`].
//!
//! Union branches of named records are matched by *name*, as the Avro specification says, not by
//! the first branch whose shape happens to fit.

use std::io::Cursor;
use std::sync::Arc;

use apache_avro::schema::UnionSchema;
use apache_avro::types::Value;
use apache_avro::Schema;

use crate::bounded::check_datum;
use crate::registry::{RegistryClient, RegistryError};
use crate::schemas::{single_object_fingerprint, SchemaSet};

/// Confluent framing: magic byte 0, then the schema id as a big-endian u32.
const CONFLUENT_MAGIC: u8 = 0;
/// Avro single-object encoding marker, then the fingerprint as a little-endian u64.
const SINGLE_OBJECT_MARKER: [u8; 2] = [0xC3, 0x01];

/// How a record was framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireFormat {
    Confluent { schema_id: u32 },
    SingleObject { fingerprint: u64 },
}

impl std::fmt::Display for WireFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WireFormat::Confluent { schema_id } => write!(f, "confluent(schema id {schema_id})"),
            WireFormat::SingleObject { fingerprint } => {
                write!(f, "single-object(fingerprint {fingerprint:016x})")
            }
        }
    }
}

/// Which dead-letter reason a decode failure maps to (or that it should be retried).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeErrorKind {
    /// Not Avro in a framing we know, or bytes that do not match their writer schema.
    Malformed,
    /// The framing names a schema we cannot find (unknown fingerprint, id not in the registry).
    UnknownSchema,
    /// The writer schema cannot be resolved to ours: a required field is missing, a type differs.
    Incompatible,
    /// Larger than the configured limit; not even looked at.
    Oversized,
    /// The schema registry is unreachable: not the record's fault, retry later.
    RegistryUnavailable,
}

impl DecodeErrorKind {
    /// The reason code written to the dead-letter headers.
    pub fn reason(self) -> &'static str {
        match self {
            DecodeErrorKind::Malformed => "malformed_avro",
            DecodeErrorKind::UnknownSchema => "unknown_schema",
            DecodeErrorKind::Incompatible => "missing_field",
            DecodeErrorKind::Oversized => "oversized",
            DecodeErrorKind::RegistryUnavailable => "registry_unavailable",
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{}: {detail}", kind.reason())]
pub struct DecodeError {
    pub kind: DecodeErrorKind,
    pub detail: String,
}

impl DecodeError {
    pub(crate) fn new(kind: DecodeErrorKind, detail: impl Into<String>) -> Self {
        DecodeError {
            kind,
            detail: detail.into(),
        }
    }
}

impl From<RegistryError> for DecodeError {
    fn from(e: RegistryError) -> Self {
        let kind = match e {
            RegistryError::NotFound { .. } => DecodeErrorKind::UnknownSchema,
            RegistryError::Invalid { .. } => DecodeErrorKind::UnknownSchema,
            RegistryError::Unavailable(_) | RegistryError::Refused(_) => {
                DecodeErrorKind::RegistryUnavailable
            }
        };
        DecodeError::new(kind, e.to_string())
    }
}

/// A record decoded and resolved to the reader schema.
#[derive(Debug, Clone)]
pub struct Decoded {
    pub value: Value,
    pub format: WireFormat,
}

/// Decodes records of one reader schema from either wire format.
#[derive(Debug, Clone)]
pub struct EventDecoder {
    reader: Schema,
    known: SchemaSet,
    registry: Option<RegistryClient>,
    max_bytes: usize,
}

impl EventDecoder {
    pub fn new(
        reader: Schema,
        known: SchemaSet,
        registry: Option<RegistryClient>,
        max_bytes: usize,
    ) -> Self {
        EventDecoder {
            reader,
            known,
            registry,
            max_bytes,
        }
    }

    pub fn reader_schema(&self) -> &Schema {
        &self.reader
    }

    /// Decodes one record. Errors say which dead-letter reason applies.
    pub async fn decode(&self, bytes: &[u8]) -> Result<Decoded, DecodeError> {
        if bytes.len() > self.max_bytes {
            return Err(DecodeError::new(
                DecodeErrorKind::Oversized,
                format!(
                    "record of {} bytes exceeds the limit of {} bytes",
                    bytes.len(),
                    self.max_bytes
                ),
            ));
        }
        let (format, writer, body): (WireFormat, Arc<Schema>, &[u8]) = match bytes {
            [CONFLUENT_MAGIC, a, b, c, d, body @ ..] => {
                let schema_id = u32::from_be_bytes([*a, *b, *c, *d]);
                let registry = self.registry.as_ref().ok_or_else(|| {
                    DecodeError::new(
                        DecodeErrorKind::UnknownSchema,
                        format!(
                            "Confluent-framed record (schema id {schema_id}) but no schema registry is configured"
                        ),
                    )
                })?;
                let writer = registry.schema(schema_id).await?;
                (WireFormat::Confluent { schema_id }, writer, body)
            }
            [0xC3, 0x01, rest @ ..] if rest.len() >= 8 => {
                let mut fp = [0u8; 8];
                fp.copy_from_slice(&rest[..8]);
                let fingerprint = u64::from_le_bytes(fp);
                let known = self.known.get(fingerprint).ok_or_else(|| {
                    DecodeError::new(
                        DecodeErrorKind::UnknownSchema,
                        format!("no known schema has fingerprint {fingerprint:016x}"),
                    )
                })?;
                (
                    WireFormat::SingleObject { fingerprint },
                    known.schema.clone(),
                    &rest[8..],
                )
            }
            _ => {
                return Err(DecodeError::new(
                    DecodeErrorKind::Malformed,
                    format!(
                        "not a Confluent (0x00) or single-object (0xC3 0x01) Avro record; first bytes {:02x?}",
                        &bytes[..bytes.len().min(4)]
                    ),
                ))
            }
        };
        // The specification resolves a record only against a record (or a union holding one): a
        // writer of another type is a schema this reader cannot read, whatever the bytes.
        if !matches!(*writer, Schema::Record(_) | Schema::Union(_)) {
            return Err(DecodeError::new(
                DecodeErrorKind::UnknownSchema,
                format!(
                    "the writer schema is {}, not a record: it cannot be read as the event",
                    schema_kind(&writer)
                ),
            ));
        }
        let mut value = read_datum(&writer, body)?;
        widen_decimals(&mut value);
        let value = resolve(value, &writer, &self.reader, "payload")?;
        Ok(Decoded { value, format })
    }
}

/// The type of a schema, for error details (`string`, `map`, `fixed Huge`).
fn schema_kind(schema: &Schema) -> String {
    let kind = apache_avro::schema::SchemaKind::from(schema);
    match schema.name() {
        Some(name) => format!("{kind:?} {}", name.fullname(None)).to_lowercase(),
        None => format!("{kind:?}").to_lowercase(),
    }
}

/// Reads one datum of `writer` from bytes that came from outside: the bounded walk first (see
/// [`crate::bounded`]), so `apache-avro` only ever builds values from bytes that hold them.
pub(crate) fn read_datum(writer: &Schema, body: &[u8]) -> Result<Value, DecodeError> {
    check_datum(writer, body).map_err(|detail| {
        DecodeError::new(
            DecodeErrorKind::Malformed,
            format!("bytes do not match the writer schema: {detail}"),
        )
    })?;
    let mut cursor = Cursor::new(body);
    let value = apache_avro::from_avro_datum(writer, &mut cursor, None).map_err(|e| {
        DecodeError::new(
            DecodeErrorKind::Malformed,
            format!("bytes do not match the writer schema: {e}"),
        )
    })?;
    // The walk found the datum's end at the end of the bytes; apache-avro must agree.
    let read = cursor.position() as usize;
    if read != body.len() {
        return Err(DecodeError::new(
            DecodeErrorKind::Malformed,
            format!("the record ends at byte {read} of {}", body.len()),
        ));
    }
    Ok(value)
}

/// Sign-extends every decimal to 16 bytes. Writers such as the Java library emit the minimal two's
/// complement, but `apache-avro`'s resolution insists that the byte length can hold the declared
/// precision; widening keeps the value and satisfies it.
fn widen_decimals(value: &mut Value) {
    match value {
        Value::Decimal(d) => {
            if let Ok(bytes) = <Vec<u8>>::try_from(&*d) {
                if !bytes.is_empty() && bytes.len() < 16 {
                    let fill = if bytes[0] & 0x80 != 0 { 0xFF } else { 0x00 };
                    let mut wide = vec![fill; 16 - bytes.len()];
                    wide.extend_from_slice(&bytes);
                    *d = apache_avro::Decimal::from(wide);
                }
            }
        }
        Value::Union(_, inner) => widen_decimals(inner),
        Value::Array(items) => items.iter_mut().for_each(widen_decimals),
        Value::Map(items) => items.values_mut().for_each(widen_decimals),
        Value::Record(fields) => fields.iter_mut().for_each(|(_, v)| widen_decimals(v)),
        _ => {}
    }
}

fn union_branch_name(union: &UnionSchema, index: usize) -> Option<String> {
    union
        .variants()
        .get(index)
        .and_then(|s| s.name())
        .map(|n| n.fullname(None))
}

fn top_level_union<'a>(schema: &'a Schema, field: &str) -> Option<&'a UnionSchema> {
    match schema {
        Schema::Record(record) => record
            .fields
            .iter()
            .find(|f| f.name == field)
            .and_then(|f| match &f.schema {
                Schema::Union(u) => Some(u),
                _ => None,
            }),
        _ => None,
    }
}

fn record_field<'v>(value: &'v Value, name: &str) -> Option<&'v Value> {
    match value {
        Value::Record(fields) => fields.iter().find(|(n, _)| n == name).map(|(_, v)| v),
        _ => None,
    }
}

/// Resolves a writer-shaped value to the reader schema. The top-level union field `union_field`
/// (the event's `payload`, the response's `body`) is matched by record name.
fn resolve(
    value: Value,
    writer: &Schema,
    reader: &Schema,
    union_field: &str,
) -> Result<Value, DecodeError> {
    let writer_branch = match (
        top_level_union(writer, union_field),
        record_field(&value, union_field),
    ) {
        (Some(union), Some(Value::Union(index, _))) => union_branch_name(union, *index as usize),
        _ => None,
    };
    let reader_union = top_level_union(reader, union_field);
    let reader_branch = |name: &str| {
        reader_union.and_then(|u| {
            u.variants()
                .iter()
                .enumerate()
                .find(|(_, s)| s.name().map(|n| n.fullname(None)).as_deref() == Some(name))
        })
    };
    if let Some(name) = &writer_branch {
        if reader_branch(name).is_none() {
            return Err(DecodeError::new(
                DecodeErrorKind::Incompatible,
                format!("{union_field} type {name} is not part of this gridtalk's contract"),
            ));
        }
    }
    let payload_inner =
        writer_branch
            .as_ref()
            .and_then(|_| match record_field(&value, union_field) {
                Some(Value::Union(_, inner)) => Some((**inner).clone()),
                _ => None,
            });
    let resolved = value.resolve(reader);
    match (resolved, writer_branch, payload_inner) {
        (Ok(resolved), None, _) => Ok(resolved),
        (Ok(mut resolved), Some(name), Some(inner)) => {
            // Re-resolve the payload against the branch of the same name if structural matching
            // picked another one.
            let (index, branch) = reader_branch(&name).expect("checked above");
            if let Value::Record(fields) = &mut resolved {
                if let Some((_, slot)) = fields.iter_mut().find(|(n, _)| n == union_field) {
                    let already = matches!(slot, Value::Union(i, _) if *i as usize == index);
                    if !already {
                        let inner = inner.resolve_schemata(branch, vec![reader]).map_err(|e| {
                            DecodeError::new(
                                DecodeErrorKind::Incompatible,
                                format!("{union_field} {name}: {e}"),
                            )
                        })?;
                        *slot = Value::Union(index as u32, Box::new(inner));
                    }
                }
            }
            Ok(resolved)
        }
        (Err(e), Some(name), Some(inner)) => {
            // Prefer the precise error of the named branch when the payload is at fault.
            let (_, branch) = reader_branch(&name).expect("checked above");
            match inner.resolve_schemata(branch, vec![reader]) {
                Err(pe) => Err(DecodeError::new(
                    DecodeErrorKind::Incompatible,
                    format!("{union_field} {name}: {pe}"),
                )),
                Ok(_) => Err(DecodeError::new(
                    DecodeErrorKind::Incompatible,
                    e.to_string(),
                )),
            }
        }
        (Err(e), _, _) => Err(DecodeError::new(
            DecodeErrorKind::Incompatible,
            e.to_string(),
        )),
        (Ok(_), Some(name), None) => Err(DecodeError::new(
            DecodeErrorKind::Incompatible,
            format!("{union_field} {name} could not be read"),
        )),
    }
}

/// How gridtalk frames a record it publishes for other systems (responses, audit records).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Framing {
    /// Avro single-object encoding: self-describing by fingerprint, needs no registry.
    #[default]
    SingleObject,
    /// The Confluent wire format with the id the registry gave the schema: what
    /// `KafkaAvroDeserializer`, Kafka Connect and `confluent-kafka` read.
    Confluent { schema_id: u32 },
}

impl Framing {
    /// Encodes `value` (already shaped like `schema`) in this framing.
    pub fn encode(self, schema: &Schema, value: Value) -> Result<Vec<u8>, apache_avro::Error> {
        match self {
            Framing::SingleObject => encode_single_object(schema, value),
            Framing::Confluent { schema_id } => encode_confluent(schema, schema_id, value),
        }
    }
}

/// Reads a record gridtalk published, in either framing, resolved to `reader` (the top-level
/// union `union_field`, if any, matched by record name). A single-object record must carry the
/// reader's own fingerprint; a Confluent-framed one is read with the writer schema the registry
/// holds under its id, so records an older or newer gridtalk wrote are resolved, not misread.
pub async fn read_published(
    bytes: &[u8],
    reader: &Schema,
    registry: Option<&RegistryClient>,
    union_field: &str,
) -> Result<Value, DecodeError> {
    match bytes {
        [0xC3, 0x01, rest @ ..] if rest.len() >= 8 => {
            let fingerprint = u64::from_le_bytes(rest[..8].try_into().expect("8 bytes"));
            if !crate::schemas::names_schema(fingerprint, reader) {
                return Err(DecodeError::new(
                    DecodeErrorKind::UnknownSchema,
                    format!(
                        "fingerprint {fingerprint:016x} is not the {} schema",
                        schema_kind(reader)
                    ),
                ));
            }
            read_datum(reader, &rest[8..])
        }
        [CONFLUENT_MAGIC, a, b, c, d, body @ ..] => {
            let schema_id = u32::from_be_bytes([*a, *b, *c, *d]);
            let registry = registry.ok_or_else(|| {
                DecodeError::new(
                    DecodeErrorKind::UnknownSchema,
                    format!("Confluent-framed record (schema id {schema_id}) but no schema registry is configured"),
                )
            })?;
            let writer = registry.schema(schema_id).await?;
            let mut value = read_datum(&writer, body)?;
            widen_decimals(&mut value);
            resolve(value, &writer, reader, union_field)
        }
        _ => Err(DecodeError::new(
            DecodeErrorKind::Malformed,
            "not a Confluent (0x00) or single-object (0xC3 0x01) Avro record",
        )),
    }
}

/// Encodes `value` (already shaped like `schema`) in Avro single-object encoding.
/// `value` must already have the schema's shape (as [`crate::json_to_avro`] builds it).
pub fn encode_single_object(schema: &Schema, value: Value) -> Result<Vec<u8>, apache_avro::Error> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(&SINGLE_OBJECT_MARKER);
    out.extend_from_slice(&single_object_fingerprint(schema).to_le_bytes());
    out.extend_from_slice(&apache_avro::to_avro_datum(schema, value)?);
    Ok(out)
}

/// Encodes `value` in the Confluent Schema Registry framing with `schema_id`.
pub fn encode_confluent(
    schema: &Schema,
    schema_id: u32,
    value: Value,
) -> Result<Vec<u8>, apache_avro::Error> {
    let mut out = Vec::with_capacity(256);
    out.push(CONFLUENT_MAGIC);
    out.extend_from_slice(&schema_id.to_be_bytes());
    out.extend_from_slice(&apache_avro::to_avro_datum(schema, value)?);
    Ok(out)
}
