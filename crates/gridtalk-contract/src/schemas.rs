//! The schemas gridtalk owns, embedded at build time from `schemas/`, and the set of writer schemas
//! known by fingerprint for single-object decoding.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use apache_avro::Schema;

use crate::canonical::{legacy_fingerprint, standard_fingerprint};

/// Source text of the contract's schemas, exactly as committed in `schemas/`.
pub const TRADING_GRID_EVENT_AVSC: &str = include_str!("../../../schemas/trading_grid_event.avsc");
pub const OUTBOX_MESSAGE_AVSC: &str = include_str!("../../../schemas/outbox_message.avsc");
pub const SENT_MESSAGE_AVSC: &str = include_str!("../../../schemas/sent_message.avsc");
pub const WORKFLOW_RESPONSE_AVSC: &str = include_str!("../../../schemas/workflow_response.avsc");
pub const AUDIT_RECORD_AVSC: &str = include_str!("../../../schemas/audit_record.avsc");

/// Earlier versions of the contract's schemas (`schemas/previous/`). Each differs from the
/// current one only by what the evolution rules allow (new event types, union branches appended at
/// the end, optional fields with defaults), so a record written with it is still read: as its own
/// writer schema where records are resolved, and under the current schema where the bytes are
/// the same (appending a union branch changes no existing branch's index).
pub const PREVIOUS_TRADING_GRID_EVENT_AVSC: &[&str] = &[include_str!(
    "../../../schemas/previous/trading_grid_event.v1.avsc"
)];
pub const PREVIOUS_WORKFLOW_RESPONSE_AVSC: &[&str] = &[include_str!(
    "../../../schemas/previous/workflow_response.v1.avsc"
)];

/// The parsed reader schemas of the contract. Parsed once per process.
#[derive(Debug)]
pub struct ContractSchemas {
    pub trading_grid_event: Schema,
    pub outbox_message: Schema,
    pub sent_message: Schema,
    pub workflow_response: Schema,
    pub audit_record: Schema,
    /// (standard, legacy) fingerprints of the five schemas above, in that order.
    fingerprints: [(u64, u64); 5],
    /// Earlier versions of the event and response schemas (see [`PREVIOUS_TRADING_GRID_EVENT_AVSC`]).
    pub previous_trading_grid_event: Vec<Schema>,
    /// Fingerprints (standard and legacy) of earlier versions, per schema in the order above.
    previous_fingerprints: [Vec<u64>; 5],
}

impl ContractSchemas {
    /// The contract's schemas. They are compiled into the binary and covered by tests, so a parse
    /// failure here is a build defect, not a runtime condition.
    pub fn get() -> &'static ContractSchemas {
        static SCHEMAS: OnceLock<ContractSchemas> = OnceLock::new();
        SCHEMAS.get_or_init(|| {
            let parse = |text: &str| Schema::parse_str(text).expect("contract schema must parse");
            let mut schemas = ContractSchemas {
                trading_grid_event: parse(TRADING_GRID_EVENT_AVSC),
                outbox_message: parse(OUTBOX_MESSAGE_AVSC),
                sent_message: parse(SENT_MESSAGE_AVSC),
                workflow_response: parse(WORKFLOW_RESPONSE_AVSC),
                audit_record: parse(AUDIT_RECORD_AVSC),
                fingerprints: [(0, 0); 5],
                previous_trading_grid_event: PREVIOUS_TRADING_GRID_EVENT_AVSC
                    .iter()
                    .map(|t| parse(t))
                    .collect(),
                previous_fingerprints: Default::default(),
            };
            let fingerprints = schemas
                .all()
                .map(|s| (standard_fingerprint(s), legacy_fingerprint(s)));
            schemas.fingerprints = fingerprints;
            let both = |texts: &[&str]| -> Vec<u64> {
                texts
                    .iter()
                    .map(|t| parse(t))
                    .flat_map(|s| [standard_fingerprint(&s), legacy_fingerprint(&s)])
                    .collect()
            };
            schemas.previous_fingerprints[0] = both(PREVIOUS_TRADING_GRID_EVENT_AVSC);
            schemas.previous_fingerprints[3] = both(PREVIOUS_WORKFLOW_RESPONSE_AVSC);
            schemas
        })
    }

    fn all(&self) -> [&Schema; 5] {
        [
            &self.trading_grid_event,
            &self.outbox_message,
            &self.sent_message,
            &self.workflow_response,
            &self.audit_record,
        ]
    }

    /// The (standard, legacy) fingerprints of one of the contract's own schemas, computed once.
    fn fingerprints_of(&self, schema: &Schema) -> Option<(u64, u64)> {
        self.all()
            .iter()
            .position(|s| std::ptr::eq(*s, schema))
            .map(|i| self.fingerprints[i])
    }
}

/// Parses a schema from outside (a registry answer, an operator's `.avsc` file). apache-avro
/// 0.21's parser panics on some invalid input (a record named `Out]ox` unwraps a failed name
/// parse, found by fuzzing); here any such panic is an error like any other parse failure.
pub fn parse_schema(schema: &serde_json::Value) -> Result<Schema, String> {
    // Names first: the parser's own check of a name is the unwrap that panics.
    check_names(schema)?;
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Schema::parse(schema)))
        .map_err(|_| {
            "the schema parser failed on this schema (invalid names or structure)".to_string()
        })?
        .map_err(|e| e.to_string())
}

/// Every name the parser would unwrap is a valid Avro (full) name: the `name`, `namespace` and
/// `aliases` of every schema object and field, and every type referenced by name (a `type`,
/// `items` or `values` string, a union's strings). Default values are data and are not read.
fn check_names(schema: &serde_json::Value) -> Result<(), String> {
    use serde_json::Value;
    fn valid(full: &str) -> bool {
        full.split('.').all(|part| {
            let mut chars = part.chars();
            chars
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
    }
    let name = |what: &str, text: &str| {
        if valid(text) {
            Ok(())
        } else {
            Err(format!("{text:?} is not a valid Avro {what}"))
        }
    };
    // A schema in a type position: a name reference, a union, or a schema object.
    fn check_type(schema: &Value) -> Result<(), String> {
        match schema {
            Value::Array(branches) => branches.iter().try_for_each(check_type),
            Value::String(_) | Value::Object(_) => check_names(schema),
            _ => Ok(()),
        }
    }
    match schema {
        Value::String(reference) => name("type name", reference),
        Value::Array(branches) => branches.iter().try_for_each(check_type),
        Value::Object(attributes) => {
            if let Some(text) = attributes.get("name").and_then(Value::as_str) {
                name("name", text)?;
            }
            if let Some(ns) = attributes.get("namespace").and_then(Value::as_str) {
                if !ns.is_empty() {
                    name("namespace", ns)?;
                }
            }
            if let Some(aliases) = attributes.get("aliases").and_then(Value::as_array) {
                for alias in aliases.iter().filter_map(Value::as_str) {
                    name("alias", alias)?;
                }
            }
            for key in ["type", "items", "values"] {
                if let Some(inner) = attributes.get(key) {
                    check_type(inner)?;
                }
            }
            if let Some(fields) = attributes.get("fields").and_then(Value::as_array) {
                fields.iter().try_for_each(check_names)?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// The fingerprint a single-object header carries for `schema`: the specification's
/// ([`standard_fingerprint`]; precomputed for the contract's own schemas).
pub fn single_object_fingerprint(schema: &Schema) -> u64 {
    ContractSchemas::get()
        .fingerprints_of(schema)
        .map(|(standard, _)| standard)
        .unwrap_or_else(|| standard_fingerprint(schema))
}

/// Whether a single-object header's `fingerprint` names `schema`: the specification's
/// fingerprint, or the legacy one gridtalk wrote before (records already in topics).
pub fn names_schema(fingerprint: u64, schema: &Schema) -> bool {
    let (standard, legacy) = ContractSchemas::get()
        .fingerprints_of(schema)
        .unwrap_or_else(|| (standard_fingerprint(schema), legacy_fingerprint(schema)));
    fingerprint == standard
        || fingerprint == legacy
        || ContractSchemas::get()
            .all()
            .iter()
            .position(|s| std::ptr::eq(*s, schema))
            .is_some_and(|i| ContractSchemas::get().previous_fingerprints[i].contains(&fingerprint))
}

/// A writer schema known locally, addressable by its CRC-64-AVRO fingerprint.
#[derive(Debug, Clone)]
pub struct KnownSchema {
    pub name: String,
    pub schema: Arc<Schema>,
    /// The specification's fingerprint (the schema is also found by its legacy one).
    pub fingerprint: u64,
}

/// Writer schemas accepted in single-object encoding: the contract's own schemas plus any `.avsc`
/// files in configured directories (older versions that producers may still write with).
#[derive(Debug, Clone, Default)]
pub struct SchemaSet {
    by_fingerprint: HashMap<u64, KnownSchema>,
}

impl SchemaSet {
    /// The contract's own schemas.
    pub fn contract() -> Self {
        let mut set = SchemaSet::default();
        let schemas = ContractSchemas::get();
        for (name, schema) in [
            ("trading_grid_event", &schemas.trading_grid_event),
            ("outbox_message", &schemas.outbox_message),
            ("sent_message", &schemas.sent_message),
            ("workflow_response", &schemas.workflow_response),
        ] {
            set.insert(name, schema.clone());
        }
        for schema in &schemas.previous_trading_grid_event {
            set.insert("trading_grid_event (previous)", schema.clone());
        }
        set
    }

    /// Adds `schema` under both its fingerprints: the specification's, which standard encoders
    /// (Java, fastavro, …) and gridtalk now write, and the legacy one gridtalk wrote before.
    pub fn insert(&mut self, name: &str, schema: Schema) {
        let fingerprint = standard_fingerprint(&schema);
        let legacy = legacy_fingerprint(&schema);
        let known = KnownSchema {
            name: name.to_string(),
            schema: Arc::new(schema),
            fingerprint,
        };
        self.by_fingerprint.insert(legacy, known.clone());
        self.by_fingerprint.insert(fingerprint, known);
    }

    /// Adds every `.avsc` file in `dir`. Returns every file that failed, not just the first.
    pub fn load_dir(&mut self, dir: &Path) -> Result<usize, Vec<String>> {
        let entries = std::fs::read_dir(dir)
            .map_err(|e| vec![format!("schema directory {}: {e}", dir.display())])?;
        let mut errors = Vec::new();
        let mut loaded = 0;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("avsc") {
                continue;
            }
            match std::fs::read_to_string(&path)
                .map_err(|e| e.to_string())
                .and_then(|text| serde_json::from_str(&text).map_err(|e| e.to_string()))
                .and_then(|json| parse_schema(&json))
            {
                Ok(schema) => {
                    let name = path.file_stem().unwrap_or_default().to_string_lossy();
                    self.insert(&name, schema);
                    loaded += 1;
                }
                Err(e) => errors.push(format!("{}: {e}", path.display())),
            }
        }
        if errors.is_empty() {
            Ok(loaded)
        } else {
            Err(errors)
        }
    }

    pub fn get(&self, fingerprint: u64) -> Option<&KnownSchema> {
        self.by_fingerprint.get(&fingerprint)
    }

    /// Schemas held (each is found by two fingerprints).
    pub fn len(&self) -> usize {
        self.by_fingerprint
            .iter()
            .filter(|(fingerprint, known)| **fingerprint == known.fingerprint)
            .count()
    }

    pub fn is_empty(&self) -> bool {
        self.by_fingerprint.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Found by the `schema_fingerprint` fuzz target (the contract's response schema with a `)`
    /// inserted into an enum's alias): apache-avro 0.21 unwraps the parse of a named type's
    /// aliases, so an invalid alias panics its parser. The names check refuses it before the
    /// parser sees it (and names referenced as types too, which the parser refuses itself).
    #[test]
    fn every_name_the_parser_would_unwrap_is_checked_first() {
        let panicking = [
            json!({"type": "enum", "name": "E", "namespace": "io.gridtalk.v1",
                   "aliases": ["REJE)CT"], "symbols": ["A"]}),
            json!({"type": "record", "name": "R", "aliases": ["Old)R"],
                   "fields": [{"name": "f", "type": "int"}]}),
            json!({"type": "fixed", "name": "F", "aliases": ["a..b"], "size": 2}),
        ];
        for schema in panicking {
            let parsed = std::panic::catch_unwind(|| Schema::parse(&schema));
            assert!(parsed.is_err(), "apache-avro panics on {schema}");
            assert!(check_names(&schema).is_err(), "{schema}");
            assert!(parse_schema(&schema).is_err(), "{schema}");
        }
        for schema in [
            OUTBOX_MESSAGE_AVSC,
            TRADING_GRID_EVENT_AVSC,
            WORKFLOW_RESPONSE_AVSC,
            SENT_MESSAGE_AVSC,
            AUDIT_RECORD_AVSC,
        ] {
            let value: serde_json::Value = serde_json::from_str(schema).expect("JSON");
            check_names(&value).expect("the contract's names are valid");
        }
    }
}
