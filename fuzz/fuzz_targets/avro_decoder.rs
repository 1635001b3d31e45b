//! The event decoder and the records of gridtalk's own topics on arbitrary bytes.
//!
//! The first byte picks what the rest is: the body of a datum of one of the writer schemas below
//! (framed here in single-object encoding, so the fuzzer need not guess fingerprints), or a whole
//! record as it would arrive on a topic. Any outcome but a panic, an abort, a stack overflow or an
//! allocation over libFuzzer's limit is fine: the decoder must answer with an error or a value.
#![no_main]

use std::sync::OnceLock;

use apache_avro::Schema;
use gridtalk_contract::{
    single_object_fingerprint, AuditRecord, AvroRecord, ContractSchemas, EventDecoder, OutboxMessage,
    SchemaSet, SentMessage, WorkflowResponse,
};
use libfuzzer_sys::fuzz_target;

/// Writer schemas a producer could register: the contract's event, a linked list, maps of arrays
/// of records, every primitive and logical type, zero-width items.
const WRITERS: &[&str] = &[
    r#"{"type":"record","name":"Node","fields":[{"name":"v","type":"int"},{"name":"next","type":["null","Node"]}]}"#,
    r#"{"type":"record","name":"M","fields":[{"name":"m","type":{"type":"map","values":{"type":"array","items":{"type":"record","name":"V","fields":[{"name":"x","type":"long"},{"name":"s","type":"string"}]}}}}]}"#,
    r#"{"type":"record","name":"P","fields":[
        {"name":"b","type":"boolean"},{"name":"i","type":"int"},{"name":"l","type":"long"},
        {"name":"f","type":"float"},{"name":"d","type":"double"},{"name":"y","type":"bytes"},
        {"name":"s","type":"string"},{"name":"e","type":{"type":"enum","name":"E","symbols":["A","B"]}},
        {"name":"x","type":{"type":"fixed","name":"X","size":4}},
        {"name":"dec","type":{"type":"bytes","logicalType":"decimal","precision":20,"scale":4}},
        {"name":"decf","type":{"type":"fixed","name":"DF","size":20,"logicalType":"decimal","precision":40,"scale":2}},
        {"name":"u","type":{"type":"string","logicalType":"uuid"}},
        {"name":"date","type":{"type":"int","logicalType":"date"}},
        {"name":"ts","type":{"type":"long","logicalType":"timestamp-millis"}},
        {"name":"dur","type":{"type":"fixed","name":"D","size":12,"logicalType":"duration"}},
        {"name":"n","type":{"type":"array","items":"null"}},
        {"name":"nn","type":{"type":"array","items":{"type":"array","items":"null"}}}
    ]}"#,
];

struct Target {
    decoder: EventDecoder,
    /// The single-object header (marker and fingerprint) of each writer schema, computed once.
    headers: Vec<Vec<u8>>,
    runtime: tokio::runtime::Runtime,
}

fn target() -> &'static Target {
    static TARGET: OnceLock<Target> = OnceLock::new();
    TARGET.get_or_init(|| {
        let mut writers = vec![ContractSchemas::get().trading_grid_event.clone()];
        writers.extend(
            WRITERS
                .iter()
                .map(|w| Schema::parse_str(w).expect("writer schema")),
        );
        let mut known = SchemaSet::contract();
        for (i, w) in writers.iter().enumerate() {
            known.insert(&format!("w{i}"), w.clone());
        }
        let headers = writers
            .iter()
            .map(|w| {
                let mut header = vec![0xC3, 0x01];
                header.extend_from_slice(&single_object_fingerprint(w).to_le_bytes());
                header
            })
            .collect();
        Target {
            decoder: EventDecoder::new(
                ContractSchemas::get().trading_grid_event.clone(),
                known,
                None,
                256 * 1024,
            ),
            headers,
            runtime: tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("runtime"),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let target = target();
    let writers = target.headers.len();
    match usize::from(selector) % (writers + 2) {
        i if i < writers => {
            let mut framed = target.headers[i].clone();
            framed.extend_from_slice(rest);
            let _ = target.runtime.block_on(target.decoder.decode(&framed));
        }
        i if i == writers => {
            let _ = target.runtime.block_on(target.decoder.decode(rest));
        }
        _ => {
            let _ = OutboxMessage::from_avro(rest);
            let _ = SentMessage::from_avro(rest);
            let _ = AuditRecord::from_avro(rest);
            let _ = WorkflowResponse::from_avro(rest);
        }
    }
});
