//! `gridtalk bench`: measures gridtalk on this machine and prints figures for
//! `docs/benchmarks.md`. Three parts:
//! - **decode and plan**: the route stage's CPU work per event (Avro decode with schema
//!   resolution, JSON view, rule matching and template rendering), in-process, no I/O;
//! - **interpret**: the converse stage's CPU work per webhook item (the join with the sent index,
//!   status ordering, token verification, authority, the typed record), in-process, no I/O;
//! - **pipeline**: events through the embedded broker, the route and send stages and the WhatsApp
//!   sandbox, with the sandbox's limits raised so the pipeline itself is measured, not Meta's tier.
//!
//! Numbers, never assertions: performance is tracked here, not in tests.

use std::time::{Duration, Instant};

use gridtalk_contract::samples::{sample_event, EVENT_TYPES};
use gridtalk_contract::{
    encode_single_object, json_to_avro, ContractSchemas, EventDecoder, EventView, SchemaSet,
};
use gridtalk_telemetry::Readiness;
use tokio_util::sync::CancellationToken;

use crate::stack::PARTNERS;

const BENCH_BUTTON_SECRET: &[u8] = b"bench-button-secret-0123456789";

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Events for the decode-and-plan part.
    #[arg(long, default_value_t = 20_000)]
    decode_events: u64,
    /// Events for the pipeline part.
    #[arg(long, default_value_t = 3_000)]
    pipeline_events: u64,
    /// Throughput limit of the sending number in the pipeline part (messages per second).
    #[arg(long, default_value_t = 1_000)]
    send_rate: u32,
    /// Dedupe keys for the state part (written to one changelog partition, then restored).
    #[arg(long, default_value_t = 1_000_000)]
    state_keys: u64,
    /// How long the sandbox takes to answer each send in the pipeline part (Meta answers in about
    /// 100 to 300 ms), to see how `send.max_in_flight` bounds a number's throughput.
    #[arg(long, default_value_t = 0)]
    api_latency_ms: u64,
    /// `send.max_in_flight` for the pipeline part.
    #[arg(long, default_value_t = 64)]
    send_in_flight: usize,
    /// Open request clocks for the clock part (written to one changelog partition as the decide
    /// stage writes them, then restored); 0 skips it.
    #[arg(long, default_value_t = 1_000_000)]
    clocks: u64,
    /// Sent messages for the converse-state part, each followed by a status webhook item.
    #[arg(long, default_value_t = 1_000_000)]
    converse_items: u64,
    /// Contacts the converse-state part spreads its messages over.
    #[arg(long, default_value_t = 100_000)]
    converse_contacts: u64,
    /// Outbox messages for each run of the send-sizing part (0 skips it): the send stage alone,
    /// one number, many recipients, the API answering in `--sizing-latency-ms`.
    #[arg(long, default_value_t = 3_000)]
    sizing_messages: u64,
    /// Distinct recipients the send-sizing part spreads its messages over.
    #[arg(long, default_value_t = 1_000)]
    sizing_recipients: u64,
    /// How long the sandbox takes to answer each send in the send-sizing part.
    #[arg(long, default_value_t = 200)]
    sizing_latency_ms: u64,
    /// The `send.max_in_flight` values the send-sizing part runs with, one run each.
    #[arg(long, value_delimiter = ',', default_values_t = [16usize, 64, 256])]
    sizing_in_flight: Vec<usize>,
}

fn encoded_events(count: u64) -> Vec<Vec<u8>> {
    let schema = &ContractSchemas::get().trading_grid_event;
    let now = chrono::Utc::now().timestamp_millis();
    (0..count)
        .map(|seq| {
            let (event_type, _, _) = EVENT_TYPES[(seq as usize) % EVENT_TYPES.len()];
            let partner = PARTNERS[(seq as usize / EVENT_TYPES.len()) % PARTNERS.len()];
            let json = sample_event(event_type, seq, partner, now).expect("known type");
            encode_single_object(schema, json_to_avro(&json, schema).expect("sample fits"))
                .expect("encode")
        })
        .collect()
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    println!(
        "gridtalk bench ({} build)",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    println!(
        "machine: {} logical CPUs, {}",
        num_cpus(),
        std::env::consts::ARCH
    );

    // The embedded stack (idle during part 1, which only borrows its configuration).
    let shutdown = CancellationToken::new();
    let stack = crate::stack::EmbeddedStack::start(
        "bench",
        0,
        |sandbox| {
            sandbox.throughput_per_second = args.send_rate.saturating_mul(2);
            if args.api_latency_ms > 0 {
                sandbox.faults.slow_rate = 1.0;
                sandbox.faults.slow_ms = args.api_latency_ms;
            }
            sandbox.pair_burst = u32::MAX;
        },
        vec![
            ("SEND__MAX_MESSAGES_PER_SECOND", args.send_rate.to_string()),
            ("SEND__MAX_IN_FLIGHT", args.send_in_flight.to_string()),
            ("SEND__PAIR_BURST", "1000000".into()),
            // The send figures count messages one for one with the outbox.
            ("SEND__COALESCE__WINDOW_MS", "0".into()),
        ],
        shutdown.clone(),
    )
    .await?;
    let (bootstrap, sandbox, config) = (
        stack.bootstrap.clone(),
        &stack.sandbox,
        stack.config.clone(),
    );

    // Part 1: decode and plan.
    let directory =
        gridtalk_route::Directory::load(&stack.directory_file).map_err(anyhow::Error::msg)?;
    let reader = ContractSchemas::get().trading_grid_event.clone();
    let decoder = EventDecoder::new(
        reader.clone(),
        SchemaSet::contract(),
        None,
        config.contract.max_event_bytes,
    );
    let events = encoded_events(args.decode_events);
    let bytes: usize = events.iter().map(Vec::len).sum();
    let started = Instant::now();
    let mut views = Vec::with_capacity(events.len());
    for e in &events {
        let decoded = decoder.decode(e).await?;
        views.push(EventView::from_resolved(&decoded.value, &reader));
    }
    let decode = started.elapsed();
    // The bounded walk alone (part of the decode above), to show its share of the decode's cost.
    let started = Instant::now();
    for e in &events {
        gridtalk_contract::check_datum(&reader, &e[10..]).map_err(anyhow::Error::msg)?;
    }
    let walk = started.elapsed();
    let started = Instant::now();
    let mut planned = Vec::new();
    let now = chrono::Utc::now().timestamp_millis();
    for view in &views {
        if let Ok(p) =
            gridtalk_route::plan(view, &config, &directory, Some(BENCH_BUTTON_SECRET), now)
        {
            planned.extend(p.messages);
        }
    }
    let plan = started.elapsed();
    let messages = planned.len();
    println!();
    println!(
        "decode and plan: {} events ({} bytes average), {messages} messages planned",
        events.len(),
        bytes / events.len().max(1)
    );
    println!(
        "  decode + view   {:>10.0} events/s  ({:.1} µs/event)",
        rate(events.len(), decode),
        micros(decode, events.len())
    );
    println!(
        "  of which the bounded walk {:.1} µs/event ({:.0} % of decode + view)",
        micros(walk, events.len()),
        100.0 * walk.as_secs_f64() / decode.as_secs_f64().max(f64::EPSILON)
    );
    println!(
        "  rules + render  {:>10.0} events/s  ({:.1} µs/event)",
        rate(events.len(), plan),
        micros(plan, events.len())
    );

    // Part 1b: interpreting what comes back for those messages.
    interpret(&planned, &config, &directory, now);
    converse_state_over_time(
        &config,
        &directory,
        args.converse_items,
        args.converse_contacts,
    );

    // Part 3 first (the broker is idle): restoring state from a changelog.
    state_restore(&config, args.state_keys).await?;
    if args.clocks > 0 {
        clock_restore(&config, args.clocks).await?;
    }

    // Part 4: sizing send.max_in_flight against the API's latency (the sandbox's latency is put
    // back afterwards for the pipeline part).
    if args.sizing_messages > 0 {
        sandbox.set_faults(gridtalk_sandbox::Faults {
            slow_rate: 1.0,
            slow_ms: args.sizing_latency_ms,
            ..Default::default()
        });
        println!();
        println!(
            "send sizing: the send stage alone, {} messages per run over {} recipients of one number, API latency {} ms, number limit {}/s",
            args.sizing_messages, args.sizing_recipients, args.sizing_latency_ms, args.send_rate
        );
        for &in_flight in &args.sizing_in_flight {
            send_sizing(&stack, &planned, &args, in_flight, &shutdown).await?;
        }
        sandbox.set_faults(gridtalk_sandbox::Faults {
            slow_rate: if args.api_latency_ms > 0 { 1.0 } else { 0.0 },
            slow_ms: args.api_latency_ms,
            ..Default::default()
        });
    }

    // Part 2: the pipeline on the embedded broker.
    // Publish first, then start the stages: the run measures draining a backlog.
    // The sandbox's counts so far belong to the sizing part.
    let before = sandbox.stats();
    let skip = sandbox.messages().len();
    let published = Instant::now();
    let generated = gridtalk_embedded::generate(
        &bootstrap,
        &PARTNERS,
        1_000_000.0,
        Some(args.pipeline_events),
        shutdown.clone(),
    )
    .await?;
    let publish = published.elapsed();
    let started = Instant::now();
    let started_ms = chrono::Utc::now().timestamp_millis();
    let stages = tokio::spawn(crate::run_stages(
        config.clone(),
        &[crate::Stage::Route, crate::Stage::Send],
        Readiness::default(),
        shutdown.clone(),
    ));
    let expected_messages =
        (messages as f64 * args.pipeline_events as f64 / args.decode_events as f64).round() as u64;
    let mut last_count = 0;
    let mut last_change = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let count = sandbox.stats().accepted - before.accepted;
        if count != last_count {
            last_count = count;
            last_change = Instant::now();
        }
        if count >= expected_messages
            || last_change.elapsed() > Duration::from_secs(20)
            || stages.is_finished()
        {
            break;
        }
    }
    let drained = started.elapsed();
    let mut stats = sandbox.stats();
    stats.accepted -= before.accepted;
    stats.errors = errors_since(&before.errors, stats.errors);
    shutdown.cancel();
    let _ = stages.await;
    println!();
    println!(
        "pipeline: {generated} events published in {:.2} s; route + send drained them into {} messages in {:.2} s",
        publish.as_secs_f64(),
        stats.accepted,
        drained.as_secs_f64()
    );
    println!(
        "  events          {:>10.0} /s",
        rate(generated as usize, drained)
    );
    println!(
        "  messages sent   {:>10.0} /s  (number limit {}/s less the safety margin; {} on the wire at most, API latency {} ms)",
        rate(stats.accepted as usize, drained),
        args.send_rate,
        args.send_in_flight,
        args.api_latency_ms
    );
    // Steady state: from the first to the last message at the sandbox (no group join, no start-up).
    let times: Vec<i64> = sandbox
        .messages_since(skip)
        .iter()
        .map(|m| m.received_at_ms)
        .collect();
    if let (Some(first), Some(last)) = (times.iter().min(), times.iter().max()) {
        let span = Duration::from_millis((last - first).max(1) as u64);
        println!(
            "  steady state    {:>10.0} messages/s  (first message {:.2} s after start, last {:.2} s later)",
            rate(times.len().saturating_sub(1), span),
            (*first - started_ms) as f64 / 1000.0,
            span.as_secs_f64()
        );
    }
    println!("  sandbox errors  {:?}", stats.errors);
    if stats.accepted < expected_messages {
        anyhow::bail!(
            "only {} of {expected_messages} messages were sent",
            stats.accepted
        );
    }
    Ok(())
}

/// One run of the send-sizing part: `args.sizing_messages` template messages, spread round-robin
/// over `args.sizing_recipients` recipients, published straight to a fresh outbox topic, then
/// drained by the send stage alone with `send.max_in_flight = in_flight`. Prints the steady rate
/// at the sandbox next to what the bound allows (`in_flight / latency`) and what the number's
/// limit allows.
async fn send_sizing(
    stack: &crate::stack::EmbeddedStack,
    planned: &[gridtalk_contract::OutboxMessage],
    args: &BenchArgs,
    in_flight: usize,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    use gridtalk_contract::AvroRecord;
    use rdkafka::producer::FutureRecord;
    let templates: Vec<&gridtalk_contract::OutboxMessage> = planned
        .iter()
        .filter(|m| m.template_name.is_some())
        .collect();
    anyhow::ensure!(!templates.is_empty(), "no template message was planned");
    let mut config = (*stack.config).clone();
    config.send.max_in_flight = in_flight;
    config.kafka.group_prefix = format!("bench-sizing-{in_flight}");
    config.topics.outbox = format!("bench.sizing-{in_flight}.outbox");
    config.topics.send_index = format!("bench.sizing-{in_flight}.send-index");
    config.topics.sent = format!("bench.sizing-{in_flight}.sent");
    let config = std::sync::Arc::new(config);
    gridtalk_kafka::ensure_topics(&config.kafka, &gridtalk::internal_topics(&config)).await?;

    let producer = gridtalk_kafka::producer(&config.kafka)?;
    let mut deliveries = Vec::with_capacity(args.sizing_messages as usize);
    for i in 0..args.sizing_messages {
        let mut message = templates[i as usize % templates.len()].clone();
        let recipient = format!("+1555{:07}", i % args.sizing_recipients.max(1));
        let mut request: serde_json::Value = serde_json::from_str(&message.request_json)?;
        // The Cloud API takes the number without its `+`.
        request["to"] = serde_json::Value::String(recipient.trim_start_matches('+').to_string());
        message.request_json = request.to_string();
        message.recipient = recipient;
        message.contact_id = format!("bench-contact-{}", i % args.sizing_recipients.max(1));
        message.message_id = format!("bench-sizing-{in_flight}-{i}");
        let bytes = message.to_avro();
        let record = FutureRecord::to(&config.topics.outbox)
            .key(message.phone_number_id.as_bytes())
            .payload(&bytes);
        deliveries.push(
            producer
                .send_result(record)
                .map_err(|(e, _)| anyhow::anyhow!("outbox enqueue: {e}"))?,
        );
    }
    gridtalk_kafka::acknowledged(deliveries)
        .await
        .map_err(|e| anyhow::anyhow!("outbox produce: {e}"))?;

    let skip = stack.sandbox.messages().len();
    let before = stack.sandbox.stats();
    let stop = shutdown.child_token();
    let stage = tokio::spawn(crate::run_stages(
        config.clone(),
        &[crate::Stage::Send],
        Readiness::default(),
        stop.clone(),
    ));
    let mut last = (0usize, Instant::now());
    let sent = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The counter, not the message list: copying the list every 100 ms would slow the
        // sandbox down as it grows.
        let count = (stack.sandbox.stats().accepted - before.accepted) as usize;
        if count != last.0 {
            last = (count, Instant::now());
        }
        if count as u64 >= args.sizing_messages
            || last.1.elapsed() > Duration::from_secs(20)
            || stage.is_finished()
        {
            break stack.sandbox.messages_since(skip);
        }
    };
    stop.cancel();
    let _ = stage.await;
    let times: Vec<i64> = sent.iter().map(|m| m.received_at_ms).collect();
    let (first, last) = (
        times.iter().min().copied().unwrap_or_default(),
        times.iter().max().copied().unwrap_or_default(),
    );
    let span = Duration::from_millis((last - first).max(1) as u64);
    let bound = in_flight as f64 * 1000.0 / args.sizing_latency_ms.max(1) as f64;
    let limit = f64::from(args.send_rate)
        * (100.0 - f64::from(config.send.rate_safety_margin_percent))
        / 100.0;
    let errors = errors_since(&before.errors, stack.sandbox.stats().errors);
    println!(
        "  max_in_flight {in_flight:>4}  {:>7.0} messages/s  ({} sent; in-flight bound {:.0}/s, number limit {:.0}/s; sandbox errors {:?})",
        rate(times.len().saturating_sub(1), span),
        sent.len(),
        bound,
        limit,
        errors
    );
    if (sent.len() as u64) < args.sizing_messages {
        anyhow::bail!(
            "send sizing with max_in_flight {in_flight}: only {} of {} messages were sent",
            sent.len(),
            args.sizing_messages
        );
    }
    Ok(())
}

/// Feeds the converse stage's interpretation a sent record, a `read` status and, for messages
/// with buttons, a tap on the first button, for every planned message; prints the rates.
fn interpret(
    planned: &[gridtalk_contract::OutboxMessage],
    config: &gridtalk_config::Config,
    directory: &gridtalk_route::Directory,
    now: i64,
) {
    use gridtalk_contract::WebhookItem;
    use gridtalk_converse::{Conversations, Handled, Settings};
    use serde_json::{json, Value};
    let mut conversations = Conversations::new(Settings {
        button_secret: BENCH_BUTTON_SECRET.to_vec(),
        service_window_ms: 23 * 3_600_000,
        confirmation_template: config.converse.confirmation_template.clone(),
        confirmation_languages: vec!["en_US".into()],
        phone_number_id: config.send.phone_number_id.clone(),
        remembered_items: planned.len() * 3,
        retention_ms: 7 * 24 * 3_600_000,
    });
    let sent: Vec<gridtalk_contract::SentMessage> = planned
        .iter()
        .enumerate()
        .map(|(i, m)| gridtalk_contract::SentMessage {
            wamid: format!("wamid.BENCH{i:08}"),
            message_id: m.message_id.clone(),
            event_id: m.event_id.clone(),
            event_type: m.event_type.clone(),
            correlation_id: m.correlation_id.clone(),
            document_key: m.document_key.clone(),
            partner_id: m.partner_id.clone(),
            phone_number_id: m.phone_number_id.clone(),
            contact_id: m.contact_id.clone(),
            recipient: m.recipient.clone(),
            wa_id: m.recipient.clone(),
            template_name: m.template_name.clone(),
            message_status: "accepted".into(),
            attempts: 1,
            accepted_at: now,
        })
        .collect();
    let item = |kind: &str, id: String, contact: &str, value: Value| WebhookItem {
        kind: kind.into(),
        item_id: id,
        contact: contact.into(),
        phone_number_id: Some(config.send.phone_number_id.clone()),
        profile_name: None,
        received_at_ms: now,
        item: value,
    };
    let mut items = Vec::new();
    for (m, s) in planned.iter().zip(&sent) {
        items.push(item(
            "status",
            format!("{}:read", s.wamid),
            &s.wa_id,
            json!({"id": s.wamid, "status": "read", "timestamp": (now / 1000).to_string(), "recipient_id": s.wa_id}),
        ));
        let request: Value = serde_json::from_str(&m.request_json).unwrap_or_default();
        if let Some(payload) = request
            .pointer("/template/components/1/parameters/0/payload")
            .and_then(Value::as_str)
        {
            items.push(item(
                "message",
                format!("{}.tap", s.wamid),
                &s.wa_id,
                json!({"from": s.wa_id, "id": format!("{}.tap", s.wamid), "timestamp": (now / 1000).to_string(),
                       "type": "button", "context": {"id": s.wamid}, "button": {"payload": payload, "text": "tap"}}),
            ));
        }
    }
    let started = Instant::now();
    for s in &sent {
        conversations.apply_sent(0, s);
    }
    let applied = started.elapsed();
    let started = Instant::now();
    let (mut outcomes, mut waits) = (0usize, 0usize);
    for i in &items {
        match conversations.handle(0, i, directory, now, false) {
            Handled::Done { outcomes: o, .. } => outcomes += o.len(),
            Handled::Wait { .. } => waits += 1,
        }
    }
    let handled = started.elapsed();
    println!();
    println!(
        "interpret: {} sent records, {} webhook items (statuses and taps), {outcomes} records out, {waits} unjoined",
        sent.len(),
        items.len()
    );
    println!(
        "  sent log apply  {:>10.0} records/s  ({:.1} µs/record)",
        rate(sent.len(), applied),
        micros(applied, sent.len())
    );
    println!(
        "  items handled   {:>10.0} items/s  ({:.1} µs/item)",
        rate(items.len(), handled),
        micros(handled, items.len())
    );
}

/// The converse stage's memory over simulated time: `items` sent messages spread over
/// `contacts` contacts and 48 simulated hours, each followed by a `delivered` status, with the
/// stage's eviction every 10 simulated minutes and a 12-hour retention. Prints the live entries
/// and the process's resident set at every fourth simulated hour: both should stop growing once
/// the first 12 hours have passed.
fn converse_state_over_time(
    config: &gridtalk_config::Config,
    directory: &gridtalk_route::Directory,
    items: u64,
    contacts: u64,
) {
    use gridtalk_contract::{SentMessage, WebhookItem};
    use gridtalk_converse::{Conversations, Settings};
    const HOUR: i64 = 3_600_000;
    let span_ms = 48 * HOUR;
    let retention_ms = 12 * HOUR;
    let mut conversations = Conversations::new(Settings {
        button_secret: BENCH_BUTTON_SECRET.to_vec(),
        service_window_ms: 23 * HOUR,
        confirmation_template: config.converse.confirmation_template.clone(),
        confirmation_languages: vec!["en_US".into()],
        phone_number_id: config.send.phone_number_id.clone(),
        remembered_items: config.converse.remembered_items,
        retention_ms,
    });
    let start = chrono::Utc::now().timestamp_millis();
    let step_ms = (span_ms / items.max(1) as i64).max(1);
    let mut next_evict = start + 10 * 60_000;
    let mut next_report = start;
    let contacts = contacts.max(1);
    println!();
    println!(
        "converse state: {items} sent messages and {items} status items over {contacts} contacts, 48 simulated hours, retention 12 h"
    );
    println!("  simulated hour   live entries   resident MiB");
    let started = Instant::now();
    for i in 0..items {
        let now = start + i as i64 * step_ms;
        let wa_id = format!("49170{:07}", i % contacts);
        let wamid = format!("wamid.STATE{i:010}");
        let partition = (i % 6) as i32;
        conversations.apply_sent(
            partition,
            &SentMessage {
                wamid: wamid.clone(),
                message_id: format!("m{i}"),
                event_id: format!("e{i}"),
                event_type: "tg.shipment.exception".into(),
                correlation_id: format!("ACME|ASN-{i}"),
                document_key: format!("ASN-{i}"),
                partner_id: "ACME".into(),
                phone_number_id: config.send.phone_number_id.clone(),
                contact_id: format!("contact-{}", i % contacts),
                recipient: wa_id.clone(),
                wa_id: wa_id.clone(),
                template_name: Some("shipment_exception".into()),
                message_status: "accepted".into(),
                attempts: 1,
                accepted_at: now,
            },
        );
        let status = WebhookItem {
            kind: "status".into(),
            item_id: format!("{wamid}:delivered"),
            contact: wa_id.clone(),
            phone_number_id: Some(config.send.phone_number_id.clone()),
            profile_name: None,
            received_at_ms: now,
            item: serde_json::json!({"id": wamid, "status": "delivered",
                "timestamp": (now / 1000).to_string(), "recipient_id": wa_id}),
        };
        let _ = conversations.handle(partition, &status, directory, now, false);
        let _ = conversations.take_changes();
        if now >= next_evict {
            conversations.evict(now);
            next_evict += 10 * 60_000;
        }
        if now >= next_report {
            println!(
                "  {:>14}   {:>12}   {:>12.0}",
                (now - start) / HOUR,
                conversations.len(),
                resident_bytes().unwrap_or(0) as f64 / 1_048_576.0
            );
            next_report += 4 * HOUR;
        }
    }
    println!(
        "  {:>14}   {:>12}   {:>12.0}   ({:.1} s)",
        48,
        conversations.len(),
        resident_bytes().unwrap_or(0) as f64 / 1_048_576.0,
        started.elapsed().as_secs_f64()
    );
}

/// A one-partition compacted changelog `topic` for a state benchmark, and a producer that
/// batches its writes (the benchmark measures the restore, not the writes).
async fn bench_changelog(
    config: &gridtalk_config::Config,
    topic: &str,
) -> anyhow::Result<rdkafka::producer::FutureProducer> {
    gridtalk_kafka::ensure_topics(
        &config.kafka,
        &[gridtalk_kafka::TopicSpec {
            name: topic.into(),
            partitions: 1,
            configs: vec![("cleanup.policy".into(), "compact".into())],
        }],
    )
    .await?;
    Ok(gridtalk_kafka::client_config(&config.kafka)
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "2000000")
        .create()?)
}

/// Writes `keys` dedupe entries (event-id-sized keys) to one partition of a compacted changelog,
/// restores the partition as the route stage does on assignment, and measures the memory a
/// dedupe window needs per key (resident-set growth while it holds them).
async fn state_restore(config: &gridtalk_config::Config, keys: u64) -> anyhow::Result<()> {
    let topic = "gridtalk.bench.dedupe-changelog";
    let producer = bench_changelog(config, topic).await?;
    let now = chrono::Utc::now().timestamp_millis();
    let expires = now + 86_400_000;
    let id = |i: u64| format!("{:08x}-0000-4000-8000-{:012x}", i >> 16, i);
    let started = Instant::now();
    let mut pending = Vec::with_capacity(50_000);
    for i in 0..keys {
        pending.push(gridtalk_kafka::changelog::write(
            &producer,
            topic,
            0,
            &id(i),
            Some((&[], expires)),
        )?);
        if pending.len() == 50_000 {
            for delivery in pending.drain(..) {
                let _ = delivery.await;
            }
        }
    }
    for delivery in pending {
        let _ = delivery.await;
    }
    let written = started.elapsed();
    let kafka = config.kafka.clone();
    let started = Instant::now();
    let restored = tokio::task::spawn_blocking(move || {
        gridtalk_kafka::changelog::restore_partitions(
            &kafka,
            topic,
            &[0],
            now,
            Duration::from_secs(600),
        )
    })
    .await??;
    let restore = started.elapsed();
    let (read, live) = (
        restored.read,
        restored.entries.get(&0).map_or(0, |entries| entries.len()),
    );
    drop(restored);

    // Memory per key of the live structure the route stage keeps (a dedupe window).
    let before = resident_bytes();
    let mut window = gridtalk_route::DedupeWindow::new(86_400_000, usize::MAX);
    for i in 0..keys {
        window.remember(&id(i), now);
    }
    let after = resident_bytes();
    println!();
    println!(
        "state: {keys} dedupe keys written to one changelog partition in {:.1} s; restored {live} live keys from {read} records",
        written.as_secs_f64()
    );
    println!(
        "  restore         {:>10.2} s  ({:.0} records/s)",
        restore.as_secs_f64(),
        rate(read as usize, restore)
    );
    if let (Some(before), Some(after)) = (before, after) {
        println!(
            "  memory          {:>10.0} bytes per key in a dedupe window ({} keys, {:.0} MiB)",
            after.saturating_sub(before) as f64 / keys.max(1) as f64,
            window.len(),
            after.saturating_sub(before) as f64 / 1_048_576.0
        );
    }
    Ok(())
}

/// An open clock as the route stage opens it for sample purchase order `i`: three steps, one
/// recipient, the event's view (the bulk of its size).
fn sample_clock(i: u64, now: i64) -> gridtalk_clock::OpenClock {
    const HOUR: i64 = 3_600_000;
    let view = gridtalk_contract::samples::sample_event("tg.po.received", i, "ACME", now)
        .expect("a sample event")
        .to_string();
    let due = now + 24 * HOUR + (i as i64 % 86_400) * 1_000;
    let po = format!("PO-{}", 4_500_000 + i);
    gridtalk_clock::OpenClock {
        key: format!("po:{po}"),
        kind: "po".into(),
        request_id: po.clone(),
        policy: "a-po-acknowledgement".into(),
        correlation_id: format!("ACME|850|{po}"),
        event_id: format!("{:08x}-0000-4000-8000-{:012x}", i >> 16, i),
        partner_id: "ACME".into(),
        due_at_ms: due,
        steps_at_ms: vec![due, due + 4 * HOUR, due + 24 * HOUR],
        escalation_last: true,
        recipients: vec!["acme-order-desk".into()],
        view,
    }
}

/// Writes `count` open clocks to one partition of a compacted changelog exactly as the decide
/// stage writes them, restores the partition as the decide stage does on assignment (the read,
/// then the clocks rebuilt with their time-ordered queue), and measures the memory the open
/// clocks take (resident-set growth while they are held).
async fn clock_restore(config: &gridtalk_config::Config, count: u64) -> anyhow::Result<()> {
    let topic = "gridtalk.bench.clock-changelog";
    let producer = bench_changelog(config, topic).await?;
    let now = chrono::Utc::now().timestamp_millis();
    let started = Instant::now();
    let mut bytes_written = 0usize;
    let chunk = 20_000u64;
    for first in (0..count).step_by(chunk as usize) {
        let mut clocks = gridtalk_clock::Clocks::new();
        for i in first..(first + chunk).min(count) {
            clocks.open(0, sample_clock(i, now), now);
        }
        let mut pending = Vec::with_capacity(chunk as usize);
        for change in clocks.take_changes() {
            let value = change.value.expect("an open clock");
            bytes_written += value.len();
            pending.push(gridtalk_kafka::changelog::write(
                &producer,
                topic,
                0,
                &change.key,
                Some((value.as_bytes(), change.expires_at_ms)),
            )?);
        }
        for delivery in pending {
            let _ = delivery.await;
        }
    }
    let written = started.elapsed();
    let kafka = config.kafka.clone();
    let before = resident_bytes();
    let started = Instant::now();
    let restored = tokio::task::spawn_blocking(move || {
        gridtalk_kafka::changelog::restore_partitions(
            &kafka,
            topic,
            &[0],
            now,
            Duration::from_secs(1_200),
        )
    })
    .await??;
    let read = started.elapsed();
    let records = restored.read;
    let mut entries = restored.entries;
    let partition = entries.remove(&0).unwrap_or_default();
    let applied_at = Instant::now();
    let mut clocks = gridtalk_clock::Clocks::new();
    clocks.restore(
        0,
        partition
            .into_iter()
            .map(|(k, e)| (k, String::from_utf8_lossy(&e.value).into_owned())),
    );
    let applied = applied_at.elapsed();
    let after = resident_bytes();
    println!();
    println!(
        "clocks: {count} open request clocks ({:.0} bytes of state each) written to one changelog partition in {:.1} s",
        bytes_written as f64 / count.max(1) as f64,
        written.as_secs_f64()
    );
    println!(
        "  restore         {:>10.2} s  ({:.0} records/s): read {:.2} s, clocks rebuilt {:.2} s; {} open, next due {:?}",
        (read + applied).as_secs_f64(),
        rate(records as usize, read + applied),
        read.as_secs_f64(),
        applied.as_secs_f64(),
        clocks.len(),
        clocks.next_due_ms().map(|t| t - now)
    );
    if let (Some(before), Some(after)) = (before, after) {
        println!(
            "  memory          {:>10.0} bytes per open clock ({:.0} MiB for {count})",
            after.saturating_sub(before) as f64 / count.max(1) as f64,
            after.saturating_sub(before) as f64 / 1_048_576.0
        );
    }
    Ok(())
}

/// The sandbox's error counts that grew since `before`, by how much.
fn errors_since(
    before: &std::collections::HashMap<String, u64>,
    now: std::collections::HashMap<String, u64>,
) -> std::collections::HashMap<String, u64> {
    now.into_iter()
        .filter_map(|(code, n)| {
            let new = n - before.get(&code).copied().unwrap_or_default();
            (new > 0).then_some((code, new))
        })
        .collect()
}

/// The process's resident set size, from /proc (Linux only).
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64().max(1e-9)
}

fn micros(d: Duration, n: usize) -> f64 {
    d.as_secs_f64() * 1e6 / n.max(1) as f64
}

fn num_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}
