//! The converse stage's strategy for the driver: the sent log and the webhook items joined in
//! one place, and what they produce published.
//!
//! Sent-log records are applied to the conversations as they arrive (their offsets are never
//! committed: the driver reads the sent log from its start on every assignment). A webhook item
//! is handled in partition order; one that names a message the sent log has not shown yet waits
//! for it (at most `converse.max_waiting` at once, each up to `converse.join_wait_ms`, and never
//! judged unknown before the sent log of its partition has been read to the end it had at the
//! assignment). What an item produced is enqueued in order and, in a task, acknowledged, then
//! its state changes are written to the changelog and acknowledged, then the item is finished;
//! that publication is an effect of the partition, so a revoke waits for it.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use gridtalk_config::Config;
use gridtalk_contract::WebhookItem;
use gridtalk_contract::{AvroRecord, Framing, SentMessage, WorkflowResponse};
use gridtalk_directory::SharedDirectory;
use gridtalk_kafka::driver::{Record, StageFailure, Strategy, Submit, Ticket, TopicPartition};
use gridtalk_kafka::{dead_letter, DeadLetterReason, KafkaError};
use gridtalk_telemetry::Metrics;

use crate::conversation::{Conversations, Handled, Outcome};
use crate::overdue::with_clock_closes;

pub(crate) const STAGE: &str = "converse";
/// Items whose publications await acknowledgement at once; beyond it the driver is pushed back.
const MAX_IN_FLIGHT: usize = 512;
/// How long the converse state remembers a decision, a status or an answered item: longer than
/// a button stays valid and than Meta keeps redelivering a webhook.
const STATE_RETENTION_MS: i64 = 8 * 24 * 3_600_000;
/// How often expired state entries are tombstoned.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);
/// How much longer an item waits when its deadline passes while the sent log is still behind.
const CATCH_UP_GRACE: Duration = Duration::from_secs(1);

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A webhook item waiting for the sent-log record of the message it refers to.
struct Waiting {
    record: Record,
    item: WebhookItem,
    deadline: Instant,
}

/// How the response and audit records are framed (settled at start-up, see
/// [`gridtalk_kafka::published`]).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Framings {
    pub responses: Framing,
    pub audit: Framing,
}

/// What the strategy and its publishing tasks share.
pub(crate) struct Publishing {
    pub config: Arc<Config>,
    pub producer: FutureProducer,
    pub framings: Framings,
    /// The stage its changelog entries belong to (`converse`, `decide`).
    pub stage: &'static str,
    /// When each state entry of each held webhook partition expires, for its tombstone.
    pub(crate) expiries: Mutex<HashMap<i32, HashMap<String, i64>>>,
    pub(crate) in_flight: Arc<Semaphore>,
    /// Signalled when a publication is acknowledged (room for more).
    pub(crate) room: Notify,
}

impl Publishing {
    pub(crate) fn new(
        config: Arc<Config>,
        producer: FutureProducer,
        stage: &'static str,
        framings: Framings,
    ) -> Self {
        Publishing {
            config,
            producer,
            framings,
            stage,
            expiries: Mutex::new(HashMap::new()),
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            room: Notify::new(),
        }
    }

    pub(crate) fn timeout(&self) -> Duration {
        Duration::from_millis(self.config.kafka.request_timeout_ms)
    }
}

pub(crate) struct ConverseStrategy {
    publishing: Arc<Publishing>,
    conversations: Conversations,
    directory: SharedDirectory,
    join_wait: Duration,
    max_waiting: usize,
    /// Items per wamid they wait for, and their deadlines in order.
    waiting: HashMap<String, Vec<Waiting>>,
    deadlines: BTreeSet<(Instant, u64, String)>,
    waiting_count: usize,
    next_seq: u64,
    /// Webhook partitions whose state is restored.
    restored: HashSet<i32>,
    /// Per sent-log partition: (offset after the last record applied, end at the assignment).
    sent_progress: HashMap<i32, (i64, i64)>,
    /// Response ids found on the response topic at the last takeovers, with when they were
    /// read: a replayed item whose response is among them is not published again.
    published: Arc<Mutex<HashMap<String, i64>>>,
    tasks: JoinSet<()>,
    sweep: tokio::time::Interval,
}

impl ConverseStrategy {
    pub(crate) fn new(
        publishing: Arc<Publishing>,
        conversations: Conversations,
        directory: SharedDirectory,
    ) -> Self {
        let config = &publishing.config;
        let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ConverseStrategy {
            join_wait: Duration::from_millis(config.converse.join_wait_ms),
            max_waiting: config.converse.max_waiting.max(1),
            publishing,
            conversations,
            directory,
            waiting: HashMap::new(),
            deadlines: BTreeSet::new(),
            waiting_count: 0,
            next_seq: 0,
            restored: HashSet::new(),
            sent_progress: HashMap::new(),
            published: Arc::new(Mutex::new(HashMap::new())),
            tasks: JoinSet::new(),
            sweep,
        }
    }

    fn sent_topic(&self) -> &str {
        &self.publishing.config.topics.sent
    }

    /// Whether the sent log of `partition` has been read to the end it had when assigned.
    fn sent_caught_up(&self, partition: i32) -> bool {
        self.sent_progress
            .get(&partition)
            .is_none_or(|(read, end)| read >= end)
    }

    /// Parks an item under the message it waits for, with a deadline entry unless it already
    /// has one (an item put back whose own deadline has not come yet).
    fn park(&mut self, wamid: String, w: Waiting) {
        self.next_seq += 1;
        self.deadlines
            .insert((w.deadline, self.next_seq, wamid.clone()));
        self.repark(wamid, w);
    }

    /// Sets the `converse_memory` gauge to what the conversations hold now: after every change
    /// of the state (a sent record, an item, a restore, a revoke, a sweep), so a revoked
    /// partition's entries leave the gauge with the partition, not a sweep later.
    fn count_memory(&self) {
        Metrics::global()
            .state_entries
            .with_label_values(&["converse_memory"])
            .set(self.conversations.len() as i64);
    }

    fn repark(&mut self, wamid: String, w: Waiting) {
        self.waiting.entry(wamid).or_default().push(w);
        self.waiting_count += 1;
        Metrics::global()
            .state_entries
            .with_label_values(&["converse_waiting"])
            .set(self.waiting_count as i64);
    }

    fn unpark(&mut self, wamid: &str) -> Vec<Waiting> {
        let items = self.waiting.remove(wamid).unwrap_or_default();
        self.waiting_count -= items.len();
        Metrics::global()
            .state_entries
            .with_label_values(&["converse_waiting"])
            .set(self.waiting_count as i64);
        items
    }

    /// Offers one item to the conversations and publishes what it produced, or parks it until
    /// the message it refers to shows up in the sent log. A full wait set judges it at once.
    fn offer(&mut self, w: Waiting, give_up: bool, permit: OwnedSemaphorePermit) {
        let give_up = give_up || (self.waiting_count >= self.max_waiting);
        let handled = {
            let directory = self.directory.read().expect("directory lock");
            self.conversations.handle(
                w.record.message.partition(),
                &w.item,
                &directory,
                now_ms(),
                give_up,
            )
        };
        self.count_memory();
        let metrics = Metrics::global();
        match handled {
            Handled::Wait { wamid } => {
                metrics.converse_items.with_label_values(&["waited"]).inc();
                self.park(wamid, w);
            }
            Handled::Done { outcome, outcomes } => {
                metrics.converse_items.with_label_values(&[outcome]).inc();
                let changes = self
                    .conversations
                    .take_changes()
                    .into_iter()
                    .map(StateChange::from)
                    .collect();
                let outcomes = with_clock_closes(outcomes);
                let Some(effect) = w.record.ticket.begin_effect() else {
                    // Revoked meanwhile: the new owner handles the item again.
                    return;
                };
                publish(
                    &self.publishing,
                    &self.published,
                    w.record,
                    &w.item.item_id,
                    outcomes,
                    changes,
                    (effect, permit),
                );
            }
        }
    }

    /// Items whose deadline passed: judged now (unknown message), unless the sent log of their
    /// partition is still behind, in which case they wait a little longer.
    fn expire_waiting(&mut self) {
        let now = Instant::now();
        while let Some((deadline, _, _)) = self.deadlines.first() {
            if *deadline > now {
                break;
            }
            let (_, _, wamid) = self.deadlines.pop_first().expect("first exists");
            for mut w in self.unpark(&wamid) {
                let partition = w.record.message.partition();
                if w.deadline > now {
                    self.repark(wamid.clone(), w);
                } else if !self.sent_caught_up(partition) {
                    w.deadline = now + CATCH_UP_GRACE;
                    self.park(wamid.clone(), w);
                } else {
                    match self.publishing.in_flight.clone().try_acquire_owned() {
                        Ok(permit) => self.offer(w, true, permit),
                        // No room for its publication now: try again shortly.
                        Err(_) => {
                            w.deadline = now + CATCH_UP_GRACE;
                            self.park(wamid.clone(), w);
                        }
                    }
                }
            }
        }
    }

    async fn restore(&mut self, webhook_partitions: Vec<i32>) -> Result<(), StageFailure> {
        let entries = restore_state(
            &self.publishing,
            &self.published,
            webhook_partitions.clone(),
            |key| !key.starts_with(crate::settle::KEY_PREFIX),
        )
        .await?;
        let now = now_ms();
        for (partition, restored) in entries {
            self.conversations.restore(partition, restored, now);
        }
        self.count_memory();
        self.restored.extend(webhook_partitions);
        Ok(())
    }
}

/// Restores `partitions` of the converse-state changelog for `publishing`'s stage, keeping the
/// keys `owns` accepts (the converse and settle strategies share the topic, each with its own
/// keys): their expiries are held for the sweep and the entries returned per partition. Then
/// `published` learns what reached the response topic within `converse.replay_lookback_ms` (what
/// a crash between the publication and the state left unrecorded).
pub(crate) async fn restore_state(
    publishing: &Publishing,
    published: &Mutex<HashMap<String, i64>>,
    partitions: Vec<i32>,
    owns: impl Fn(&str) -> bool,
) -> Result<HashMap<i32, Vec<(String, String)>>, StageFailure> {
    let config = &publishing.config;
    let entries = gridtalk_kafka::changelog::restore_for_stage(
        &config.kafka,
        publishing.stage,
        &config.topics.converse_state,
        partitions,
    )
    .await
    .map_err(|e| StageFailure(format!("{} state: {e}", publishing.stage)))?;
    let recent = recently_published(config)
        .await
        .map_err(|e| StageFailure(format!("response topic read: {e}")))?;
    let mut restored = HashMap::new();
    {
        let mut expiries = publishing.expiries.lock().expect("expiries");
        for (partition, partition_entries) in entries {
            let held = expiries.entry(partition).or_default();
            let mut kept = Vec::with_capacity(partition_entries.len());
            for (key, entry) in partition_entries {
                if owns(&key) {
                    held.insert(key.clone(), entry.expires_at_ms);
                    kept.push((key, String::from_utf8_lossy(&entry.value).into_owned()));
                }
            }
            restored.insert(partition, kept);
        }
    }
    let now = now_ms();
    let lookback = config.converse.replay_lookback_ms as i64;
    let mut known = published.lock().expect("published");
    known.retain(|_, read_at| *read_at >= now - lookback);
    known.extend(recent.into_iter().map(|id| (id, now)));
    Ok(restored)
}

impl Strategy for ConverseStrategy {
    async fn assigned(&mut self, partitions: &[TopicPartition]) -> Result<(), StageFailure> {
        let config = self.publishing.config.clone();
        let numbers_of = |topic: &str| -> Vec<i32> {
            partitions
                .iter()
                .filter(|(t, _)| t == topic)
                .map(|(_, p)| *p)
                .collect()
        };
        let sent = numbers_of(&config.topics.sent);
        if !sent.is_empty() {
            let ends = {
                let config = config.clone();
                tokio::task::spawn_blocking(move || {
                    gridtalk_kafka::end_offsets(&config.kafka, &config.topics.sent)
                })
                .await
                .map_err(|e| StageFailure(format!("sent log ends: {e}")))?
                .map_err(|e| StageFailure(format!("sent log ends: {e}")))?
            };
            for p in sent {
                self.sent_progress
                    .insert(p, (0, ends.get(&p).copied().unwrap_or(0)));
            }
        }
        let webhook = numbers_of(&config.topics.webhook);
        if !webhook.is_empty() {
            self.restore(webhook).await?;
        }
        Ok(())
    }

    fn revoked(&mut self, partitions: &[TopicPartition]) {
        let webhook = self.publishing.config.topics.webhook.clone();
        // Both topics' partition `p` hold the same contacts: their state leaves with either, once.
        let mut numbers: Vec<i32> = partitions.iter().map(|(_, p)| *p).collect();
        numbers.sort_unstable();
        numbers.dedup();
        for partition in numbers {
            self.conversations.drop_partition(partition, now_ms());
        }
        self.count_memory();
        for (topic, partition) in partitions {
            if *topic == webhook {
                // Restored again if it comes back (merging what its other owner wrote
                // meanwhile); its parked items are left to the new owner (uncommitted); its
                // entries are swept by the new owner.
                self.restored.remove(partition);
                self.publishing
                    .expiries
                    .lock()
                    .expect("expiries")
                    .remove(partition);
                let mut dropped = 0;
                self.waiting.retain(|_, items| {
                    let before = items.len();
                    items.retain(|w| w.record.message.partition() != *partition);
                    dropped += before - items.len();
                    !items.is_empty()
                });
                self.waiting_count -= dropped;
            } else {
                self.sent_progress.remove(partition);
            }
        }
    }

    fn submit(&mut self, record: Record) -> Submit {
        if record.message.topic() == self.sent_topic() {
            let partition = record.message.partition();
            if let Some(progress) = self.sent_progress.get_mut(&partition) {
                progress.0 = progress.0.max(record.message.offset() + 1);
            }
            let Some(sent) = record
                .message
                .payload()
                .and_then(|p| SentMessage::from_avro(p).ok())
            else {
                Metrics::global()
                    .converse_items
                    .with_label_values(&["unreadable_sent_record"])
                    .inc();
                tracing::warn!(
                    partition,
                    offset = record.message.offset(),
                    "sent-log record is not a SentMessage; skipped"
                );
                return Submit::Accepted;
            };
            self.conversations.apply_sent(partition, &sent);
            self.count_memory();
            for w in self.unpark(&sent.wamid) {
                match self.publishing.in_flight.clone().try_acquire_owned() {
                    Ok(permit) => self.offer(w, false, permit),
                    Err(_) => {
                        // Judged at its deadline, or as soon as there is room.
                        let wamid = sent.wamid.clone();
                        let w = Waiting {
                            deadline: Instant::now(),
                            ..w
                        };
                        self.park(wamid, w);
                    }
                }
            }
            return Submit::Accepted;
        }
        let Ok(permit) = self.publishing.in_flight.clone().try_acquire_owned() else {
            return Submit::PushBack(record);
        };
        let Some((item, record, permit)) = read_or_dead_letter(
            &self.publishing,
            &mut self.tasks,
            (record, permit),
            DeadLetterReason::MalformedWebhookItem,
            WebhookItem::from_json,
        ) else {
            return Submit::Accepted;
        };
        let w = Waiting {
            record,
            item,
            deadline: Instant::now() + self.join_wait,
        };
        self.offer(w, false, permit);
        Submit::Accepted
    }

    async fn poll(&mut self) -> Result<(), StageFailure> {
        let next_deadline = self.deadlines.first().map(|(d, _, _)| *d);
        tokio::select! {
            Some(ended) = self.tasks.join_next() => match ended {
                Err(e) if e.is_panic() => Err(StageFailure(format!("a converse task panicked: {e}"))),
                _ => Ok(()),
            },
            _ = self.publishing.room.notified() => Ok(()),
            _ = sleep_until(next_deadline) => {
                self.expire_waiting();
                Ok(())
            }
            _ = self.sweep.tick() => {
                sweep_state(&self.publishing);
                self.conversations.evict(now_ms());
                self.count_memory();
                Ok(())
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// One change of a converse-state changelog entry: a value kept for the state's usual retention
/// (or until `expires_at_ms`), or a tombstone.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StateChange {
    pub key: String,
    pub value: Option<String>,
    pub expires_at_ms: Option<i64>,
}

impl From<(String, String)> for StateChange {
    fn from((key, value): (String, String)) -> Self {
        StateChange {
            key,
            value: Some(value),
            expires_at_ms: None,
        }
    }
}

impl From<gridtalk_clock::Change> for StateChange {
    fn from(change: gridtalk_clock::Change) -> Self {
        StateChange {
            key: change.key,
            value: change.value,
            expires_at_ms: Some(change.expires_at_ms),
        }
    }
}

/// Who learns that a publication is durable: the record it was made for (its ticket), or, for
/// what a partition's own timers made, the stage (which fails if the publication does).
pub(crate) enum Completion {
    Record(Ticket),
    Timer(gridtalk_kafka::driver::Supervisor),
}

impl Completion {
    fn finish(self) {
        if let Completion::Record(ticket) = self {
            ticket.finish();
        }
    }

    fn fail(self, detail: String) {
        match self {
            Completion::Record(ticket) => ticket.fail(detail),
            Completion::Timer(supervisor) => supervisor.fail(detail),
        }
    }
}

/// What a publication holds until it is durable: the partition's effect, and a place among the
/// publications in flight (timers take none).
pub(crate) type Held = (
    gridtalk_kafka::driver::EffectGuard,
    Option<OwnedSemaphorePermit>,
);

/// Enqueues every outcome of a record now (keeping order), then, in a task, finishes it once all
/// are acknowledged and its state changes are durable.
pub(crate) fn publish(
    publishing: &Arc<Publishing>,
    published: &Mutex<HashMap<String, i64>>,
    record: Record,
    item_id: &str,
    outcomes: Vec<Outcome>,
    changes: Vec<StateChange>,
    (effect, permit): (gridtalk_kafka::driver::EffectGuard, OwnedSemaphorePermit),
) {
    let partition = record.message.partition();
    publish_for(
        publishing,
        published,
        (partition, Completion::Record(record.ticket)),
        item_id,
        outcomes,
        changes,
        (effect, Some(permit)),
    );
}

/// [`publish`] for a partition: outcomes enqueued in order, then (in a task) acknowledged, then
/// the state changes written to the partition's changelog and acknowledged, then `completion`.
pub(crate) fn publish_for(
    publishing: &Arc<Publishing>,
    published: &Mutex<HashMap<String, i64>>,
    (partition, completion): (i32, Completion),
    item_id: &str,
    outcomes: Vec<Outcome>,
    changes: Vec<StateChange>,
    held: Held,
) {
    let metrics = Metrics::global();
    let topics = &publishing.config.topics;
    let mut deliveries = Vec::with_capacity(outcomes.len());
    let mut observed: Vec<gridtalk_summary::Observed> = Vec::new();
    for outcome in &outcomes {
        let (topic, key, bytes, headers) = match outcome {
            Outcome::Response(r)
                if published
                    .lock()
                    .expect("published")
                    .contains_key(&r.response_id) =>
            {
                metrics
                    .converse_items
                    .with_label_values(&["response_already_published"])
                    .inc();
                tracing::debug!(response_id = %r.response_id, "replayed item's response already on the topic; not published again");
                continue;
            }
            Outcome::Response(r) => {
                metrics
                    .responses
                    .with_label_values(&[&r.response_type])
                    .inc();
                observed.extend(summary_observations(&publishing.config, r));
                if r.response_type == "wa.message.status" {
                    tracing::debug!(request = r.request_id.as_deref().unwrap_or("-"), correlation_id = %r.correlation_id, "delivery status published");
                } else {
                    tracing::debug!(
                        response_type = %r.response_type,
                        request = r.request_id.as_deref().unwrap_or("-"),
                        correlation_id = %r.correlation_id,
                        "response published"
                    );
                }
                (
                    &topics.responses,
                    r.correlation_id.clone(),
                    r.encode(publishing.framings.responses),
                    OwnedHeaders::new().insert(Header {
                        key: "gridtalk.response_type",
                        value: Some(r.response_type.as_bytes()),
                    }),
                )
            }
            Outcome::Audit(a) => {
                metrics
                    .refusals
                    .with_label_values(&[STAGE, &a.reason])
                    .inc();
                tracing::warn!(
                    reason = %a.reason,
                    detail = %gridtalk_telemetry::redact(&a.detail),
                    request = a.request_id.as_deref().unwrap_or("-"),
                    "inbound refused"
                );
                (
                    &topics.audit,
                    a.request_id
                        .clone()
                        .or_else(|| a.wa_id.clone())
                        .unwrap_or_default(),
                    a.encode(publishing.framings.audit),
                    OwnedHeaders::new().insert(Header {
                        key: "gridtalk.audit.reason",
                        value: Some(a.reason.as_bytes()),
                    }),
                )
            }
            Outcome::Candidate(c) => {
                metrics
                    .converse_items
                    .with_label_values(&["candidate_forwarded"])
                    .inc();
                (
                    &topics.decisions,
                    c.request_key(),
                    c.to_json(),
                    OwnedHeaders::new().insert(Header {
                        key: "gridtalk.action",
                        value: Some(c.action.as_bytes()),
                    }),
                )
            }
            Outcome::Outbox(o) => outbox_record(&topics.outbox, o),
            Outcome::Clock(command) => {
                metrics
                    .clock_commands
                    .with_label_values(&[command.name()])
                    .inc();
                (
                    &topics.decisions,
                    command.key().to_string(),
                    command.to_json(),
                    OwnedHeaders::new().insert(Header {
                        key: "gridtalk.clock",
                        value: Some(command.name().as_bytes()),
                    }),
                )
            }
            Outcome::Billed {
                response_id,
                category,
                flow,
            } => {
                // Counted with its status response: once, not again on a replay.
                if !published
                    .lock()
                    .expect("published")
                    .contains_key(response_id)
                {
                    metrics
                        .billable_messages
                        .with_label_values(&[category.as_str(), flow])
                        .inc();
                }
                continue;
            }
            Outcome::Reply(o) => {
                let form = if o.template_name.is_some() {
                    "template"
                } else {
                    "text"
                };
                metrics
                    .confirmations
                    .with_label_values(&[o.event_type.trim_start_matches("gridtalk.answer."), form])
                    .inc();
                // First the person's message marked read with the typing indicator: the same
                // outbox partition, so the send stage does it before the confirmation.
                if publishing.config.converse.mark_read {
                    let mark = outbox_record(&topics.outbox, &crate::conversation::read_mark(o));
                    if let Err(e) = enqueue(&publishing.producer, mark, &mut deliveries) {
                        return completion.fail(format!("read mark for item {item_id}: {e}"));
                    }
                }
                outbox_record(&topics.outbox, o)
            }
        };
        if let Err(e) = enqueue(
            &publishing.producer,
            (topic, key, bytes, headers),
            &mut deliveries,
        ) {
            return completion.fail(format!("publish for item {item_id}: {e}"));
        }
    }
    // What the responses tell the computed summaries, to the owner of each summary's scope.
    for o in &observed {
        let bytes = o.to_json();
        let key = o.key();
        let produced = FutureRecord::to(&topics.decisions)
            .key(&key)
            .payload(&bytes)
            .headers(OwnedHeaders::new().insert(Header {
                key: "gridtalk.summary",
                value: Some(o.summary.as_bytes()),
            }));
        match publishing.producer.send_result(produced) {
            Ok(delivery) => deliveries.push(delivery),
            Err((e, _)) => {
                return completion.fail(format!("summary observation for item {item_id}: {e}"))
            }
        }
    }
    let publishing = publishing.clone();
    // The state changes go to the changelog only once the records they account for are durable:
    // a crash in between replays the item, which is then answered again (same response id)
    // rather than remembered as answered and lost.
    tokio::spawn(async move {
        let _held = held;
        if let Err(e) = gridtalk_kafka::acknowledged(deliveries).await {
            return completion.fail(format!("response publish: {e}"));
        }
        let retained = now_ms() + STATE_RETENTION_MS;
        let mut written = Vec::with_capacity(changes.len());
        for change in &changes {
            let expires = change.expires_at_ms.unwrap_or(retained);
            match gridtalk_kafka::changelog::write(
                &publishing.producer,
                &publishing.config.topics.converse_state,
                partition,
                &change.key,
                change.value.as_ref().map(|v| (v.as_bytes(), expires)),
            ) {
                Ok(delivery) => written.push(delivery),
                Err(e) => return completion.fail(format!("converse state: {e}")),
            }
        }
        if let Some(held) = publishing
            .expiries
            .lock()
            .expect("expiries")
            .get_mut(&partition)
        {
            for change in &changes {
                match change.value {
                    Some(_) => {
                        held.insert(change.key.clone(), change.expires_at_ms.unwrap_or(retained));
                    }
                    None => {
                        held.remove(&change.key);
                    }
                }
            }
        }
        match gridtalk_kafka::acknowledged(written).await {
            Ok(()) => completion.finish(),
            Err(e) => completion.fail(format!("converse state: {e}")),
        }
        publishing.room.notify_one();
    });
}

/// What a published response tells each configured summary, one record per summary scope.
fn summary_observations(
    config: &gridtalk_config::Config,
    response: &gridtalk_contract::WorkflowResponse,
) -> Vec<gridtalk_summary::Observed> {
    gridtalk_route::per_summary(
        config,
        response.partner_id.as_deref().unwrap_or_default(),
        response.received_at,
        gridtalk_summary::from_response(response),
    )
}

/// An outbox message as its record: keyed by the sending number, with its event and message ids
/// in the headers.
/// Hands one record to the producer; its acknowledgement joins `deliveries`.
fn enqueue(
    producer: &rdkafka::producer::FutureProducer,
    (topic, key, bytes, headers): (&String, String, Vec<u8>, OwnedHeaders),
    deliveries: &mut Vec<rdkafka::producer::DeliveryFuture>,
) -> Result<(), rdkafka::error::KafkaError> {
    let produced = FutureRecord::to(topic)
        .key(&key)
        .payload(&bytes)
        .headers(headers);
    let delivery = producer.send_result(produced).map_err(|(e, _)| e)?;
    deliveries.push(delivery);
    Ok(())
}

fn outbox_record<'t>(
    topic: &'t String,
    o: &gridtalk_contract::OutboxMessage,
) -> (&'t String, String, Vec<u8>, OwnedHeaders) {
    let mut headers = OwnedHeaders::new()
        .insert(Header {
            key: "gridtalk.event_id",
            value: Some(o.event_id.as_bytes()),
        })
        .insert(Header {
            key: "gridtalk.message_id",
            value: Some(o.message_id.as_bytes()),
        });
    if let Some(fallback) = &o.fallback_request_json {
        headers = headers.insert(Header {
            key: gridtalk_contract::FALLBACK_HEADER,
            value: Some(fallback.as_bytes()),
        });
    }
    (topic, o.phone_number_id.clone(), o.to_avro(), headers)
}

/// The ids of the responses published within `converse.replay_lookback_ms`, in either framing.
async fn recently_published(config: &Arc<Config>) -> Result<Vec<String>, KafkaError> {
    let payloads = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || {
            let since = now_ms() - config.converse.replay_lookback_ms as i64;
            gridtalk_kafka::changelog::recent_payloads(
                &config.kafka,
                &config.topics.responses,
                since,
                gridtalk_kafka::ADMIN_TIMEOUT,
            )
        })
        .await
        .map_err(|e| KafkaError::Restore(format!("response topic read: {e}")))??
    };
    let registry = gridtalk_kafka::published::registry_client(&config.contract);
    let mut ids = Vec::with_capacity(payloads.len());
    for payload in &payloads {
        match WorkflowResponse::decode(payload, registry.as_ref()).await {
            Ok(response) => ids.push(response.response_id),
            Err(e) => {
                tracing::debug!(error = %e, "a record on the response topic is not a response gridtalk can read")
            }
        }
    }
    Ok(ids)
}

/// Deletes expired state entries of the held partitions from the changelog (tombstones), so it
/// stays bounded; an entry whose tombstone is lost is dropped on restore anyway.
pub(crate) fn sweep_state(publishing: &Publishing) {
    let now = now_ms();
    let mut expiries = publishing.expiries.lock().expect("expiries");
    let mut live = 0;
    for (partition, entries) in expiries.iter_mut() {
        entries.retain(|key, expires_at| {
            if *expires_at > now {
                return true;
            }
            if let Err(e) = gridtalk_kafka::changelog::write(
                &publishing.producer,
                &publishing.config.topics.converse_state,
                *partition,
                key,
                None,
            ) {
                tracing::warn!(error = %e, "converse state tombstone not written; the entry expires on restore");
            }
            false
        });
        live += entries.len();
    }
    Metrics::global()
        .state_entries
        .with_label_values(&["converse"])
        .set(live as i64);
}

/// The record's value as `parse` reads it, or none when it cannot: then the record is
/// dead-lettered with `reason` (its permit held until the letter is written).
pub(crate) fn read_or_dead_letter<T>(
    publishing: &Arc<Publishing>,
    tasks: &mut JoinSet<()>,
    (record, permit): (Record, OwnedSemaphorePermit),
    reason: DeadLetterReason,
    parse: impl FnOnce(&[u8]) -> Result<T, String>,
) -> Option<(T, Record, OwnedSemaphorePermit)> {
    let detail = match record.message.payload().map(parse) {
        Some(Ok(value)) => return Some((value, record, permit)),
        Some(Err(detail)) => detail,
        None => "record has no value".into(),
    };
    spawn_dead_letter(publishing, tasks, record, (reason, detail), permit);
    None
}

fn spawn_dead_letter(
    publishing: &Arc<Publishing>,
    tasks: &mut JoinSet<()>,
    record: Record,
    (reason, detail): (DeadLetterReason, String),
    permit: OwnedSemaphorePermit,
) {
    tracing::warn!(error = %gridtalk_telemetry::redact(&detail), offset = record.message.offset(), reason = reason.as_str(), "record unreadable; dead-lettered");
    let Some(effect) = record.ticket.begin_effect() else {
        return;
    };
    let publishing = publishing.clone();
    tasks.spawn(async move {
        let _held = (effect, permit);
        let Record { message, ticket } = record;
        let result = dead_letter(
            &publishing.producer,
            &publishing.config.topics.dlq,
            publishing.stage,
            reason,
            &detail,
            &message,
            &[],
            publishing.timeout(),
        )
        .await;
        finish_or_fail(ticket, result.map_err(|e| format!("dead letter: {e}")));
        publishing.room.notify_one();
    });
}

fn finish_or_fail(ticket: Ticket, result: Result<(), String>) {
    match result {
        Ok(()) => ticket.finish(),
        Err(e) => ticket.fail(e),
    }
}
