//! gridtalk against an Avro implementation it shares no code with: fastavro (installed by
//! `scripts/install-test-tools`, run through `tests/third_party/fastavro_encode.py`).
//!
//! - Its Parsing Canonical Form and CRC-64-AVRO fingerprint of every committed schema equal
//!   gridtalk's.
//! - Events it encodes, in Avro single-object encoding (with its own fingerprint) and in the
//!   Confluent framing, published to the real broker, route exactly as gridtalk's own encoding
//!   of the same events does: every expected message arrives, nothing is dead-lettered.

mod support;
#[path = "third_party/mod.rs"]
mod third_party;

use std::time::Duration;

use serde_json::json;

use gridtalk_contract::samples::EVENT_TYPES;
use gridtalk_contract::{
    parsing_canonical_form, standard_fingerprint, ContractSchemas, TRADING_GRID_EVENT_AVSC,
};
use support::*;
use third_party::repo_file;

const WAIT: Duration = Duration::from_secs(90);
const SCHEMA_ID: u32 = 41;

fn fastavro(args: &[&std::ffi::OsStr]) -> String {
    third_party::run("fastavro_encode.py", args)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex"))
        .collect()
}

#[test]
fn fastavro_and_gridtalk_agree_on_every_schemas_canonical_form_and_fingerprint() {
    let schemas = ContractSchemas::get();
    for (file, parsed) in [
        (
            "schemas/trading_grid_event.avsc",
            &schemas.trading_grid_event,
        ),
        ("schemas/outbox_message.avsc", &schemas.outbox_message),
        ("schemas/sent_message.avsc", &schemas.sent_message),
        ("schemas/workflow_response.avsc", &schemas.workflow_response),
        ("schemas/audit_record.avsc", &schemas.audit_record),
    ] {
        let path = repo_file(file);
        let answer = fastavro(&["--fingerprint".as_ref(), path.as_os_str()]);
        let (their_form, their_fingerprint) =
            answer.trim_end().split_once('\t').expect("two columns");
        // From the file's text and from the parsed schema: both must be the specification's form.
        let text = std::fs::read_to_string(&path).expect("schema file");
        let ours = parsing_canonical_form(&serde_json::from_str(&text).expect("json"))
            .expect("canonical form");
        assert_eq!(ours, their_form, "{file}: canonical form from the text");
        let from_parsed = parsing_canonical_form(&serde_json::to_value(parsed).expect("json"))
            .expect("canonical form");
        assert_eq!(
            from_parsed, their_form,
            "{file}: canonical form from the parsed schema"
        );
        assert_eq!(
            hex(&standard_fingerprint(parsed).to_le_bytes()),
            their_fingerprint,
            "{file}: fingerprint"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_encoded_by_fastavro_in_both_framings_route_like_our_own() {
    let mut setup = Setup {
        registry: vec![(SCHEMA_ID, TRADING_GRID_EVENT_AVSC.to_string())],
        overrides: vec![
            ("SEND__PAIR_INTERVAL_MS", "10".into()),
            ("SEND__PAIR_BURST", "100000".into()),
        ],
        ..Setup::default()
    };
    // The messages, not Meta's pair limit, are under test here.
    setup.sandbox.pair_interval_ms = 1;
    setup.sandbox.pair_burst = u32::MAX;
    let p = Pipeline::start(setup).await;

    // Every event type twice: once in each framing (distinct ids, so dedupe keeps both).
    let mut events = Vec::new();
    let mut requests = Vec::new();
    for (i, (event_type, _, _)) in EVENT_TYPES.iter().enumerate() {
        for (k, format) in ["single", "confluent"].iter().enumerate() {
            let event = event(event_type, 9_000 + (2 * i + k) as u64, "ACME");
            requests.push(json!({"format": format, "schema_id": SCHEMA_ID, "event": event}));
            events.push(event);
        }
    }
    let file = p.dir.join("fastavro-requests.json");
    std::fs::write(&file, serde_json::to_vec(&requests).expect("json")).expect("requests file");
    let schema = repo_file("schemas/trading_grid_event.avsc");
    let encoded: Vec<Vec<u8>> = fastavro(&[schema.as_os_str(), file.as_os_str()])
        .lines()
        .map(unhex)
        .collect();
    assert_eq!(encoded.len(), events.len());

    let standard = standard_fingerprint(&ContractSchemas::get().trading_grid_event).to_le_bytes();
    for (bytes, event) in encoded.iter().zip(&events) {
        match bytes[0] {
            0xC3 => assert_eq!(
                bytes[2..10],
                standard,
                "fastavro's fingerprint is the standard one"
            ),
            0x00 => assert_eq!(bytes[1..5], SCHEMA_ID.to_be_bytes()),
            other => panic!("unexpected first byte {other:#x}"),
        }
        let event_type = event["event_type"].as_str().expect("event type");
        let key = event["correlation_id"].as_str().unwrap_or_default();
        p.publish_raw(topic_short(event_type), key, bytes).await;
    }

    let expected = expected_messages(&p, &events);
    let total: usize = expected.values().sum();
    assert!(
        total > events.len() / 2,
        "the samples plan messages: {total}"
    );
    p.wait_for_messages(total, WAIT).await;
    let (missing, duplicated) = compare(&p, &expected);
    assert_eq!(
        (missing, duplicated),
        (0, 0),
        "routed like our own encoding"
    );
    assert!(
        p.dead_letters().is_empty(),
        "nothing dead-lettered: {:?}",
        p.dead_letters()
            .iter()
            .map(|d| d.reason.clone())
            .collect::<Vec<_>>()
    );
}
