//! The Avro specification's *Parsing Canonical Form* and the CRC-64-AVRO fingerprint over it,
//! which single-object headers carry.
//!
//! Guarantees:
//! - [`parsing_canonical_form`] follows the specification's transformation rules exactly:
//!   PRIMITIVES (a primitive in object form, logical types included, becomes its name), FULLNAMES
//!   (names qualified with the namespace that applies, namespaces dropped), STRIP (only `type`,
//!   `name`, `fields`, `symbols`, `items`, `values` and `size` are kept: no `doc`, `aliases`,
//!   `default`, `order`, `logicalType`, `precision`, `scale` or other properties), ORDER (those
//!   attributes in that order), STRINGS, INTEGERS (`size` as a plain integer) and WHITESPACE.
//!   Java's `SchemaNormalization` and fastavro produce the same text (checked in the tests, against
//!   values they computed, and by `tests/third_party_avro.rs` at test time).
//! - [`standard_fingerprint`] is what any conforming encoder writes in a single-object header.
//!   [`legacy_fingerprint`] is what gridtalk wrote before it followed the specification
//!   (apache-avro 0.21's canonical form keeps logical types and their attributes); it stays
//!   accepted so that records already in topics keep decoding, and is never written any more.

use apache_avro::rabin::Rabin;
use apache_avro::Schema;
use digest::Digest;
use serde_json::Value;

const PRIMITIVES: [&str; 8] = [
    "null", "boolean", "int", "long", "float", "double", "bytes", "string",
];

/// The Parsing Canonical Form of a schema given as JSON (an `.avsc` file, a registry answer).
pub fn parsing_canonical_form(schema: &Value) -> Result<String, String> {
    let mut out = String::with_capacity(256);
    write_canonical(schema, None, &mut out)?;
    Ok(out)
}

/// CRC-64-AVRO of `canonical_form`, as the little-endian `u64` a single-object header holds.
pub fn crc64_avro(canonical_form: &str) -> u64 {
    let digest = Rabin::digest(canonical_form.as_bytes());
    u64::from_le_bytes(digest[..8].try_into().expect("CRC-64 is 8 bytes"))
}

/// The specification's fingerprint of a parsed schema (what standard encoders write).
pub fn standard_fingerprint(schema: &Schema) -> u64 {
    let json = serde_json::to_value(schema).expect("a parsed schema serialises to JSON");
    let form = parsing_canonical_form(&json).expect("a parsed schema has a canonical form");
    crc64_avro(&form)
}

/// The fingerprint gridtalk wrote before it followed the specification: CRC-64-AVRO over
/// apache-avro's own canonical form, which keeps logical types as objects. Only read, never
/// written.
pub fn legacy_fingerprint(schema: &Schema) -> u64 {
    let bytes = schema.fingerprint::<Rabin>().bytes;
    u64::from_le_bytes(bytes[..8].try_into().expect("CRC-64 is 8 bytes"))
}

fn write_canonical(
    schema: &Value,
    namespace: Option<&str>,
    out: &mut String,
) -> Result<(), String> {
    match schema {
        Value::String(name) => {
            if PRIMITIVES.contains(&name.as_str()) {
                write_string(name, out);
            } else {
                write_string(&full_name(name, None, namespace), out);
            }
            Ok(())
        }
        Value::Array(branches) => {
            out.push('[');
            for (i, branch) in branches.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(branch, namespace, out)?;
            }
            out.push(']');
            Ok(())
        }
        Value::Object(attributes) => {
            let kind = attributes
                .get("type")
                .ok_or_else(|| format!("schema object without \"type\": {schema}"))?;
            let Value::String(kind) = kind else {
                // `{"type": {...}}` or `{"type": [...]}`: the attribute is the schema itself.
                return write_canonical(kind, namespace, out);
            };
            match kind.as_str() {
                k if PRIMITIVES.contains(&k) => {
                    write_string(k, out);
                    Ok(())
                }
                "record" | "error" | "enum" | "fixed" => {
                    let name = attributes
                        .get("name")
                        .and_then(Value::as_str)
                        .ok_or_else(|| format!("{kind} without a name: {schema}"))?;
                    let own_namespace = attributes.get("namespace").and_then(Value::as_str);
                    let full = full_name(name, own_namespace, namespace);
                    out.push_str("{\"name\":");
                    write_string(&full, out);
                    out.push_str(",\"type\":");
                    write_string(kind, out);
                    // Names inside a named type are relative to that type's namespace.
                    let inner = full.rsplit_once('.').map(|(ns, _)| ns);
                    match kind.as_str() {
                        "enum" => {
                            out.push_str(",\"symbols\":[");
                            let symbols = attributes
                                .get("symbols")
                                .and_then(Value::as_array)
                                .ok_or_else(|| format!("enum {full} without symbols"))?;
                            for (i, symbol) in symbols.iter().enumerate() {
                                if i > 0 {
                                    out.push(',');
                                }
                                let symbol = symbol
                                    .as_str()
                                    .ok_or_else(|| format!("enum {full}: symbol {symbol}"))?;
                                write_string(symbol, out);
                            }
                            out.push(']');
                        }
                        "fixed" => {
                            let size = attributes
                                .get("size")
                                .and_then(integer)
                                .ok_or_else(|| format!("fixed {full} without an integer size"))?;
                            out.push_str(",\"size\":");
                            out.push_str(&size.to_string());
                        }
                        _ => {
                            out.push_str(",\"fields\":[");
                            let fields = attributes
                                .get("fields")
                                .and_then(Value::as_array)
                                .ok_or_else(|| format!("record {full} without fields"))?;
                            for (i, field) in fields.iter().enumerate() {
                                if i > 0 {
                                    out.push(',');
                                }
                                let field_name =
                                    field.get("name").and_then(Value::as_str).ok_or_else(|| {
                                        format!("record {full}: a field without a name")
                                    })?;
                                let field_type = field.get("type").ok_or_else(|| {
                                    format!("record {full}: field {field_name} without a type")
                                })?;
                                out.push_str("{\"name\":");
                                write_string(field_name, out);
                                out.push_str(",\"type\":");
                                write_canonical(field_type, inner, out)?;
                                out.push('}');
                            }
                            out.push(']');
                        }
                    }
                    out.push('}');
                    Ok(())
                }
                "array" | "map" => {
                    let key = if kind == "array" { "items" } else { "values" };
                    let inner = attributes
                        .get(key)
                        .ok_or_else(|| format!("{kind} without {key}: {schema}"))?;
                    out.push_str(&format!("{{\"type\":\"{kind}\",\"{key}\":"));
                    write_canonical(inner, namespace, out)?;
                    out.push('}');
                    Ok(())
                }
                // `{"type": "SomeRecord"}`: a reference to a named type in object form.
                reference => {
                    write_string(&full_name(reference, None, namespace), out);
                    Ok(())
                }
            }
        }
        other => Err(format!("not a schema: {other}")),
    }
}

/// A name as the specification qualifies it: a dotted name is already full; otherwise the type's
/// own `namespace` applies, else the enclosing one. An empty namespace is the null namespace.
fn full_name(name: &str, own_namespace: Option<&str>, enclosing: Option<&str>) -> String {
    if name.contains('.') {
        return name.to_string();
    }
    match own_namespace.or(enclosing) {
        Some(ns) if !ns.is_empty() => format!("{ns}.{name}"),
        _ => name.to_string(),
    }
}

/// `size` as the INTEGERS rule reads it: a JSON integer, or a string of digits.
fn integer(value: &Value) -> Option<u64> {
    match value {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A JSON string with only the escapes JSON requires (STRINGS: other characters as UTF-8).
fn write_string(text: &str, out: &mut String) {
    out.push_str(&serde_json::to_string(text).expect("a string serialises"));
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn form(schema: Value) -> String {
        parsing_canonical_form(&schema).expect("canonical form")
    }

    #[test]
    fn primitives_in_either_form_and_with_logical_types_become_their_names() {
        assert_eq!(form(json!("long")), "\"long\"");
        assert_eq!(form(json!({"type": "int"})), "\"int\"");
        assert_eq!(
            form(json!({"type": "long", "logicalType": "timestamp-millis"})),
            "\"long\""
        );
        assert_eq!(
            form(json!({"type": "bytes", "logicalType": "decimal", "precision": 18, "scale": 4})),
            "\"bytes\""
        );
        assert_eq!(
            form(json!({"type": "string", "logicalType": "uuid"})),
            "\"string\""
        );
    }

    /// fastavro 1.12.2's `to_parsing_canonical_form` gives the same text for this schema.
    #[test]
    fn names_are_qualified_attributes_stripped_and_ordered() {
        let schema = json!({
            "doc": "an order line",
            "fields": [
                {"type": {"type": "fixed", "size": "12", "name": "Amount", "logicalType": "decimal",
                          "precision": 20, "scale": 2, "aliases": ["Amt"]},
                 "name": "amount", "default": "\u{0}", "order": "descending"},
                {"name": "status", "type": {"symbols": ["OPEN", "SHIPPED"], "name": "Status",
                                            "namespace": "other.ns", "type": "enum", "default": "OPEN"}},
                {"name": "again", "type": "Amount"},
                {"name": "tags", "type": {"type": "map", "values": {"type": "array", "items": "other.ns.Status"}}},
                {"name": "note", "type": ["null", {"type": "string", "avro.java.string": "String"}]}
            ],
            "name": "Line",
            "namespace": "com.example",
            "type": "record",
            "aliases": ["OrderLine"]
        });
        assert_eq!(
            form(schema),
            concat!(
                r#"{"name":"com.example.Line","type":"record","fields":["#,
                r#"{"name":"amount","type":{"name":"com.example.Amount","type":"fixed","size":12}},"#,
                r#"{"name":"status","type":{"name":"other.ns.Status","type":"enum","symbols":["OPEN","SHIPPED"]}},"#,
                r#"{"name":"again","type":"com.example.Amount"},"#,
                r#"{"name":"tags","type":{"type":"map","values":{"type":"array","items":"other.ns.Status"}}},"#,
                r#"{"name":"note","type":["null","string"]}]}"#
            )
        );
    }

    /// fastavro 1.12.2 gives the same text.
    #[test]
    fn a_dotted_name_ignores_the_namespace_and_an_empty_namespace_is_the_null_one() {
        assert_eq!(
            form(
                json!({"type": "record", "name": "a.b.C", "namespace": "x.y", "fields": [
                    {"name": "d", "type": {"type": "enum", "name": "D", "symbols": ["E"]}},
                    {"name": "f", "type": {"type": "fixed", "name": "F", "namespace": "", "size": 1}}
                ]})
            ),
            concat!(
                r#"{"name":"a.b.C","type":"record","fields":["#,
                r#"{"name":"d","type":{"name":"a.b.D","type":"enum","symbols":["E"]}},"#,
                r#"{"name":"f","type":{"name":"F","type":"fixed","size":1}}]}"#
            )
        );
    }

    #[test]
    fn crc64_avro_matches_the_specifications_empty_and_null_values() {
        // The specification's reference implementation: fp("") is the empty value 0xc15d213aa4d7a795.
        assert_eq!(crc64_avro(""), 0xc15d_213a_a4d7_a795);
        // fastavro 1.12.2, `fingerprint('"null"', "CRC-64-AVRO")` = "8a8f25cce724dd63" (the
        // header's little-endian bytes); Java's SchemaNormalization gives 7195948357588979594.
        assert_eq!(crc64_avro("\"null\""), 7_195_948_357_588_979_594);
    }

    /// The specification's fingerprints of the contract's schemas as an independent
    /// implementation computes them from the `.avsc` files: fastavro 1.12.2,
    /// `fingerprint(to_parsing_canonical_form(parse_schema(json.load(f))), "CRC-64-AVRO")`,
    /// which prints the header's eight bytes in hex. And the legacy fingerprints gridtalk wrote
    /// before (apache-avro 0.21's canonical form), which records already in topics carry.
    #[test]
    fn the_contracts_fingerprints_are_pinned_to_an_independent_implementation() {
        let schemas = crate::ContractSchemas::get();
        let hex = |fingerprint: u64| {
            fingerprint
                .to_le_bytes()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        };
        for (schema, standard, legacy) in [
            (&schemas.trading_grid_event, "10aa3c2baf21acb5", LEGACY[0]),
            (&schemas.outbox_message, "95901ce14d234e32", LEGACY[1]),
            (&schemas.sent_message, "edbab0269544d9ca", LEGACY[2]),
            (&schemas.workflow_response, "0e99df054ce85de7", LEGACY[3]),
            (&schemas.audit_record, "48559394e5ff4a6b", LEGACY[4]),
        ] {
            assert_eq!(hex(standard_fingerprint(schema)), standard);
            assert_eq!(hex(crate::single_object_fingerprint(schema)), standard);
            assert!(crate::names_schema(standard_fingerprint(schema), schema));
            assert!(crate::names_schema(legacy_fingerprint(schema), schema));
            // What gridtalk wrote before: the legacy fingerprint of the schema as it was then.
            assert!(crate::names_schema(from_hex(legacy), schema), "{legacy}");
        }
        // The previous versions (`schemas/previous/`), fastavro's fingerprints of those files:
        // records of producers still on them are read.
        let previous = &schemas.previous_trading_grid_event[0];
        assert_eq!(hex(standard_fingerprint(previous)), "26aa5edfb287b4ed");
        assert_eq!(hex(legacy_fingerprint(previous)), LEGACY[0]);
        assert!(crate::names_schema(
            from_hex("26aa5edfb287b4ed"),
            &schemas.trading_grid_event
        ));
        assert!(crate::names_schema(
            from_hex("699663c7ed89f3d3"),
            &schemas.workflow_response
        ));
        assert!(crate::SchemaSet::contract()
            .get(from_hex("26aa5edfb287b4ed"))
            .is_some());
    }

    fn from_hex(text: &str) -> u64 {
        let bytes: Vec<u8> = (0..8)
            .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).expect("hex"))
            .collect();
        u64::from_le_bytes(bytes.try_into().expect("8 bytes"))
    }

    /// What gridtalk wrote before, per schema in the order above (apache-avro 0.21).
    const LEGACY: [&str; 5] = [
        "28c521e9276feaaf",
        "ad0f4c6880563cbd",
        "38bb9ea33f9ff2d2",
        "e3b281650a16bf0e",
        "382dface6fdaab53",
    ];

    /// Found by fuzzing (`schema_fingerprint`): apache-avro's parser panics on this name; the
    /// contract's parser turns that into an error.
    #[test]
    fn a_schema_the_parser_would_panic_on_is_an_error() {
        let schema = json!({"type": "record", "name": "Out]oxMessage", "namespace": "io.gridtalk.v1",
                            "fields": [{"name": "message_id", "type": "string"}]});
        assert!(crate::parse_schema(&schema).is_err());
        assert!(
            parsing_canonical_form(&schema).is_ok(),
            "the canonical form is only text"
        );
    }

    #[test]
    fn not_a_schema_is_an_error_not_a_panic() {
        for bad in [
            json!(1),
            json!({"name": "x"}),
            json!({"type": "record"}),
            json!({"type": "fixed", "name": "F", "size": "many"}),
            json!({"type": "enum", "name": "E", "symbols": [1]}),
        ] {
            assert!(parsing_canonical_form(&bad).is_err(), "{bad}");
        }
    }
}
