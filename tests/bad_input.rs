//! The bad-input corpus, end to end on the real broker: every kind of record an outsider can put
//! on a topic gridtalk reads (an input topic, the outbox, the webhook and decisions topics) is
//! dead-lettered with its reason, the stages stay up, the committed offsets move past it, and a
//! valid record behind the bad ones is still delivered.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use gridtalk_contract::TRADING_GRID_EVENT_AVSC;
use gridtalk_contract::{encode_confluent, json_to_avro, AvroRecord, OutboxMessage};
use rdkafka::producer::FutureRecord;
use serde_json::{json, Value as Json};
use support::hostile::{
    confluent_body, hostile_records, hostile_writer_schemas, single_object_body,
};
use support::*;

const WAIT: Duration = Duration::from_secs(90);

/// One bad record: what it is, the topic it is written to, its bytes and the dead-letter reason
/// it must get.
struct Case {
    name: String,
    topic: String,
    bytes: Vec<u8>,
    reason: &'static str,
}

/// A sample event occurring now (the pipeline checks the event age in this test).
fn fresh(event_type: &str, seq: u64, partner: &str) -> Json {
    let mut e = event(event_type, seq, partner);
    e["occurred_at"] = json!(chrono::Utc::now().timestamp_millis());
    e
}

/// A writer schema: the contract's event without `field`.
fn contract_without(field: &str) -> String {
    let mut schema: Json = serde_json::from_str(TRADING_GRID_EVENT_AVSC).expect("contract schema");
    schema["fields"]
        .as_array_mut()
        .expect("fields")
        .retain(|f| f["name"] != field);
    schema.to_string()
}

/// Registry writer schemas of the corpus (id, schema), beyond the hostile ones.
fn registry() -> Vec<(u32, String)> {
    let mut schemas = hostile_writer_schemas();
    schemas.extend([
        (21, contract_without("event_id")),
        (22, r#""string""#.to_string()),
        (
            23,
            r#"{"type":"record","name":"Out]oxMessage","fields":[{"name":"x","type":"int"}]}"#
                .to_string(),
        ),
        (
            24,
            r#"{"type":"record","name":"Other","fields":[{"name":"x","type":"int"}]}"#.to_string(),
        ),
    ]);
    schemas
}

/// A valid outbox record, as the route stage writes them, changed by `edit`.
fn outbox(edit: impl FnOnce(&mut OutboxMessage)) -> Vec<u8> {
    let mut message = OutboxMessage {
        message_id: unique("corpus-outbox"),
        event_id: unique("corpus-event"),
        event_type: "tg.invoice.delivered".into(),
        correlation_id: "ACME|810|INV-1".into(),
        document_key: "INV-1".into(),
        partner_id: "ACME".into(),
        phone_number_id: PHONE_NUMBER_ID.into(),
        contact_id: "acme-billing".into(),
        recipient: "15550100002".into(),
        template_name: None,
        language: "en_US".into(),
        request_json: json!({"messaging_product": "whatsapp", "to": "15550100002", "type": "text",
                             "text": {"body": "corpus"}})
        .to_string(),
        rule: "corpus".into(),
        created_at: chrono::Utc::now().timestamp_millis(),
        fallback_request_json: None,
    };
    edit(&mut message);
    message.to_avro()
}

/// The route stage's input cases, all on `tg.documents.v1`.
fn input_cases(p: &Pipeline) -> Vec<Case> {
    let topic = p.input("tg.documents.v1");
    let valid = single_object(&fresh("tg.po.received", 90, "ACME"));
    // Offsets into the envelope of a record framed in single-object encoding (10 header bytes):
    // event_id's length, then its first byte; `producer` and `severity` are enum indexes that
    // follow empty strings and zero numbers in an all-zero envelope.
    let zero_envelope = |at: usize, byte: u8| {
        let mut body = [0u8; 16];
        body[14] = 0x06;
        body[at] = byte;
        single_object_body(&body)
    };
    let mut cases: Vec<(String, Vec<u8>, &'static str)> = vec![
        (
            "text, not Avro".into(),
            b"this is not Avro".to_vec(),
            "malformed_avro",
        ),
        ("an empty value".into(), Vec::new(), "malformed_avro"),
        ("one byte".into(), vec![0xC3], "malformed_avro"),
        (
            "a single-object header cut short".into(),
            vec![0xC3, 0x01, 0xAA, 0xBB, 0xCC],
            "malformed_avro",
        ),
        (
            "a Confluent header cut short".into(),
            vec![0x00, 0x00, 0x01],
            "malformed_avro",
        ),
        (
            "the event as JSON".into(),
            fresh("tg.po.received", 91, "ACME").to_string().into_bytes(),
            "malformed_avro",
        ),
        (
            "gzip bytes".into(),
            vec![0x1F, 0x8B, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x03],
            "malformed_avro",
        ),
        (
            "a valid record cut in half".into(),
            valid[..valid.len() / 2].to_vec(),
            "malformed_avro",
        ),
        (
            "a valid record one byte short".into(),
            valid[..valid.len() - 1].to_vec(),
            "malformed_avro",
        ),
        (
            "an event id that is not UTF-8".into(),
            {
                let mut bytes = valid.clone();
                bytes[11] = 0xFF;
                bytes
            },
            "malformed_avro",
        ),
        (
            "a negative string length".into(),
            single_object_body(&[0x01, 0x41]),
            "malformed_avro",
        ),
        (
            "producer enum index 63".into(),
            zero_envelope(4, 0x7E),
            "malformed_avro",
        ),
        (
            "severity enum index 40".into(),
            zero_envelope(8, 0x50),
            "malformed_avro",
        ),
        (
            "a negative payload branch".into(),
            zero_envelope(14, 0x01),
            "malformed_avro",
        ),
        (
            "a registry id whose body is not its schema's".into(),
            confluent_body(21, &[0xFF; 12]),
            "malformed_avro",
        ),
        (
            "a fingerprint no schema has".into(),
            {
                let mut bytes = vec![0xC3, 0x01];
                bytes.extend_from_slice(&0x0123_4567_89AB_CDEFu64.to_le_bytes());
                bytes.extend_from_slice(b"\x02\x04ab");
                bytes
            },
            "unknown_schema",
        ),
        (
            "a registry id the registry does not know".into(),
            confluent_body(999, &[0x02]),
            "unknown_schema",
        ),
        (
            "a registry schema that is not a record".into(),
            confluent_body(22, &[0x02, 0x41]),
            "unknown_schema",
        ),
        (
            "a registry schema the parser would panic on".into(),
            confluent_body(23, &[0x02]),
            "unknown_schema",
        ),
        (
            "a registry schema of another record".into(),
            confluent_body(24, &[0x02]),
            "missing_field",
        ),
        (
            "a writer without event_id".into(),
            {
                let mut e = fresh("tg.po.received", 92, "ACME");
                e.as_object_mut().expect("object").remove("event_id");
                let schema =
                    apache_avro::Schema::parse_str(&contract_without("event_id")).expect("parses");
                encode_confluent(&schema, 21, json_to_avro(&e, &schema).expect("avro"))
                    .expect("encode")
            },
            "missing_field",
        ),
        (
            "a 300 kB record".into(),
            (0..300_000u32).map(|i| (i % 251) as u8).collect(),
            "oversized",
        ),
        (
            "a partner the directory does not know".into(),
            single_object(&fresh("tg.po.received", 93, "NOBODY")),
            "unknown_partner",
        ),
        (
            "a partner with nobody to tell".into(),
            single_object(&fresh("tg.po.received", 94, "BARE")),
            "no_recipient",
        ),
        (
            "a recipient whose number WhatsApp cannot reach".into(),
            single_object(&fresh("tg.po.received", 95, "BADPHONE")),
            "invalid_phone",
        ),
        (
            "an unknown event type".into(),
            {
                let mut e = fresh("tg.po.received", 96, "ACME");
                e["event_type"] = json!("tg.po.teleported");
                single_object(&e)
            },
            "unknown_event_type",
        ),
        (
            "an empty event type".into(),
            {
                let mut e = fresh("tg.po.received", 97, "ACME");
                e["event_type"] = json!("");
                single_object(&e)
            },
            "unknown_event_type",
        ),
        (
            "an event two hours old".into(),
            {
                let mut e = fresh("tg.po.received", 98, "ACME");
                e["occurred_at"] = json!(chrono::Utc::now().timestamp_millis() - 2 * 3_600_000);
                single_object(&e)
            },
            "stale",
        ),
    ];
    cases.extend(
        hostile_records()
            .into_iter()
            .map(|(name, bytes)| (name.to_string(), bytes, "malformed_avro")),
    );
    cases
        .into_iter()
        .map(|(name, bytes, reason)| Case {
            name,
            topic: topic.clone(),
            bytes,
            reason,
        })
        .collect()
}

/// The send stage's cases, on the outbox.
fn outbox_cases(p: &Pipeline) -> Vec<Case> {
    let topic = p.config.topics.outbox.clone();
    let event = single_object(&fresh("tg.po.received", 99, "ACME"));
    [
        (
            "outbox: text, not Avro",
            b"not an outbox record".to_vec(),
            "malformed_outbox",
        ),
        ("outbox: an empty value", Vec::new(), "malformed_outbox"),
        (
            "outbox: an event instead of an outbox record",
            event,
            "malformed_outbox",
        ),
        (
            "outbox: a record cut short",
            {
                let bytes = outbox(|_| {});
                bytes[..bytes.len() - 3].to_vec()
            },
            "malformed_outbox",
        ),
        (
            "outbox: a request body that is not JSON",
            outbox(|m| m.request_json = "{not json".into()),
            "whatsapp_permanent",
        ),
        (
            "outbox: a phone-number id WhatsApp does not have",
            outbox(|m| m.phone_number_id = "999999999999999".into()),
            "whatsapp_permanent",
        ),
    ]
    .into_iter()
    .map(|(name, bytes, reason)| Case {
        name: name.to_string(),
        topic: topic.clone(),
        bytes,
        reason,
    })
    .collect()
}

/// The converse stage's cases, on the webhook topic.
fn webhook_cases(p: &Pipeline) -> Vec<Case> {
    let topic = p.config.topics.webhook.clone();
    [
        ("webhook item: text, not JSON", b"not json".to_vec()),
        ("webhook item: a JSON array", b"[1, 2, 3]".to_vec()),
        (
            "webhook item: an empty item id",
            br#"{"kind": "message", "item_id": "", "contact": "14155550101", "received_at_ms": 1, "item": {}}"#.to_vec(),
        ),
        (
            "webhook item: an object without an item id",
            br#"{"kind": "message", "contact": "14155550101", "item": {}}"#.to_vec(),
        ),
    ]
    .into_iter()
    .map(|(name, bytes)| Case {
        name: name.to_string(),
        topic: topic.clone(),
        bytes,
        reason: "malformed_webhook_item",
    })
    .collect()
}

/// The settlement's cases, on the decisions topic.
fn decision_cases(p: &Pipeline) -> Vec<Case> {
    let topic = p.config.topics.decisions.clone();
    [
        ("decision: text, not JSON", b"approve it".to_vec()),
        (
            "decision: JSON that is not a candidate",
            br#"{"request": {"kind": "approval"}, "action": "APPROVE"}"#.to_vec(),
        ),
    ]
    .into_iter()
    .map(|(name, bytes)| Case {
        name: name.to_string(),
        topic: topic.clone(),
        bytes,
        reason: "malformed_decision",
    })
    .collect()
}

/// A valid candidate, as a converse process forwards a deciding tap.
fn valid_candidate() -> gridtalk_converse::Candidate {
    gridtalk_converse::Candidate {
        request: gridtalk_converse::RequestRef {
            kind: "approval".into(),
            id: "APR-CORPUS".into(),
            correlation_id: "ACME|860|APR-CORPUS".into(),
            event_id: "corpus-event".into(),
            partner_id: "ACME".into(),
        },
        action: "APPROVE".into(),
        title: "Approve".into(),
        contact_id: "buyer-maria".into(),
        contact_language: None,
        context: None,
        // She has not written to the number: the confirmation must be the template.
        inside_window: false,
        item_id: "wamid.CORPUS-DECISION".into(),
        wa_id: "14155550101".into(),
        phone_number_id: None,
        at_ms: chrono::Utc::now().timestamp_millis(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_case_of_the_bad_input_corpus_is_dead_lettered_and_what_follows_is_delivered() {
    let p = Pipeline::start(Setup {
        registry: registry(),
        input_partitions: 1,
        ingest: true,
        overrides: vec![
            ("ROUTE__MAX_EVENT_AGE_SECS", "3600".into()),
            // Smaller than the 300 kB record, so its dead letter cannot carry it whole.
            ("KAFKA__PRODUCER__MESSAGE.MAX.BYTES", "\"200000\"".into()),
        ],
        ..Setup::default()
    })
    .await;
    p.wait_for_way_back(WAIT).await;

    let mut cases = input_cases(&p);
    cases.extend(outbox_cases(&p));
    cases.extend(webhook_cases(&p));
    cases.extend(decision_cases(&p));
    assert!(cases.len() >= 40, "{} cases", cases.len());
    let mut names: Vec<&str> = cases.iter().map(|c| c.name.as_str()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), cases.len(), "every case is distinct");

    let mut expected: BTreeMap<(String, i32, i64), (String, &str)> = BTreeMap::new();
    for case in &cases {
        let key = format!("corpus-{}", expected.len());
        let (partition, offset) = p
            .producer
            .send(
                FutureRecord::to(&case.topic).key(&key).payload(&case.bytes),
                Duration::from_secs(30),
            )
            .await
            .map(|d| (d.partition, d.offset))
            .map_err(|(e, _)| e)
            .expect("publish");
        expected.insert(
            (case.topic.clone(), partition, offset),
            (case.name.clone(), case.reason),
        );
    }
    // Behind all of them, valid records on each topic: an event, and a text a person writes.
    p.publish_event(&fresh("tg.po.received", 100, "ACME")).await;
    let text = json!({
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550000000", "phone_number_id": PHONE_NUMBER_ID},
        "contacts": [{"profile": {"name": "Support ACME"}, "wa_id": "15550100005"}],
        "messages": [{"from": "15550100005", "id": "wamid.CORPUS-AFTER", "timestamp":
                      chrono::Utc::now().timestamp().to_string(), "type": "text",
                      "text": {"body": "after the corpus"}}]
    });
    assert_eq!(p.post_webhook(&text).await, 200);
    let candidate = valid_candidate();
    p.producer
        .send(
            FutureRecord::to(&p.config.topics.decisions)
                .key(&candidate.request_key())
                .payload(&candidate.to_json()),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("publish");

    p.wait_until("the purchase order behind the corpus", WAIT, |p| {
        received(p)
            .iter()
            .any(|m| m.3.first().map(String::as_str) == Some("PO-4500100"))
    })
    .await;
    p.wait_until(
        "the text behind the corpus on the response topic",
        WAIT,
        |p| {
            p.responses()
                .iter()
                .any(|r| r.wa_message_id == "wamid.CORPUS-AFTER")
        },
    )
    .await;
    p.wait_until(
        "the decision behind the corpus on the response topic",
        WAIT,
        |p| {
            p.responses()
                .iter()
                .any(|r| r.wa_message_id == "wamid.CORPUS-DECISION")
        },
    )
    .await;
    p.wait_until("a dead letter for every case", WAIT, |p| {
        p.dead_letters().len() >= expected.len()
    })
    .await;

    // Exactly one letter per case, with the case's reason and a readable, bounded detail.
    let mut problems: Vec<String> = Vec::new();
    let mut lettered: BTreeMap<(String, i32, i64), usize> = BTreeMap::new();
    for letter in p.dead_letters() {
        let header = |name: &str| letter.headers.get(name).cloned().unwrap_or_default();
        let at = (
            header("gridtalk.dlq.source_topic"),
            header("gridtalk.dlq.source_partition")
                .parse()
                .unwrap_or(-1),
            header("gridtalk.dlq.source_offset").parse().unwrap_or(-1),
        );
        let detail = header("gridtalk.dlq.detail");
        if detail.is_empty() || detail.len() > 1000 {
            problems.push(format!("{at:?}: detail of {} bytes", detail.len()));
        }
        match expected.get(&at) {
            Some((_, reason)) if *reason == letter.reason => {}
            Some((name, reason)) => problems.push(format!(
                "{name}: expected {reason}, got {} ({detail})",
                letter.reason
            )),
            None => problems.push(format!("unexpected letter {} ({detail})", letter.reason)),
        }
        *lettered.entry(at).or_default() += 1;
    }
    for (at, (name, _)) in &expected {
        match lettered.get(at) {
            Some(1) => {}
            n => problems.push(format!("{name}: {} letters", n.copied().unwrap_or(0))),
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");

    // Every stage committed past its bad records (and the valid ones behind them).
    p.wait_for_commits(&p.route_group(), &p.input("tg.documents.v1"), WAIT)
        .await;
    p.wait_for_commits(&p.send_group(), &p.config.topics.outbox, WAIT)
        .await;
    p.wait_for_commits(
        &format!("{}-converse", p.config.kafka.group_prefix),
        &p.config.topics.webhook,
        WAIT,
    )
    .await;
    p.wait_for_commits(
        &format!("{}-decide", p.config.kafka.group_prefix),
        &p.config.topics.decisions,
        WAIT,
    )
    .await;
    // Nothing reached a phone but the valid purchase order and the valid decision's confirmation.
    let sent: Vec<String> = received(&p)
        .iter()
        .filter_map(|m| m.3.first().cloned())
        .collect();
    assert!(
        sent.iter().all(|d| d == "PO-4500100" || d == "APR-CORPUS"),
        "{sent:?}"
    );
    assert_eq!(
        sent.iter().filter(|d| *d == "APR-CORPUS").count(),
        1,
        "{sent:?}"
    );
}
