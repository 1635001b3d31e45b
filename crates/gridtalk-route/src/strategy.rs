//! The route stage's strategy for the driver: one worker per assigned input partition.
//!
//! A partition's records are routed strictly in order by its worker, which owns the partition's
//! dedupe window (so the window needs no lock and a duplicate can never race its original). The
//! driver offers records into the worker's bounded queue; a full queue is back-pressure, and the
//! driver pauses that partition only. A worker that must wait (for the schema registry, for room
//! among the produces awaiting acknowledgement) therefore holds up its own partition and nothing
//! else.
//!
//! Per record: decode → dedupe → plan → enqueue the outbox records in consumption order → (in a
//! task) await their acknowledgements, write the dedupe entry, await it, finish the ticket. The
//! enqueue and everything after it is an effect of the partition: a revoke waits for it (up to
//! the drain deadline) before the partition's position is committed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::message::{Header, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use gridtalk_config::{Config, Secret};
use gridtalk_contract::{AvroRecord, DecodeErrorKind, EventDecoder, EventView, OutboxMessage};
use gridtalk_directory::SharedDirectory;
use gridtalk_kafka::driver::{
    EffectGuard, Record, StageFailure, Strategy, Submit, Ticket, TopicPartition,
};
use gridtalk_kafka::{dead_letter, DeadLetterReason};
use gridtalk_telemetry::Metrics;

use crate::dedupe::DedupeWindow;
use crate::render::plan;

pub(crate) const STAGE: &str = "route";
/// Records a partition's worker holds before the driver pauses the partition.
const QUEUE_PER_PARTITION: usize = 64;
/// How often a worker expires its dedupe window and tombstones what it forgot.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);
/// The first and the longest wait between two attempts at a schema the registry cannot serve.
const REGISTRY_BACKOFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(30));

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The dedupe changelog of input topic `input`.
pub(crate) fn dedupe_changelog(config: &Config, input: &str) -> String {
    format!("{}{input}", config.topics.dedupe_changelog_prefix)
}

/// What every partition worker shares.
pub(crate) struct Routing {
    pub config: Arc<Config>,
    pub producer: FutureProducer,
    pub decoder: EventDecoder,
    pub directory: SharedDirectory,
    pub button_secret: Option<Secret>,
    /// The time quiet hours are judged on (the request clocks' time).
    pub time: gridtalk_clock::TimeSource,
    /// Records whose produces await acknowledgement (`route.max_in_flight`).
    pub in_flight: Arc<Semaphore>,
}

impl Routing {
    fn timeout(&self) -> Duration {
        Duration::from_millis(self.config.kafka.request_timeout_ms)
    }
}

struct Worker {
    queue: mpsc::Sender<Record>,
    stop: CancellationToken,
}

pub(crate) struct RouteStrategy {
    routing: Arc<Routing>,
    workers: HashMap<TopicPartition, Worker>,
    tasks: JoinSet<()>,
    /// Signalled by a worker whenever it takes a record off its queue.
    room: Arc<Notify>,
}

impl RouteStrategy {
    pub(crate) fn new(routing: Arc<Routing>) -> Self {
        RouteStrategy {
            routing,
            workers: HashMap::new(),
            tasks: JoinSet::new(),
            room: Arc::new(Notify::new()),
        }
    }
}

impl Strategy for RouteStrategy {
    async fn assigned(&mut self, partitions: &[TopicPartition]) -> Result<(), StageFailure> {
        let mut by_topic: HashMap<&str, Vec<i32>> = HashMap::new();
        for (topic, partition) in partitions {
            by_topic.entry(topic).or_default().push(*partition);
        }
        // Every input topic's changelog at once: a restore is mostly waiting for the broker.
        let config = &self.routing.config;
        let restores = by_topic.into_iter().map(|(topic, numbers)| async move {
            restore_windows(config, topic, numbers)
                .await
                .map(|windows| (topic, windows))
                .map_err(|e| StageFailure(format!("dedupe windows of {topic}: {e}")))
        });
        for (topic, windows) in futures::future::try_join_all(restores).await? {
            for (partition, window) in windows {
                let (queue, records) = mpsc::channel(QUEUE_PER_PARTITION);
                let stop = CancellationToken::new();
                let tp = (topic.to_string(), partition);
                self.tasks.spawn(partition_worker(
                    self.routing.clone(),
                    tp.clone(),
                    window,
                    records,
                    stop.clone(),
                    self.room.clone(),
                ));
                self.workers.insert(tp, Worker { queue, stop });
            }
        }
        Ok(())
    }

    fn revoked(&mut self, partitions: &[TopicPartition]) {
        for tp in partitions {
            if let Some(worker) = self.workers.remove(tp) {
                // Queued records are dropped with the queue: their partition is draining, so
                // they are left to its next owner.
                worker.stop.cancel();
            }
        }
    }

    fn submit(&mut self, record: Record) -> Submit {
        let tp = (
            record.message.topic().to_string(),
            record.message.partition(),
        );
        let Some(worker) = self.workers.get(&tp) else {
            // The driver offers records only of partitions this strategy restored.
            record
                .ticket
                .fail(format!("route: no worker for {}/{}", tp.0, tp.1));
            return Submit::Accepted;
        };
        match worker.queue.try_send(record) {
            Ok(()) => Submit::Accepted,
            // Full, or the worker ended (then `poll` reports why).
            Err(mpsc::error::TrySendError::Full(record))
            | Err(mpsc::error::TrySendError::Closed(record)) => Submit::PushBack(record),
        }
    }

    async fn poll(&mut self) -> Result<(), StageFailure> {
        tokio::select! {
            Some(ended) = self.tasks.join_next() => match ended {
                Err(e) if e.is_panic() => Err(StageFailure(format!("a route partition worker panicked: {e}"))),
                _ => Ok(()),
            },
            _ = self.room.notified() => Ok(()),
        }
    }
}

/// Reads the dedupe windows of `partitions` of input `input` from its changelog, in one pass.
async fn restore_windows(
    config: &Config,
    input: &str,
    partitions: Vec<i32>,
) -> Result<HashMap<i32, DedupeWindow>, gridtalk_kafka::KafkaError> {
    let restored = gridtalk_kafka::changelog::restore_for_stage(
        &config.kafka,
        "dedupe",
        &dedupe_changelog(config, input),
        partitions,
    )
    .await?;
    let now = now_ms();
    let window_ms = (config.route.dedupe_window_secs as i64).saturating_mul(1000);
    Ok(restored
        .into_iter()
        .map(|(partition, entries)| {
            let entries = entries
                .into_iter()
                .map(|(id, e)| (id, e.expires_at_ms))
                .collect();
            let window =
                DedupeWindow::restored(window_ms, config.route.dedupe_max_entries, entries, now);
            (partition, window)
        })
        .collect())
}

async fn partition_worker(
    routing: Arc<Routing>,
    tp: TopicPartition,
    mut window: DedupeWindow,
    mut records: mpsc::Receiver<Record>,
    stop: CancellationToken,
    room: Arc<Notify>,
) {
    let gauge = Metrics::global()
        .state_entries
        .with_label_values(&["dedupe"]);
    let mut counted = window.len() as i64;
    gauge.add(counted);
    let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
    sweep.tick().await;
    loop {
        let record = tokio::select! {
            _ = stop.cancelled() => break,
            _ = sweep.tick() => {
                sweep_window(&routing, &tp, &mut window);
                let live = window.len() as i64;
                gauge.add(live - counted);
                counted = live;
                continue;
            }
            record = records.recv() => match record {
                Some(record) => record,
                None => break,
            },
        };
        room.notify_one();
        route_one(&routing, &mut window, record, &stop).await;
    }
    gauge.sub(counted);
}

/// Expires dedupe entries and deletes what the window forgot from the changelog.
fn sweep_window(routing: &Routing, tp: &TopicPartition, window: &mut DedupeWindow) {
    window.expire_now(now_ms());
    let changelog = dedupe_changelog(&routing.config, &tp.0);
    for id in window.take_forgotten() {
        if let Err(e) =
            gridtalk_kafka::changelog::write(&routing.producer, &changelog, tp.1, &id, None)
        {
            tracing::warn!(error = %e, "dedupe tombstone not written; the entry expires on restore");
        }
    }
}

/// Decodes a record's value, waiting out a registry that cannot serve its schema (this
/// partition only) up to `route.registry_wait_max_secs`. `None` when the partition moved or the
/// stage stops meanwhile.
async fn decode(
    routing: &Routing,
    payload: &[u8],
    ticket: &Ticket,
    stop: &CancellationToken,
) -> Option<Result<gridtalk_contract::Decoded, gridtalk_contract::DecodeError>> {
    let started = tokio::time::Instant::now();
    let bound = Duration::from_secs(routing.config.route.registry_wait_max_secs);
    let mut backoff = REGISTRY_BACKOFF.0;
    loop {
        match routing.decoder.decode(payload).await {
            Err(e) if e.kind == DecodeErrorKind::RegistryUnavailable => {
                if started.elapsed() >= bound {
                    return Some(Err(e));
                }
                tracing::warn!(
                    topic = ticket.topic(),
                    partition = ticket.partition(),
                    offset = ticket.offset(),
                    error = %e,
                    retry_in_ms = backoff.as_millis() as u64,
                    "schema registry cannot serve the record's schema; its partition waits"
                );
                tokio::select! {
                    _ = stop.cancelled() => return None,
                    _ = tokio::time::sleep(backoff) => {}
                }
                if !ticket.owned() {
                    return None;
                }
                backoff = (backoff * 2).min(REGISTRY_BACKOFF.1);
            }
            decoded => return Some(decoded),
        }
    }
}

async fn route_one(
    routing: &Arc<Routing>,
    window: &mut DedupeWindow,
    record: Record,
    stop: &CancellationToken,
) {
    let Record { message, ticket } = record;
    Metrics::global()
        .events_consumed
        .with_label_values(&[message.topic()])
        .inc();
    let Some(payload) = message.payload() else {
        return dead(
            routing,
            message,
            ticket,
            DeadLetterReason::MalformedAvro,
            "record has no value".into(),
            stop,
        )
        .await;
    };
    let decoded = match decode(routing, payload, &ticket, stop).await {
        // Moved or stopping: the record is left to the partition's next owner.
        None => return,
        Some(Ok(decoded)) => decoded,
        Some(Err(e)) => {
            let reason = match e.kind {
                DecodeErrorKind::Malformed => DeadLetterReason::MalformedAvro,
                DecodeErrorKind::UnknownSchema => DeadLetterReason::UnknownSchema,
                DecodeErrorKind::Oversized => DeadLetterReason::Oversized,
                DecodeErrorKind::RegistryUnavailable => DeadLetterReason::RegistryUnavailable,
                _ => DeadLetterReason::MissingField,
            };
            return dead(routing, message, ticket, reason, e.detail, stop).await;
        }
    };
    let view = EventView::from_resolved(&decoded.value, routing.decoder.reader_schema());
    let now = now_ms();
    if window.contains(view.event_id(), now) {
        Metrics::global()
            .events_deduplicated
            .with_label_values(&[view.event_type()])
            .inc();
        tracing::debug!(
            event_id = view.event_id(),
            event_type = view.event_type(),
            "duplicate event dropped"
        );
        return ticket.finish();
    }
    let planned = {
        let directory = routing.directory.read().expect("directory lock");
        plan(
            &view,
            &routing.config,
            &directory,
            routing
                .button_secret
                .as_ref()
                .map(|s| s.expose().as_bytes()),
            now,
        )
    };
    let plan = match planned {
        Ok(p) => p,
        Err(failure) => {
            return dead(
                routing,
                message,
                ticket,
                failure.reason,
                failure.detail,
                stop,
            )
            .await
        }
    };
    let mut plan = plan;
    // An upstream overdue event's messages carry the ids of the step it names: a step the clock
    // already sent is not sent again.
    crate::clocks::key_upstream_messages(&view, &routing.config, &mut plan.messages);
    let mut commands = crate::clocks::clock_commands(&view, &routing.config, &plan.messages);
    let observed = crate::summaries::observations(&routing.config, &view, routing.time.now_ms());
    let mut messages: Vec<&OutboxMessage> = Vec::new();
    {
        // Quiet hours: what may not go now waits with the decide stage for the window.
        let urgent = crate::quiet::is_urgent(&routing.config, view.severity(), view.event_type());
        let clock_now = routing.time.now_ms();
        let directory = routing.directory.read().expect("directory lock");
        for message in &plan.messages {
            match crate::quiet::release_at(&routing.config, &directory, message, urgent, clock_now)
            {
                Some(release) => {
                    tracing::debug!(event_id = view.event_id(), contact = %message.contact_id, release_at = release, "outside the contact's business hours; the message waits");
                    commands.push(crate::quiet::defer(message, release, clock_now));
                }
                None => messages.push(message),
            }
        }
    }
    if messages.is_empty() && commands.is_empty() && observed.is_empty() {
        Metrics::global()
            .events_unrouted
            .with_label_values(&[view.event_type()])
            .inc();
        tracing::debug!(
            event_id = view.event_id(),
            event_type = view.event_type(),
            "no rule matched"
        );
        return ticket.finish();
    }
    let Some((effect, permit)) = begin(routing, &ticket, stop).await else {
        return;
    };
    let expires = window.remember(view.event_id(), now);
    let mut deliveries = Vec::with_capacity(messages.len() + commands.len());
    for outbox in &messages {
        let bytes = outbox.to_avro();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "gridtalk.event_id",
                value: Some(outbox.event_id.as_bytes()),
            })
            .insert(Header {
                key: "gridtalk.message_id",
                value: Some(outbox.message_id.as_bytes()),
            });
        let record = FutureRecord::to(&routing.config.topics.outbox)
            .key(outbox.phone_number_id.as_bytes())
            .payload(&bytes)
            .headers(headers);
        // send_result enqueues now (keeping consumption order); the ack is awaited below.
        match routing.producer.send_result(record) {
            Ok(delivery) => deliveries.push(delivery),
            Err((e, _)) => return ticket.fail(format!("outbox enqueue: {e}")),
        }
        Metrics::global()
            .messages_rendered
            .with_label_values(&[outbox.template_name.as_deref().unwrap_or("none")])
            .inc();
    }
    // The clock commands follow the messages: an `Open` is only ever acknowledged once the
    // request it times is in the outbox (a crash in between replays both).
    for command in &commands {
        let bytes = command.to_json();
        let record = FutureRecord::to(&routing.config.topics.decisions)
            .key(command.key().as_bytes())
            .payload(&bytes)
            .headers(OwnedHeaders::new().insert(Header {
                key: "gridtalk.clock",
                value: Some(command.name().as_bytes()),
            }));
        match routing.producer.send_result(record) {
            Ok(delivery) => deliveries.push(delivery),
            Err((e, _)) => return ticket.fail(format!("clock command enqueue: {e}")),
        }
        Metrics::global()
            .clock_commands
            .with_label_values(&[command.name()])
            .inc();
    }
    // What the event tells the computed summaries, to the owner of each summary's scope.
    for o in &observed {
        let bytes = o.to_json();
        let key = o.key();
        let record = FutureRecord::to(&routing.config.topics.decisions)
            .key(key.as_bytes())
            .payload(&bytes)
            .headers(OwnedHeaders::new().insert(Header {
                key: "gridtalk.summary",
                value: Some(o.summary.as_bytes()),
            }));
        match routing.producer.send_result(record) {
            Ok(delivery) => deliveries.push(delivery),
            Err((e, _)) => return ticket.fail(format!("summary observation enqueue: {e}")),
        }
    }
    Metrics::global()
        .events_routed
        .with_label_values(&[view.event_type()])
        .inc();
    tracing::debug!(
        event_id = view.event_id(),
        event_type = view.event_type(),
        messages = messages.len(),
        clock_commands = commands.len(),
        summary_observations = observed.len(),
        "event routed"
    );
    // The dedupe entry is written only once the outbox holds the messages: a crash in between
    // replays the event, and the sender's index drops the repeated messages. The reverse order
    // could remember an event whose messages never reached the outbox, and lose them.
    let routing = routing.clone();
    let event_id = view.event_id().to_string();
    tokio::spawn(async move {
        let _held = (effect, permit);
        if let Err(e) = gridtalk_kafka::acknowledged(deliveries).await {
            return ticket.fail(format!("outbox produce: {e}"));
        }
        let remembered = gridtalk_kafka::changelog::write(
            &routing.producer,
            &dedupe_changelog(&routing.config, message.topic()),
            message.partition(),
            &event_id,
            Some((&[], expires)),
        );
        let durable = match remembered {
            Ok(delivery) => gridtalk_kafka::acknowledged(vec![delivery]).await,
            Err(e) => Err(e.to_string()),
        };
        match durable {
            Ok(()) => ticket.finish(),
            Err(e) => ticket.fail(format!("dedupe changelog: {e}")),
        }
    });
}

/// Begins the record's effect and takes a place among the records awaiting acknowledgement.
/// `None` when the partition moved or the stage stops (the record is left to the next owner).
async fn begin(
    routing: &Routing,
    ticket: &Ticket,
    stop: &CancellationToken,
) -> Option<(EffectGuard, OwnedSemaphorePermit)> {
    let permit = tokio::select! {
        _ = stop.cancelled() => return None,
        permit = routing.in_flight.clone().acquire_owned() => permit.ok()?,
    };
    Some((ticket.begin_effect()?, permit))
}

/// Dead-letters a record (an effect of its partition) and finishes it once acknowledged.
async fn dead(
    routing: &Arc<Routing>,
    message: OwnedMessage,
    ticket: Ticket,
    reason: DeadLetterReason,
    detail: String,
    stop: &CancellationToken,
) {
    let Some((effect, permit)) = begin(routing, &ticket, stop).await else {
        return;
    };
    let routing = routing.clone();
    tokio::spawn(async move {
        let _held = (effect, permit);
        let result = dead_letter(
            &routing.producer,
            &routing.config.topics.dlq,
            STAGE,
            reason,
            &detail,
            &message,
            &[],
            routing.timeout(),
        )
        .await;
        match result {
            Ok(()) => ticket.finish(),
            Err(e) => ticket.fail(format!(
                "dead letter for {}/{}/{}: {e}",
                message.topic(),
                message.partition(),
                message.offset()
            )),
        }
    });
}
