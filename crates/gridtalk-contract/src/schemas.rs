//! The schemas gridtalk owns, embedded at build time from `schemas/`, and the set of writer schemas
//! known by fingerprint for single-object decoding.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use apache_avro::rabin::Rabin;
use apache_avro::Schema;

/// Source text of the contract's schemas, exactly as committed in `schemas/`.
pub const TRADING_GRID_EVENT_AVSC: &str = include_str!("../../../schemas/trading_grid_event.avsc");
pub const OUTBOX_MESSAGE_AVSC: &str = include_str!("../../../schemas/outbox_message.avsc");
pub const SENT_MESSAGE_AVSC: &str = include_str!("../../../schemas/sent_message.avsc");
pub const WORKFLOW_RESPONSE_AVSC: &str = include_str!("../../../schemas/workflow_response.avsc");
pub const AUDIT_RECORD_AVSC: &str = include_str!("../../../schemas/audit_record.avsc");

/// The parsed reader schemas of the contract. Parsed once per process.
#[derive(Debug)]
pub struct ContractSchemas {
    pub trading_grid_event: Schema,
    pub outbox_message: Schema,
    pub sent_message: Schema,
    pub workflow_response: Schema,
    pub audit_record: Schema,
}

impl ContractSchemas {
    /// The contract's schemas. They are compiled into the binary and covered by tests, so a parse
    /// failure here is a build defect, not a runtime condition.
    pub fn get() -> &'static ContractSchemas {
        static SCHEMAS: OnceLock<ContractSchemas> = OnceLock::new();
        SCHEMAS.get_or_init(|| {
            let parse = |text: &str| Schema::parse_str(text).expect("contract schema must parse");
            ContractSchemas {
                trading_grid_event: parse(TRADING_GRID_EVENT_AVSC),
                outbox_message: parse(OUTBOX_MESSAGE_AVSC),
                sent_message: parse(SENT_MESSAGE_AVSC),
                workflow_response: parse(WORKFLOW_RESPONSE_AVSC),
                audit_record: parse(AUDIT_RECORD_AVSC),
            }
        })
    }
}

/// A writer schema known locally, addressable by its CRC-64-AVRO (Rabin) fingerprint.
#[derive(Debug, Clone)]
pub struct KnownSchema {
    pub name: String,
    pub schema: Arc<Schema>,
    pub fingerprint: u64,
}

/// Writer schemas accepted in single-object encoding: the contract's own schemas plus any `.avsc`
/// files in configured directories (older versions that producers may still write with).
#[derive(Debug, Clone, Default)]
pub struct SchemaSet {
    by_fingerprint: HashMap<u64, KnownSchema>,
}

/// CRC-64-AVRO fingerprint of a schema's parsing canonical form, as used in single-object headers.
pub fn rabin_fingerprint(schema: &Schema) -> u64 {
    let bytes = schema.fingerprint::<Rabin>().bytes;
    let mut le = [0u8; 8];
    le.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(le)
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
        set
    }

    pub fn insert(&mut self, name: &str, schema: Schema) {
        let fingerprint = rabin_fingerprint(&schema);
        self.by_fingerprint.insert(
            fingerprint,
            KnownSchema {
                name: name.to_string(),
                schema: Arc::new(schema),
                fingerprint,
            },
        );
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
                .and_then(|text| Schema::parse_str(&text).map_err(|e| e.to_string()))
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

    pub fn len(&self) -> usize {
        self.by_fingerprint.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_fingerprint.is_empty()
    }
}
