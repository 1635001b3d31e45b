//! The stage driver under the traffic real deployments see, end to end on the embedded broker and
//! the WhatsApp sandbox: a halt longer than `max.poll.interval.ms`, one busy recipient among many,
//! a partition moved while its sends are on the wire, a panic in a stage, a schema id the
//! registry cannot serve, restores that tombstone what expired, and converse state that leaves
//! with its partition.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::producer::FutureRecord;

use gridtalk_contract::{
    encode_confluent, json_to_avro, AvroRecord, ContractSchemas, OutboxMessage,
    TRADING_GRID_EVENT_AVSC,
};
use support::*;

const WAIT: Duration = Duration::from_secs(120);

/// An outbox message to `recipient` whose invoice number `INV-<seq>` identifies it at the sandbox.
fn outbox_message(seq: usize, recipient: &str) -> OutboxMessage {
    let parameters = vec![
        format!("INV-{seq}"),
        "EUR 1.00".to_string(),
        "PO-1".to_string(),
        "paid".to_string(),
    ];
    let request =
        gridtalk_whatsapp::template_message(recipient, "invoice_status", "en_US", &parameters, &[]);
    OutboxMessage {
        message_id: format!("msg-{seq}"),
        event_id: format!("evt-{seq}"),
        event_type: "tg.invoice.status".into(),
        correlation_id: format!("corr-{seq}"),
        document_key: format!("INV-{seq}"),
        partner_id: "ACME".into(),
        phone_number_id: PHONE_NUMBER_ID.into(),
        contact_id: format!("contact-{recipient}"),
        recipient: recipient.into(),
        template_name: Some("invoice_status".into()),
        language: "en_US".into(),
        request_json: request.to_string(),
        rule: "test".into(),
        created_at: chrono::Utc::now().timestamp_millis(),
        fallback_request_json: None,
    }
}

fn recipient(n: usize) -> String {
    format!("49151{n:07}")
}

/// Produces outbox messages to an explicit outbox partition (the send stage does not care which
/// partition a number's messages are on; tests use both to have something to move).
async fn publish_outbox(p: &Pipeline, partition: i32, message: &OutboxMessage) {
    let bytes = message.to_avro();
    p.producer
        .send(
            FutureRecord::to(&p.config.topics.outbox)
                .partition(partition)
                .key(PHONE_NUMBER_ID)
                .payload(&bytes),
            Duration::from_secs(10),
        )
        .await
        .expect("outbox record produced");
}

/// The invoice numbers the sandbox accepted, in arrival order, with their recipients.
fn delivered(p: &Pipeline) -> Vec<(String, String)> {
    p.sandbox
        .messages()
        .into_iter()
        .map(|m| (m.to, m.parameters.first().cloned().unwrap_or_default()))
        .collect()
}

/// Asserts each of `0..total` arrived exactly once.
fn assert_each_once(p: &Pipeline, total: usize) {
    let mut counts: HashMap<String, usize> = HashMap::new();
    for (_, invoice) in delivered(p) {
        *counts.entry(invoice).or_default() += 1;
    }
    let missing: Vec<usize> = (0..total)
        .filter(|i| !counts.contains_key(&format!("INV-{i}")))
        .collect();
    let repeated: Vec<(&String, &usize)> = counts.iter().filter(|(_, c)| **c > 1).collect();
    assert!(missing.is_empty(), "never delivered: {missing:?}");
    assert!(
        repeated.is_empty(),
        "delivered more than once: {repeated:?}"
    );
}

fn count_in_log(p: &Pipeline, name: &str, needle: &str) -> usize {
    p.process_log(name).matches(needle).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_busy_recipient_never_holds_up_the_numbers_other_recipients() {
    // Pair limit one message a second (burst 1) for the test instead of Meta's one per 6 s.
    let p = Pipeline::start(Setup {
        overrides: vec![
            ("SEND__PAIR_INTERVAL_MS", "1000".into()),
            ("SEND__PAIR_BURST", "1".into()),
        ],
        only_stages: Some(vec![gridtalk::Stage::Send]),
        ..Setup::default()
    })
    .await;
    let busy = recipient(0);
    for seq in 0..300 {
        publish_outbox(&p, 0, &outbox_message(seq, &busy)).await;
    }
    for n in 1..=40 {
        publish_outbox(&p, 0, &outbox_message(300 + n, &recipient(n))).await;
    }
    p.wait_until("the 40 others delivered", WAIT, |p| {
        delivered(p).iter().filter(|(to, _)| *to != busy).count() == 40
    })
    .await;
    let arrived = delivered(&p);
    let last_other = arrived
        .iter()
        .rposition(|(to, _)| *to != busy)
        .expect("others arrived");
    let busy_before_others = arrived[..last_other]
        .iter()
        .filter(|(to, _)| *to == busy)
        .count();
    assert!(
        busy_before_others < 10,
        "all 40 others arrived before the busy recipient's 10th message (it had {busy_before_others} by then)"
    );
    // Let a few more of the busy recipient's arrive: in outbox order, and never too fast for Meta.
    p.wait_until("ten for the busy recipient", WAIT, |p| {
        delivered(p).iter().filter(|(to, _)| *to == busy).count() >= 12
    })
    .await;
    let order: Vec<String> = delivered(&p)
        .into_iter()
        .filter(|(to, _)| *to == busy)
        .map(|(_, invoice)| invoice)
        .collect();
    let expected: Vec<String> = (0..order.len()).map(|i| format!("INV-{i}")).collect();
    assert_eq!(
        order, expected,
        "the busy recipient's messages in outbox order"
    );
    let stats = p.sandbox.stats();
    assert_eq!(
        stats.errors.get("131056"),
        None,
        "no pair-limit error: {stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_halt_three_times_the_poll_interval_keeps_both_replicas_in_the_group() {
    let p = Pipeline::start(Setup {
        in_process: false,
        overrides: vec![
            ("KAFKA__MAX_POLL_INTERVAL_MS", "15000".into()),
            ("KAFKA__REVOKE_DRAIN_MS", "5000".into()),
        ],
        ..Setup::default()
    })
    .await;
    let mut a = p.spawn_gridtalk("a", "send");
    let mut b = p.spawn_gridtalk("b", "send");
    let mut seq = 0;
    for _ in 0..10 {
        for partition in 0..2 {
            publish_outbox(&p, partition, &outbox_message(seq, &recipient(seq))).await;
            seq += 1;
        }
    }
    p.wait_for_messages(seq, WAIT).await;
    let revokes_before =
        count_in_log(&p, "a", "partitions revoked") + count_in_log(&p, "b", "partitions revoked");

    // The token expires: every send of the number halts (error 190) for 45 s while outbox
    // records keep arriving on both partitions.
    p.sandbox.set_valid_tokens(vec![]);
    let halted_at = Instant::now();
    while halted_at.elapsed() < Duration::from_secs(45) {
        for partition in 0..2 {
            publish_outbox(&p, partition, &outbox_message(seq, &recipient(seq))).await;
            seq += 1;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let stats = p.sandbox.stats();
    assert!(
        stats.errors.get("190").copied().unwrap_or(0) >= 2,
        "the number was halted: {stats:?}"
    );
    assert_eq!(p.sandbox.messages().len(), 20, "nothing sent while halted");

    p.sandbox.set_valid_tokens(vec![TOKEN.into()]);
    p.wait_for_messages(seq, WAIT).await;
    let revokes_after =
        count_in_log(&p, "a", "partitions revoked") + count_in_log(&p, "b", "partitions revoked");
    for child in [&mut a, &mut b] {
        assert_eq!(terminate(child).code(), Some(0));
    }
    assert_eq!(
        revokes_after,
        revokes_before,
        "no member left the group during the halt\n{}\n{}",
        p.process_log("a"),
        p.process_log("b")
    );
    for name in ["a", "b"] {
        assert_eq!(
            count_in_log(&p, name, "poll interval"),
            0,
            "{}",
            p.process_log(name)
        );
    }
    assert_each_once(&p, seq);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_moved_while_its_sends_are_on_the_wire_sends_each_message_once() {
    let mut setup = Setup {
        in_process: false,
        ..Setup::default()
    };
    // Every answer takes 1.5 s: whatever moves, moves with sends on the wire.
    setup.sandbox.faults.slow_rate = 1.0;
    setup.sandbox.faults.slow_ms = 1500;
    let p = Pipeline::start(setup).await;
    let total = 120;
    for seq in 0..total {
        publish_outbox(&p, (seq % 2) as i32, &outbox_message(seq, &recipient(seq))).await;
    }
    let mut a = p.spawn_gridtalk("a", "send");
    p.wait_until("sends on the wire", WAIT, |p| {
        p.sandbox.stats().requests >= 20
    })
    .await;
    let mut b = p.spawn_gridtalk("b", "send");
    p.wait_for_messages(total, WAIT).await;
    for child in [&mut a, &mut b] {
        assert_eq!(terminate(child).code(), Some(0));
    }
    assert!(
        count_in_log(&p, "a", "revoked partitions committed and released") >= 1,
        "a partition moved: {}",
        p.process_log("a")
    );
    assert!(
        p.sandbox.messages().len() < total * 2,
        "sanity: messages counted once each"
    );
    assert_each_once(&p, total);
}

#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_a_stage_exits_non_zero_and_a_restart_loses_nothing() {
    let p = Pipeline::start(Setup {
        in_process: false,
        ..Setup::default()
    })
    .await;
    let total = 30;
    for seq in 0..total {
        publish_outbox(&p, 0, &outbox_message(seq, &recipient(seq))).await;
    }
    let outbox = p.config.topics.outbox.clone();
    let mut crashing = p.spawn_gridtalk_with(
        "crashing",
        "send",
        &[("GRIDTALK_FAULT_PANIC_AT", format!("send:{outbox}:0:12"))],
    );
    let exit = wait_for_exit(&mut crashing, Duration::from_secs(60));
    assert_ne!(exit.code(), Some(0), "{}", p.process_log("crashing"));
    assert!(
        p.process_log("crashing").contains("fault injection"),
        "{}",
        p.process_log("crashing")
    );
    let committed = committed_offsets(&p.send_group(), &outbox);
    assert!(
        committed.get(&0).is_none_or(|o| *o <= 12),
        "nothing committed past the record: {committed:?}"
    );
    let mut restarted = p.spawn_gridtalk("restarted", "send");
    p.wait_for_messages(total, WAIT).await;
    assert_eq!(terminate(&mut restarted).code(), Some(0));
    assert_each_once(&p, total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_id_the_registry_cannot_serve_parks_only_its_partition() {
    let contract: serde_json::Value =
        serde_json::from_str(TRADING_GRID_EVENT_AVSC).expect("contract");
    let p = Pipeline::start(Setup {
        registry: vec![
            (41, contract.to_string()),
            (77, UNAVAILABLE_SCHEMA.to_string()),
        ],
        overrides: vec![("ROUTE__REGISTRY_WAIT_MAX_SECS", "8".into())],
        ..Setup::default()
    })
    .await;
    let reader = &ContractSchemas::get().trading_grid_event;
    let topic = p.input(topic_short("tg.invoice.delivered"));
    let confluent = |id: u32, seq: u64| {
        let e = event("tg.invoice.delivered", seq, "ACME");
        encode_confluent(reader, id, json_to_avro(&e, reader).expect("avro")).expect("encode")
    };
    let produce = |partition: i32, bytes: Vec<u8>| {
        let (producer, topic) = (p.producer.clone(), topic.clone());
        async move {
            producer
                .send(
                    FutureRecord::to(&topic)
                        .partition(partition)
                        .key("k")
                        .payload(&bytes),
                    Duration::from_secs(10),
                )
                .await
                .expect("produced");
        }
    };
    // Partition 0: a record whose schema the registry cannot serve, then a good one behind it.
    produce(0, confluent(77, 1)).await;
    produce(0, confluent(41, 2)).await;
    let started = Instant::now();
    // A canary on the other partition and one on another topic route while id 77 fails.
    produce(1, confluent(41, 3)).await;
    p.publish_event(&event("tg.asn.sent", 4, "ACME")).await;
    p.wait_for_messages(2, WAIT).await;
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "the canaries routed while the id was failing"
    );
    assert!(
        p.dead_letters()
            .iter()
            .all(|d| d.reason != "registry_unavailable"),
        "not dead-lettered before the bound"
    );
    // After the bound the record is dead-lettered and its partition moves on.
    p.wait_until("the parked record dead-lettered", WAIT, |p| {
        p.dead_letters()
            .iter()
            .any(|d| d.reason == "registry_unavailable")
    })
    .await;
    p.wait_for_messages(3, WAIT).await;
    let letters: Vec<_> = p
        .dead_letters()
        .into_iter()
        .filter(|d| d.reason == "registry_unavailable")
        .collect();
    assert_eq!(letters.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_tombstones_what_expired_so_the_next_one_reads_no_dead_entries() {
    use rdkafka::Message;
    let p = Pipeline::start(Setup {
        only_stages: Some(vec![]),
        ..Setup::default()
    })
    .await;
    let topic = p.config.topics.send_index.clone();
    let producer = gridtalk_kafka::producer(&p.config.kafka).expect("producer");
    let now = chrono::Utc::now().timestamp_millis();
    // 200 entries that expired an hour ago and 5 that are live, on partition 0.
    let mut deliveries = Vec::new();
    for i in 0..205 {
        let expires = if i < 200 {
            now - 3_600_000
        } else {
            now + 3_600_000
        };
        deliveries.push(
            gridtalk_kafka::changelog::write(
                &producer,
                &topic,
                0,
                &format!("key-{i}"),
                Some((b"v", expires)),
            )
            .expect("enqueued"),
        );
    }
    for d in deliveries {
        d.await.expect("delivered").expect("acknowledged");
    }
    let live_keys = || {
        let mut latest: HashMap<Vec<u8>, bool> = HashMap::new();
        for m in read_topic(&topic) {
            if m.partition() == 0 {
                latest.insert(m.key().unwrap_or_default().to_vec(), m.payload().is_some());
            }
        }
        latest.values().filter(|live| **live).count()
    };
    assert_eq!(live_keys(), 205);

    let restored =
        gridtalk_kafka::changelog::restore_for_stage(&p.config.kafka, "test", &topic, vec![0])
            .await
            .expect("restored");
    assert_eq!(restored[&0].len(), 5, "only the live entries");
    assert_eq!(live_keys(), 5, "the expired entries are tombstoned");

    let again = gridtalk_kafka::changelog::restore_partitions(
        &p.config.kafka,
        &topic,
        &[0],
        chrono::Utc::now().timestamp_millis(),
        Duration::from_secs(60),
    )
    .expect("restored again");
    assert_eq!(again.entries[&0].len(), 5);
    assert!(
        again.expired.is_empty(),
        "nothing left to tombstone: {:?}",
        again.expired
    );
}

/// `gridtalk_state_entries{store="converse_memory"}` as the process behind `port` reports it
/// (`None` while its admin endpoint does not answer yet).
async fn converse_memory(port: u16) -> Option<i64> {
    metric(port, r#"gridtalk_state_entries{store="converse_memory"}"#).await
}

async fn wait_for_memory(
    what: &str,
    ports: &[u16],
    accept: impl Fn(&[Option<i64>]) -> bool,
) -> Vec<Option<i64>> {
    let started = Instant::now();
    loop {
        let mut seen = Vec::new();
        for port in ports {
            seen.push(converse_memory(*port).await);
        }
        if accept(&seen) {
            return seen;
        }
        assert!(started.elapsed() < WAIT, "{what}: converse memory {seen:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn converse_state_leaves_with_its_partition_and_the_new_owner_rebuilds_it() {
    // One webhook (and sent-log) partition, so a process that loses it holds nothing. The range
    // assignor gives a topic's partitions to members in the order of their member ids, which
    // start with the client id: the newcomer ("a-…") takes the partition from the first ("z-…").
    let setup = Setup {
        ingest: true,
        only_stages: Some(vec![
            gridtalk::Stage::Route,
            gridtalk::Stage::Send,
            gridtalk::Stage::Ingest,
        ]),
        overrides: vec![("TOPICS__PARTITIONS", "1".into())],
        ..Setup::default()
    };
    let p = Pipeline::start(setup).await;
    p.wait_for_way_back(WAIT).await;
    let converse = |name: &str, client_id: &str| {
        let port = gridtalk_embedded::free_port().expect("port");
        let child = p.spawn_gridtalk_with(
            name,
            "converse",
            &[
                ("GRIDTALK__ADMIN__LISTEN", format!("127.0.0.1:{port}")),
                (
                    "GRIDTALK__KAFKA__CLIENT",
                    format!("{{\"client.id\" = \"{client_id}\"}}"),
                ),
            ],
        );
        (child, port)
    };
    let (mut first, first_port) = converse("first", "z-converse");
    let types = gridtalk_contract::samples::EVENT_TYPES;
    for seq in 0..6u64 {
        p.publish_event(&event(types[seq as usize].0, 500 + seq, "ACME"))
            .await;
    }
    p.wait_for_messages(6, WAIT).await;
    // Settled: every message's three statuses are on the response topic.
    p.wait_until("every status published", WAIT, |p| {
        let statuses = p
            .responses()
            .iter()
            .filter(|r| {
                matches!(
                    r.body,
                    gridtalk_contract::ResponseBody::DeliveryStatus { .. }
                )
            })
            .count();
        statuses == 3 * p.sandbox.messages().len()
    })
    .await;
    let held = wait_for_memory("the first process holds the state", &[first_port], |m| {
        m[0].is_some_and(|n| n > 0)
    })
    .await[0]
        .expect("counted");

    let (mut newcomer, newcomer_port) = converse("newcomer", "a-converse");
    let after = wait_for_memory(
        "the partition moved to the newcomer",
        &[first_port, newcomer_port],
        |m| m[0] == Some(0) && m[1].is_some_and(|n| n >= held),
    )
    .await;
    println!(
        "converse memory: {held} entries in the first process; after the move {:?} there and {:?} in the newcomer",
        after[0], after[1]
    );
    for child in [&mut first, &mut newcomer] {
        assert_eq!(terminate(child).code(), Some(0));
    }
}
