//! The stage driver: one consumer loop for every consuming stage.
//!
//! A stage is a [`Strategy`]; the driver owns everything else: the group consumer, polling,
//! pausing, offsets, commits, rebalances, supervision and shutdown. The shape is rust-arroyo's
//! (`submit` may hand the record back, `poll` makes progress, a revoke drains before it commits),
//! made asynchronous and per partition.
//!
//! Guarantees:
//! - **The consumer is never starved.** A dedicated thread calls `poll` every few milliseconds
//!   whatever the stage does (see `consumer.rs`): heartbeats, rebalances and
//!   `max.poll.interval.ms` never depend on the stage's pace, so a slow recipient, a halted number
//!   or a registry outage can never make the process leave its group.
//! - **Back-pressure pauses, it does not block.** When the stage hands a record back, the driver
//!   keeps it, pauses that record's partition and offers it again after the stage's next
//!   [`Strategy::poll`]; the partition resumes once its held records are accepted. Other
//!   partitions keep flowing.
//! - **Offsets are promises.** A record's offset is committed only once its [`Ticket`] is
//!   finished and every earlier record of the partition is finished too.
//! - **Revoke drains, then commits.** No effect of a revoked partition may begin after the revoke
//!   started; effects already begun get the drain deadline to finish; the partition's position is
//!   committed synchronously before librdkafka gives it up.
//! - **Failures are loud.** A ticket dropped unfinished (a panicked task), a failed hand-off
//!   ([`Ticket::fail`], [`Supervisor::fail`]), a fatal client error or a panic in the strategy
//!   ends [`Driver::run`] with an error, so the process exits non-zero and is restarted; the
//!   stage's readiness flag is false from that moment. It is also false while state is restored
//!   and while no broker is reachable; back-pressure alone never clears it.
//! - **Shutdown is a revoke of everything**: stop beginning effects, drain them up to the
//!   shutdown deadline, commit, leave the group.

mod consumer;
mod ledger;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::TopicPartitionList;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use gridtalk_config::KafkaConfig;

use crate::{client_config, KafkaError};
use consumer::{DriverContext, Event};
pub use ledger::{EffectGuard, Supervisor, Ticket, TopicPartition};

/// A record handed to a stage, with its claim on the partition's progress.
#[derive(Debug)]
pub struct Record {
    pub message: OwnedMessage,
    pub ticket: Ticket,
}

/// A stage's answer to a record offered to it.
#[must_use]
#[derive(Debug)]
pub enum Submit {
    /// The stage owns the record now (and its ticket).
    Accepted,
    /// No room now: the driver keeps the record, pauses its partition and offers it again after
    /// the stage's next `poll`.
    PushBack(Record),
}

/// Why a stage cannot go on; the driver stops and returns it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct StageFailure(pub String);

/// A stage's logic, plugged into the [`Driver`]. It never sees the consumer.
///
/// The driver calls these from one task, one at a time. Work a stage spawns holds the records'
/// tickets; a ticket finished is an offset that may be committed.
pub trait Strategy: Send {
    /// `partitions` were assigned: restore their state. Their records are held back until this
    /// returns; an error fails the stage.
    fn assigned(
        &mut self,
        partitions: &[TopicPartition],
    ) -> impl Future<Output = Result<(), StageFailure>> + Send;

    /// `partitions` were revoked (or the stage is stopping): drop their state and queued work.
    /// No effect of theirs can begin any more; effects already begun are awaited by the driver.
    fn revoked(&mut self, partitions: &[TopicPartition]);

    /// Offers a record. Handing it back is back-pressure: the driver pauses the partition and
    /// offers the record again after the next [`Strategy::poll`].
    fn submit(&mut self, record: Record) -> Submit;

    /// Waits for and makes the stage's own progress: timers, completions, capacity freed. It
    /// must be cancel-safe (the driver drops it when a record or a rebalance arrives) and return
    /// whenever capacity may have been freed, so held records are offered again.
    fn poll(&mut self) -> impl Future<Output = Result<(), StageFailure>> + Send;
}

/// Which assignor the group uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Assignment {
    /// Incremental rebalances: a rebalance moves only the partitions that change owner.
    CooperativeSticky,
    /// Same partition numbers of every subscribed topic on one member (co-partitioned joins).
    Range,
}

/// What a driver consumes and how.
#[derive(Debug, Clone)]
pub struct DriverSettings {
    pub stage: &'static str,
    pub group_id: String,
    pub topics: Vec<String>,
    /// Topics whose offsets are never committed: read from their start on every assignment.
    pub untracked_topics: Vec<String>,
    pub assignment: Assignment,
    /// How long a revoke waits for the revoked partitions' effects before it warns.
    pub drain_deadline: Duration,
    /// How long a revoke waits in all for effects already begun (they cannot be recalled, so
    /// leaving one lets the next owner repeat it); beyond it they are left to the next owner.
    pub drain_limit: Duration,
    /// How long shutdown waits for every effect.
    pub shutdown_deadline: Duration,
    /// Where a partition with no committed offset starts: `earliest` (every record the topic
    /// still holds) or `latest` (only what arrives from now on).
    pub offset_reset: OffsetReset,
}

/// librdkafka's `auto.offset.reset` for a group without a committed offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetReset {
    Earliest,
    Latest,
}

impl DriverSettings {
    /// A stage's usual settings: group `<group_prefix>-<stage>`, cooperative-sticky, every topic
    /// committed, the configured revoke drain and shutdown deadlines.
    pub fn for_stage(
        config: &gridtalk_config::Config,
        stage: &'static str,
        topics: Vec<String>,
    ) -> Self {
        DriverSettings {
            stage,
            group_id: format!("{}-{stage}", config.kafka.group_prefix),
            topics,
            untracked_topics: Vec::new(),
            assignment: Assignment::CooperativeSticky,
            drain_deadline: Duration::from_millis(config.kafka.revoke_drain_ms),
            drain_limit: drain_limit(&config.kafka),
            shutdown_deadline: Duration::from_millis(config.admin.shutdown_deadline_ms),
            offset_reset: OffsetReset::Earliest,
        }
    }
}

/// How long a revoke waits in all for begun effects. Every begun effect ends within the delivery
/// timeout (a produce is acknowledged or failed by then, and a send's HTTP request times out well
/// before it), but the member must not block its rebalance callback past
/// `max.poll.interval.ms`, or the group expels it: a tenth of that is kept in hand.
fn drain_limit(kafka: &KafkaConfig) -> Duration {
    let poll_bound = u64::from(kafka.max_poll_interval_ms) / 10 * 9;
    Duration::from_millis(
        kafka
            .delivery_timeout_ms
            .min(poll_bound)
            .max(kafka.revoke_drain_ms),
    )
}

/// The records a partition holds back while the stage pushes back, and its pause state.
#[derive(Debug, Default)]
struct Held {
    records: VecDeque<Record>,
    /// Records that arrived but were not offered yet (no ticket until they are).
    arrived: VecDeque<OwnedMessage>,
    /// Pushed back since the stage's last `poll`: not offered again before the next.
    blocked: bool,
    paused: bool,
}

/// One stage's consumer loop. See the module docs.
pub struct Driver {
    settings: DriverSettings,
    consumer: Arc<BaseConsumer<DriverContext>>,
    ledger: Arc<ledger::Ledger>,
    events: mpsc::UnboundedReceiver<Event>,
    health: Arc<consumer::Health>,
    #[cfg(feature = "fault-injection")]
    panic_at: Option<(String, i32, i64)>,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("stage", &self.settings.stage)
            .finish_non_exhaustive()
    }
}

impl Driver {
    /// Creates the group consumer and subscribes. `ready` is the stage's readiness flag: the
    /// driver sets it while the stage runs, and clears it while state is restored, while no
    /// broker is reachable, and from a failure on. Back-pressure never clears it.
    pub fn new(
        config: &KafkaConfig,
        settings: DriverSettings,
        ready: Arc<AtomicBool>,
    ) -> Result<Self, KafkaError> {
        let ledger = ledger::Ledger::new(settings.untracked_topics.iter().cloned());
        let (tx, events) = mpsc::unbounded_channel();
        let health = Arc::new(consumer::Health::new(ready));
        let context = DriverContext {
            stage: settings.stage,
            ledger: ledger.clone(),
            events: tx,
            drain_deadline: settings.drain_deadline,
            drain_limit: settings.drain_limit.max(settings.drain_deadline),
            health: health.clone(),
        };
        let assignor = match settings.assignment {
            Assignment::CooperativeSticky => "cooperative-sticky",
            Assignment::Range => "range",
        };
        let consumer: BaseConsumer<DriverContext> = client_config(config)
            .set("group.id", &settings.group_id)
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "1000")
            .set("enable.auto.offset.store", "false")
            .set(
                "auto.offset.reset",
                match settings.offset_reset {
                    OffsetReset::Earliest => "earliest",
                    OffsetReset::Latest => "latest",
                },
            )
            .set("partition.assignment.strategy", assignor)
            .set("session.timeout.ms", config.session_timeout_ms.to_string())
            .set(
                "heartbeat.interval.ms",
                config.heartbeat_interval_ms.to_string(),
            )
            .set(
                "max.poll.interval.ms",
                config.max_poll_interval_ms.to_string(),
            )
            .set("statistics.interval.ms", "5000")
            .create_with_context(context)?;
        let topics: Vec<&str> = settings.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        Ok(Driver {
            #[cfg(feature = "fault-injection")]
            panic_at: fault_injection::panic_at(settings.stage),
            settings,
            consumer: Arc::new(consumer),
            ledger,
            events,
            health,
        })
    }

    /// For the stage's tasks that hold no record but can fail it.
    pub fn supervisor(&self) -> Supervisor {
        Supervisor {
            ledger: self.ledger.clone(),
        }
    }

    /// Runs `strategy` until `shutdown` is cancelled (Ok) or the stage fails (Err).
    pub async fn run<S: Strategy>(
        mut self,
        mut strategy: S,
        shutdown: CancellationToken,
    ) -> Result<(), StageFailure> {
        let stage = self.settings.stage;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (consumer, stop) = (self.consumer.clone(), stop.clone());
            std::thread::Builder::new()
                .name(format!("{stage}-consumer"))
                .spawn(move || consumer::poll_until_stopped(consumer, stop))
                .map_err(|e| StageFailure(format!("consumer thread: {e}")))?
        };
        // Stops the consumer thread however this function ends, a panic included.
        let _stop_thread = StopOnDrop(stop.clone());
        self.health.set_running(true);
        tracing::info!(stage, group = %self.settings.group_id, topics = ?self.settings.topics, "stage running");

        let mut held: HashMap<TopicPartition, Held> = HashMap::new();
        // A panic in the strategy fails the stage like any failure, so that what is already on
        // its way still finishes and is committed before the process exits; the strategy is not
        // called again after it panicked.
        let mut panicked = false;
        let outcome = loop {
            if let Err(e) = self.offer_held(&mut strategy, &mut held) {
                panicked = true;
                break Err(e);
            }
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break Ok(()),
                _ = self.ledger.failed() => break Err(StageFailure(self.ledger.failure().unwrap_or_default())),
                event = self.events.recv() => match event {
                    None => break Err(StageFailure("the consumer thread ended".into())),
                    Some(Event::Fatal(detail)) => break Err(StageFailure(format!("fatal Kafka client error: {detail}"))),
                    Some(Event::Record(message)) => {
                        let tp = (message.topic().to_string(), message.partition());
                        // A record polled just before its partition was revoked belongs to the
                        // next owner.
                        if self.ledger.is_assigned(&tp) {
                            held.entry(tp).or_default().arrived.push_back(message);
                        }
                    }
                    Some(Event::Revoked(partitions)) => {
                        for tp in &partitions {
                            // Dropped records were never offered or are left for the new owner.
                            held.remove(tp);
                        }
                        if let Err(e) = guarded("revoked", || strategy.revoked(&partitions)) {
                            panicked = true;
                            break Err(e);
                        }
                    }
                    Some(Event::Assigned(partitions)) => {
                        // Not ready while state is restored (processing resumes only after it).
                        self.health.set_restoring(true);
                        // A restore is not waited out when the stage stops or fails meanwhile.
                        let restored = tokio::select! {
                            biased;
                            _ = shutdown.cancelled() => break Ok(()),
                            _ = self.ledger.failed() => break Err(StageFailure(self.ledger.failure().unwrap_or_default())),
                            restored = AssertUnwindSafe(strategy.assigned(&partitions)).catch_unwind() => match restored {
                                Ok(restored) => restored,
                                Err(panic) => {
                                    panicked = true;
                                    break Err(panic_failure("assigned", panic));
                                }
                            },
                        };
                        if let Err(e) = restored {
                            break Err(e);
                        }
                        // Only those still assigned: a revoke may have come meanwhile.
                        let still: Vec<TopicPartition> = partitions
                            .into_iter()
                            .filter(|tp| self.ledger.is_assigned(tp))
                            .collect();
                        resume(stage, &self.consumer, &still);
                        self.health.set_restoring(false);
                    }
                },
                polled = AssertUnwindSafe(strategy.poll()).catch_unwind() => {
                    match polled {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => break Err(e),
                        Err(panic) => {
                            panicked = true;
                            break Err(panic_failure("poll", panic));
                        }
                    }
                    for h in held.values_mut() {
                        h.blocked = false;
                    }
                }
            }
        };
        self.health.set_running(false);
        if let Err(e) = &outcome {
            tracing::error!(stage, error = %e.0, "stage failed; committing what finished and stopping");
        }

        // Shutdown (or failure) is a revoke of everything.
        let partitions = self.ledger.begin_stopping();
        held.clear();
        if !panicked {
            let _ = guarded("revoked", || strategy.revoked(&partitions));
        }
        let deadline = Instant::now() + self.settings.shutdown_deadline;
        let drained = {
            let (ledger, partitions) = (self.ledger.clone(), partitions.clone());
            tokio::task::spawn_blocking(move || ledger.wait_effects(&partitions, deadline))
                .await
                .unwrap_or(false)
        };
        if !drained {
            tracing::warn!(
                stage,
                "shutdown deadline passed; unfinished records will be replayed"
            );
        }
        let mut positions = self.ledger.take_positions();
        positions.extend(self.ledger.release(&partitions));
        stop.store(true, Ordering::Release);
        let consumer = self.consumer.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let _ = thread.join();
            consumer::commit(stage, &consumer, &positions);
            consumer.unsubscribe();
        })
        .await;
        // A failure found while draining (a hand-off that failed) still counts.
        match (outcome, self.ledger.failure()) {
            (Ok(()), Some(detail)) => Err(StageFailure(detail)),
            (outcome, _) => {
                if outcome.is_ok() {
                    tracing::info!(stage, "{stage} stage stopped");
                }
                outcome
            }
        }
    }

    /// Offers held records, oldest first per partition, until the stage pushes back; pauses a
    /// partition that is pushed back and resumes one whose held records were all accepted.
    fn offer_held<S: Strategy>(
        &self,
        strategy: &mut S,
        held: &mut HashMap<TopicPartition, Held>,
    ) -> Result<(), StageFailure> {
        let stage = self.settings.stage;
        for (tp, h) in held.iter_mut() {
            if h.blocked {
                continue;
            }
            loop {
                let record = match h.records.pop_front() {
                    Some(record) => record,
                    None => match h.arrived.pop_front() {
                        None => break,
                        Some(message) => {
                            let Some(ticket) = self.ledger.start(tp, message.offset()) else {
                                h.arrived.clear();
                                break;
                            };
                            Record { message, ticket }
                        }
                    },
                };
                let submitted = guarded("submit", || {
                    #[cfg(feature = "fault-injection")]
                    fault_injection::maybe_panic(&self.panic_at, &record);
                    strategy.submit(record)
                })?;
                if let Submit::PushBack(record) = submitted {
                    h.records.push_front(record);
                    h.blocked = true;
                    if !h.paused {
                        h.paused = true;
                        pause(stage, &self.consumer, tp);
                    }
                    break;
                }
            }
            if !h.blocked && h.paused && h.records.is_empty() && h.arrived.is_empty() {
                h.paused = false;
                resume(stage, &self.consumer, std::slice::from_ref(tp));
            }
        }
        held.retain(|_, h| h.paused || !h.records.is_empty() || !h.arrived.is_empty());
        Ok(())
    }
}

/// Runs a strategy call, turning a panic into the stage's failure.
fn guarded<T>(call: &str, f: impl FnOnce() -> T) -> Result<T, StageFailure> {
    std::panic::catch_unwind(AssertUnwindSafe(f)).map_err(|panic| panic_failure(call, panic))
}

fn panic_failure(call: &str, panic: Box<dyn std::any::Any + Send>) -> StageFailure {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into());
    StageFailure(format!("the stage panicked in {call}: {message}"))
}

struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

fn pause(stage: &'static str, consumer: &BaseConsumer<DriverContext>, tp: &TopicPartition) {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(&tp.0, tp.1);
    match consumer.pause(&tpl) {
        Ok(()) => {
            tracing::debug!(stage, topic = %tp.0, partition = tp.1, "partition paused (back-pressure)")
        }
        Err(e) => tracing::debug!(stage, error = %e, "pause failed (partition revoked meanwhile)"),
    }
}

fn resume(stage: &'static str, consumer: &BaseConsumer<DriverContext>, tps: &[TopicPartition]) {
    if tps.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for (topic, partition) in tps {
        tpl.add_partition(topic, *partition);
    }
    if let Err(e) = consumer.resume(&tpl) {
        tracing::debug!(stage, error = %e, "resume failed (partition revoked meanwhile)");
    }
}

#[cfg(feature = "fault-injection")]
mod fault_injection {
    //! Test-only: `GRIDTALK_FAULT_PANIC_AT=stage:topic:partition:offset` makes the driver of
    //! `stage` panic when it is about to hand that record to the stage. Compiled only with the
    //! `fault-injection` feature, which production builds never enable.

    use rdkafka::Message;

    pub(super) fn panic_at(stage: &str) -> Option<(String, i32, i64)> {
        let spec = std::env::var("GRIDTALK_FAULT_PANIC_AT").ok()?;
        let mut parts = spec.split(':');
        if parts.next()? != stage {
            return None;
        }
        let topic = parts.next()?.to_string();
        Some((
            topic,
            parts.next()?.parse().ok()?,
            parts.next()?.parse().ok()?,
        ))
    }

    pub(super) fn maybe_panic(at: &Option<(String, i32, i64)>, record: &super::Record) {
        if let Some((topic, partition, offset)) = at {
            let m = &record.message;
            if m.topic() == topic && m.partition() == *partition && m.offset() == *offset {
                panic!("fault injection: panic on {topic}/{partition}@{offset}");
            }
        }
    }
}
