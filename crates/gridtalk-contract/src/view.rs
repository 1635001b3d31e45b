//! A JSON view of Avro values, and the way back.
//!
//! Routing rules and message templates address event fields by JSON pointer (`/payload/po_number`),
//! so the route stage works on a JSON rendition of the decoded record. Avro unions are transparent
//! in the view (the value of the chosen branch), except the top-level `payload`, whose branch name is
//! exposed as `payload_type`. Decimals become strings with [`MONEY_SCALE`] places, timestamps stay
//! epoch milliseconds.

use std::collections::HashMap;

use apache_avro::types::Value;
use apache_avro::Schema;
use serde_json::{Map, Value as Json};

/// Scale of every decimal in the contract (`Money.amount` is `decimal(18,4)`).
pub const MONEY_SCALE: u32 = 4;

/// Converts a resolved Avro value to JSON (see the module docs for the mapping).
pub fn avro_to_json(value: &Value) -> Json {
    match value {
        Value::Null => Json::Null,
        Value::Boolean(b) => Json::Bool(*b),
        Value::Int(i) | Value::Date(i) | Value::TimeMillis(i) => Json::from(*i),
        Value::Long(l)
        | Value::TimestampMillis(l)
        | Value::TimestampMicros(l)
        | Value::TimeMicros(l)
        | Value::LocalTimestampMillis(l)
        | Value::LocalTimestampMicros(l) => Json::from(*l),
        Value::Float(f) => Json::from(*f as f64),
        Value::Double(d) => Json::from(*d),
        Value::String(s) | Value::Enum(_, s) => Json::String(s.clone()),
        Value::Uuid(u) => Json::String(u.to_string()),
        Value::Bytes(b) | Value::Fixed(_, b) => Json::String(hex_string(b)),
        Value::Decimal(d) => match <Vec<u8>>::try_from(d) {
            Ok(bytes) => Json::String(decimal_string(&bytes, MONEY_SCALE)),
            Err(_) => Json::Null,
        },
        Value::Union(_, inner) => avro_to_json(inner),
        Value::Array(items) => Json::Array(items.iter().map(avro_to_json).collect()),
        Value::Map(items) => Json::Object(
            items
                .iter()
                .map(|(k, v)| (k.clone(), avro_to_json(v)))
                .collect(),
        ),
        Value::Record(fields) => Json::Object(
            fields
                .iter()
                .map(|(k, v)| (k.clone(), avro_to_json(v)))
                .collect(),
        ),
        other => Json::String(format!("{other:?}")),
    }
}

fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Big-endian two's complement unscaled integer of any width to a decimal string with `scale`
/// places. Writers of fixed-width decimals pad with sign bytes (a 20-byte `fixed` holding a
/// small amount is mostly `0x00` or `0xFF`), and a value may even exceed 128 bits: the digits
/// are computed on the bytes themselves, never truncated. No bytes is the value zero.
fn decimal_string(bytes: &[u8], scale: u32) -> String {
    let negative = bytes.first().is_some_and(|b| b & 0x80 != 0);
    // The magnitude, big-endian: for a negative value, invert and add one.
    let mut magnitude: Vec<u8> = if negative {
        let mut m: Vec<u8> = bytes.iter().map(|b| !b).collect();
        for byte in m.iter_mut().rev() {
            let (sum, carry) = byte.overflowing_add(1);
            *byte = sum;
            if !carry {
                break;
            }
        }
        m
    } else {
        bytes.to_vec()
    };
    // Decimal digits by repeated division by ten, least significant first.
    let mut digits = Vec::new();
    while magnitude.iter().any(|b| *b != 0) {
        let mut remainder = 0u32;
        for byte in magnitude.iter_mut() {
            let current = (remainder << 8) | u32::from(*byte);
            *byte = (current / 10) as u8;
            remainder = current % 10;
        }
        digits.push(b'0' + remainder as u8);
        while magnitude.first() == Some(&0) {
            magnitude.remove(0);
        }
    }
    let scale = scale as usize;
    while digits.len() <= scale {
        digits.push(b'0');
    }
    digits.reverse();
    let (whole, fraction) = digits.split_at(digits.len() - scale);
    let sign = if negative { "-" } else { "" };
    let whole = std::str::from_utf8(whole).expect("ascii digits");
    if scale == 0 {
        return format!("{sign}{whole}");
    }
    let fraction = std::str::from_utf8(fraction).expect("ascii digits");
    format!("{sign}{whole}.{fraction}")
}

/// Parses "1250.5" into an unscaled integer with `scale` places.
fn parse_decimal(text: &str, scale: u32) -> Result<i128, String> {
    let text = text.trim();
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    if fraction.len() > scale as usize {
        return Err(format!("{text} has more than {scale} decimal places"));
    }
    let all_digits = |s: &str| s.chars().all(|c| c.is_ascii_digit());
    if whole.is_empty() || !all_digits(whole) || !all_digits(fraction) {
        return Err(format!("{text} is not a decimal number"));
    }
    let mut unscaled: i128 = whole.parse().map_err(|e| format!("{text}: {e}"))?;
    for i in 0..scale as usize {
        let digit = fraction.as_bytes().get(i).map_or(0, |b| (b - b'0') as i128);
        unscaled = unscaled * 10 + digit;
    }
    Ok(if negative { -unscaled } else { unscaled })
}

fn decimal_bytes(unscaled: i128) -> Vec<u8> {
    let bytes = unscaled.to_be_bytes();
    // Minimal two's complement: drop leading bytes that only repeat the sign.
    let mut start = 0;
    while start < 15 {
        let (b, next) = (bytes[start], bytes[start + 1]);
        if (b == 0x00 && next & 0x80 == 0) || (b == 0xFF && next & 0x80 != 0) {
            start += 1;
        } else {
            break;
        }
    }
    bytes[start..].to_vec()
}

fn collect_names<'s>(schema: &'s Schema, names: &mut HashMap<String, &'s Schema>) {
    match schema {
        Schema::Record(r) => {
            names.insert(r.name.fullname(None), schema);
            names.insert(r.name.name.clone(), schema);
            for f in &r.fields {
                collect_names(&f.schema, names);
            }
        }
        Schema::Enum(e) => {
            names.insert(e.name.fullname(None), schema);
            names.insert(e.name.name.clone(), schema);
        }
        Schema::Union(u) => u.variants().iter().for_each(|s| collect_names(s, names)),
        Schema::Array(a) => collect_names(&a.items, names),
        Schema::Map(m) => collect_names(&m.types, names),
        _ => {}
    }
}

/// Builds an Avro value for `schema` from JSON, the inverse of [`avro_to_json`]. A union takes a
/// named branch when the JSON is `{"BranchName": {...}}`, otherwise the first branch that fits.
/// Missing record fields take their schema default. Errors name the path that failed.
pub fn json_to_avro(json: &Json, schema: &Schema) -> Result<Value, String> {
    let mut names = HashMap::new();
    collect_names(schema, &mut names);
    convert(json, schema, &names, "")
}

fn convert(
    json: &Json,
    schema: &Schema,
    names: &HashMap<String, &Schema>,
    path: &str,
) -> Result<Value, String> {
    let mismatch = |what: &str| {
        format!(
            "{}: expected {what}, found {json}",
            if path.is_empty() { "/" } else { path }
        )
    };
    Ok(match schema {
        Schema::Ref { name } => {
            let target = names
                .get(&name.fullname(None))
                .or_else(|| names.get(&name.name))
                .ok_or_else(|| format!("{path}: unknown named type {}", name.fullname(None)))?;
            return convert(json, target, names, path);
        }
        Schema::Null => match json {
            Json::Null => Value::Null,
            _ => return Err(mismatch("null")),
        },
        Schema::Boolean => Value::Boolean(json.as_bool().ok_or_else(|| mismatch("boolean"))?),
        Schema::Int => Value::Int(
            json.as_i64()
                .and_then(|i| i32::try_from(i).ok())
                .ok_or_else(|| mismatch("int"))?,
        ),
        Schema::Long => Value::Long(json.as_i64().ok_or_else(|| mismatch("long"))?),
        Schema::TimestampMillis => Value::TimestampMillis(
            json.as_i64()
                .ok_or_else(|| mismatch("epoch milliseconds"))?,
        ),
        Schema::Float => Value::Float(json.as_f64().ok_or_else(|| mismatch("float"))? as f32),
        Schema::Double => Value::Double(json.as_f64().ok_or_else(|| mismatch("double"))?),
        Schema::String => {
            Value::String(json.as_str().ok_or_else(|| mismatch("string"))?.to_string())
        }
        Schema::Decimal(d) => {
            let text = match json {
                Json::String(s) => s.clone(),
                Json::Number(n) => n.to_string(),
                _ => return Err(mismatch("decimal as string")),
            };
            let unscaled =
                parse_decimal(&text, d.scale as u32).map_err(|e| format!("{path}: {e}"))?;
            Value::Decimal(apache_avro::Decimal::from(decimal_bytes(unscaled)))
        }
        Schema::Enum(e) => {
            let symbol = json.as_str().ok_or_else(|| mismatch("enum symbol"))?;
            let index = e
                .symbols
                .iter()
                .position(|s| s == symbol)
                .ok_or_else(|| format!("{path}: {symbol} is not one of {:?}", e.symbols))?;
            Value::Enum(index as u32, symbol.to_string())
        }
        Schema::Array(a) => Value::Array(
            json.as_array()
                .ok_or_else(|| mismatch("array"))?
                .iter()
                .enumerate()
                .map(|(i, item)| convert(item, &a.items, names, &format!("{path}/{i}")))
                .collect::<Result<_, _>>()?,
        ),
        Schema::Map(m) => Value::Map(
            json.as_object()
                .ok_or_else(|| mismatch("object"))?
                .iter()
                .map(|(k, v)| {
                    Ok((
                        k.clone(),
                        convert(v, &m.types, names, &format!("{path}/{k}"))?,
                    ))
                })
                .collect::<Result<_, String>>()?,
        ),
        Schema::Record(r) => {
            let object = json.as_object().ok_or_else(|| mismatch("object"))?;
            let mut fields = Vec::with_capacity(r.fields.len());
            for field in &r.fields {
                let field_path = format!("{path}/{}", field.name);
                let value = match (object.get(&field.name), &field.default) {
                    (Some(v), _) => convert(v, &field.schema, names, &field_path)?,
                    (None, Some(default)) => convert(default, &field.schema, names, &field_path)?,
                    (None, None) => return Err(format!("{field_path}: required field is missing")),
                };
                fields.push((field.name.clone(), value));
            }
            Value::Record(fields)
        }
        Schema::Union(u) => {
            let variants = u.variants();
            if json.is_null() {
                let index = variants
                    .iter()
                    .position(|s| matches!(s, Schema::Null))
                    .ok_or_else(|| mismatch("non-null value"))?;
                return Ok(Value::Union(index as u32, Box::new(Value::Null)));
            }
            // {"BranchName": {...}} selects a named branch explicitly.
            if let Some((key, inner)) = json
                .as_object()
                .filter(|o| o.len() == 1)
                .and_then(|o| o.iter().next())
            {
                let named = variants.iter().enumerate().find(|(_, s)| {
                    let name = match s {
                        Schema::Ref { name } => Some(name.clone()),
                        other => other.name().cloned(),
                    };
                    name.is_some_and(|n| n.name == *key || n.fullname(None) == *key)
                });
                if let Some((index, branch)) = named {
                    return Ok(Value::Union(
                        index as u32,
                        Box::new(convert(inner, branch, names, path)?),
                    ));
                }
            }
            let mut last_error = mismatch("a value for one of the union's branches");
            for (index, branch) in variants.iter().enumerate() {
                if matches!(branch, Schema::Null) {
                    continue;
                }
                match convert(json, branch, names, path) {
                    Ok(v) => return Ok(Value::Union(index as u32, Box::new(v))),
                    Err(e) => last_error = e,
                }
            }
            return Err(last_error);
        }
        other => {
            return Err(format!(
                "{path}: schema type {other:?} is not used by the contract"
            ))
        }
    })
}

/// The route stage's read-only view of one decoded Trading Grid event.
#[derive(Debug, Clone)]
pub struct EventView {
    /// The whole event as JSON, with `payload_type` added beside `payload`.
    pub json: Json,
}

impl EventView {
    /// Builds the view of a record resolved to the `TradingGridEvent` reader schema.
    pub fn from_resolved(value: &Value, reader: &Schema) -> Self {
        let mut json = avro_to_json(value);
        let payload_type = match (value, reader) {
            (Value::Record(fields), Schema::Record(r)) => fields
                .iter()
                .find(|(n, _)| n == "payload")
                .and_then(|(_, v)| match v {
                    Value::Union(i, _) => Some(*i as usize),
                    _ => None,
                })
                .and_then(|i| {
                    r.fields
                        .iter()
                        .find(|f| f.name == "payload")
                        .and_then(|f| match &f.schema {
                            Schema::Union(u) => u
                                .variants()
                                .get(i)
                                .and_then(|s| s.name())
                                .map(|n| n.name.clone()),
                            _ => None,
                        })
                }),
            _ => None,
        };
        if let (Json::Object(map), Some(t)) = (&mut json, payload_type) {
            map.insert("payload_type".into(), Json::String(t));
        }
        EventView { json }
    }

    pub fn str_at(&self, pointer: &str) -> Option<&str> {
        self.json.pointer(pointer).and_then(Json::as_str)
    }

    pub fn event_id(&self) -> &str {
        self.str_at("/event_id").unwrap_or_default()
    }

    pub fn event_type(&self) -> &str {
        self.str_at("/event_type").unwrap_or_default()
    }

    pub fn payload_type(&self) -> &str {
        self.str_at("/payload_type").unwrap_or_default()
    }

    /// When the event occurred (`occurred_at`, milliseconds since the epoch).
    pub fn occurred_at_ms(&self) -> Option<i64> {
        self.json.get("occurred_at").and_then(Json::as_i64)
    }

    pub fn correlation_id(&self) -> &str {
        self.str_at("/correlation_id").unwrap_or_default()
    }

    pub fn partner_id(&self) -> &str {
        self.str_at("/partner/partner_id").unwrap_or_default()
    }

    pub fn severity(&self) -> &str {
        self.str_at("/severity").unwrap_or("INFO")
    }

    pub fn object(&self) -> Option<&Map<String, Json>> {
        self.json.as_object()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fixed-width writers pad with sign bytes; the amount must survive any width, even one
    /// wider than 128 bits.
    #[test]
    fn decimals_wider_than_sixteen_bytes_keep_their_value() {
        let padded = |unscaled: i128, width: usize| {
            let fill = if unscaled < 0 { 0xFF } else { 0x00 };
            let mut bytes = vec![fill; width - 16];
            bytes.extend_from_slice(&unscaled.to_be_bytes());
            bytes
        };
        assert_eq!(decimal_string(&padded(820_000_000, 20), 4), "82000.0000");
        assert_eq!(decimal_string(&padded(-1_234_567, 20), 4), "-123.4567");
        assert_eq!(decimal_string(&padded(0, 32), 4), "0.0000");
        // 2^128 + 1 (17 bytes, beyond i128), scale 4.
        let mut huge = vec![0x01];
        huge.extend_from_slice(&[0u8; 15]);
        huge.push(0x01);
        assert_eq!(
            decimal_string(&huge, 4),
            "34028236692093846346337460743176821.1457"
        );
        // -(2^128) in 17 bytes.
        let mut negative = vec![0xFF];
        negative.extend_from_slice(&[0u8; 16]);
        assert_eq!(
            decimal_string(&negative, 0),
            "-340282366920938463463374607431768211456"
        );
    }

    #[test]
    fn decimals_round_trip_through_bytes() {
        for text in [
            "0.0000",
            "1250.0000",
            "-17.5000",
            "99999999999999.9999",
            "-0.0001",
        ] {
            let unscaled = parse_decimal(text, 4).unwrap();
            assert_eq!(decimal_string(&decimal_bytes(unscaled), 4), text);
        }
        assert_eq!(parse_decimal("12.5", 4).unwrap(), 125_000);
        assert_eq!(decimal_string(&[], 4), "0.0000");
        assert_eq!(decimal_string(&[0x80], 2), "-1.28");
        assert_eq!(decimal_string(&[0x01, 0x00], 0), "256");
        assert!(parse_decimal("1.23456", 4).is_err());
        assert!(parse_decimal("abc", 4).is_err());
    }
}
