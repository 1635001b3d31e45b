//! The driver's consumer thread: the only caller of `poll`, so a stage can never starve it.
//!
//! The thread polls the group consumer every few milliseconds whatever the stage is doing, hands
//! records and rebalances to the driver loop over an unbounded channel (bounded in practice by
//! pausing: a partition whose records the stage pushes back is paused, and librdkafka then
//! delivers nothing more of it), stores the offsets the ledger found committable, and serves the
//! rebalance callbacks:
//!
//! - **assign**: the partitions start a new generation in the ledger and are paused at once; the
//!   driver loop resumes them once the stage has restored their state.
//! - **revoke**: no effect of the partitions may begin any more; the stage is told to drop their
//!   state; the thread waits (up to the drain deadline) for the effects already begun, then
//!   stores and synchronously commits the partitions' positions, and only then lets librdkafka
//!   give them up. Work that did not finish in time is left uncommitted for the next owner.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError as RdKafkaError;
use rdkafka::message::OwnedMessage;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::mpsc::UnboundedSender;

use super::ledger::{Ledger, TopicPartition};

/// What the consumer thread tells the driver loop, in the order it happened.
#[derive(Debug)]
pub(crate) enum Event {
    Record(OwnedMessage),
    /// Assigned and paused; resume once restored.
    Assigned(Vec<TopicPartition>),
    /// Revoked: drop their state (the thread is draining their effects meanwhile).
    Revoked(Vec<TopicPartition>),
    /// The client cannot go on (fatal librdkafka error).
    Fatal(String),
}

/// The stage's readiness, from what the driver knows: it is running (not stopping or failed), it
/// has joined its group (an assignment came, even an empty one: a wrong bootstrap address or
/// refused credentials never get that far), no restore is under way, and at least one broker is
/// reachable (per librdkafka's statistics and its all-brokers-down error). Back-pressure alone
/// never makes a stage unready.
#[derive(Debug)]
pub(crate) struct Health {
    ready: Arc<AtomicBool>,
    running: AtomicBool,
    joined: AtomicBool,
    restoring: AtomicBool,
    brokers_up: AtomicBool,
}

impl Health {
    pub(crate) fn new(ready: Arc<AtomicBool>) -> Self {
        Health {
            ready,
            running: AtomicBool::new(false),
            joined: AtomicBool::new(false),
            restoring: AtomicBool::new(false),
            brokers_up: AtomicBool::new(true),
        }
    }

    pub(crate) fn set_running(&self, running: bool) {
        self.running.store(running, Ordering::Release);
        self.refresh();
    }

    fn set_joined(&self, stage: &'static str) {
        if !self.joined.swap(true, Ordering::AcqRel) {
            tracing::info!(stage, "joined the consumer group");
        }
        self.refresh();
    }

    pub(crate) fn set_restoring(&self, restoring: bool) {
        self.restoring.store(restoring, Ordering::Release);
        self.refresh();
    }

    fn set_brokers_up(&self, stage: &'static str, up: bool) {
        if self.brokers_up.swap(up, Ordering::AcqRel) != up {
            if up {
                tracing::warn!(stage, "a broker is reachable again; ready");
            } else {
                tracing::error!(stage, "no broker is reachable; not ready");
            }
        }
        self.refresh();
    }

    fn refresh(&self) {
        let ready = self.running.load(Ordering::Acquire)
            && self.joined.load(Ordering::Acquire)
            && !self.restoring.load(Ordering::Acquire)
            && self.brokers_up.load(Ordering::Acquire);
        self.ready.store(ready, Ordering::Release);
    }
}

/// The consumer's context: rebalance callbacks, commit errors, broker reachability and the lag
/// gauge.
pub(crate) struct DriverContext {
    pub(crate) stage: &'static str,
    pub(crate) ledger: Arc<Ledger>,
    pub(crate) events: UnboundedSender<Event>,
    pub(crate) drain_deadline: Duration,
    pub(crate) drain_limit: Duration,
    pub(crate) health: Arc<Health>,
}

impl ClientContext for DriverContext {
    /// Consumer lag of the partitions assigned here, from librdkafka's statistics.
    fn stats(&self, statistics: rdkafka::Statistics) {
        let up = statistics
            .brokers
            .values()
            .any(|b| b.nodeid >= 0 && b.state == "UP");
        self.health.set_brokers_up(self.stage, up);
        let lag = &gridtalk_telemetry::Metrics::global().consumer_lag;
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                // Partition -1 is librdkafka's internal queue; -1 lag means unknown. Only
                // partitions held here: a moved partition's series is removed on revoke and must
                // not come back from a report that was already underway.
                if *partition >= 0
                    && p.consumer_lag >= 0
                    && self.ledger.is_assigned(&(topic.clone(), *partition))
                {
                    lag.with_label_values(&[self.stage, topic, &partition.to_string()])
                        .set(p.consumer_lag);
                }
            }
        }
    }

    fn error(&self, error: RdKafkaError, reason: &str) {
        if matches!(
            error.rdkafka_error_code(),
            Some(RDKafkaErrorCode::AllBrokersDown)
        ) {
            self.health.set_brokers_up(self.stage, false);
        }
        // The error is part of the message so that the log's repeat limit (one line per
        // distinct message a minute) keeps distinct errors apart.
        tracing::warn!(stage = self.stage, reason, "Kafka client error: {error}");
    }
}

fn partitions(tpl: &TopicPartitionList) -> Vec<TopicPartition> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect()
}

impl ConsumerContext for DriverContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let revoked = partitions(tpl);
                if revoked.is_empty() {
                    return;
                }
                tracing::info!(stage = self.stage, partitions = ?revoked, "partitions revoked; draining");
                self.ledger.begin_drain(&revoked);
                let _ = self.events.send(Event::Revoked(revoked.clone()));
                let started = Instant::now();
                let mut drained = self
                    .ledger
                    .wait_effects(&revoked, started + self.drain_deadline);
                if !drained {
                    // A begun effect cannot be recalled: a produce already handed to the client
                    // lands whenever the broker takes it. Leaving it would let the next owner do
                    // the same work again before it lands (a second response, a second message),
                    // so the revoke keeps waiting until every begun effect has ended, which its
                    // own timeouts bound.
                    tracing::warn!(
                        stage = self.stage,
                        drain_ms = started.elapsed().as_millis() as u64,
                        "drain deadline passed on revoke; waiting for the effects already begun"
                    );
                    drained = self
                        .ledger
                        .wait_effects(&revoked, started + self.drain_limit);
                }
                if !drained {
                    tracing::warn!(
                        stage = self.stage,
                        "drain limit passed on revoke; unfinished records are left to the next owner"
                    );
                }
                let positions = self.ledger.release(&revoked);
                commit(self.stage, consumer, &positions);
                let lag = &gridtalk_telemetry::Metrics::global().consumer_lag;
                for (topic, partition) in &revoked {
                    let _ = lag.remove_label_values(&[self.stage, topic, &partition.to_string()]);
                }
                tracing::info!(
                    stage = self.stage,
                    drained,
                    drain_ms = started.elapsed().as_millis() as u64,
                    "revoked partitions committed and released"
                );
            }
            Rebalance::Assign(_) => {}
            Rebalance::Error(e) => {
                tracing::warn!(stage = self.stage, error = %e, "rebalance error")
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            self.health.set_joined(self.stage);
            let assigned = partitions(tpl);
            if assigned.is_empty() {
                return;
            }
            tracing::info!(stage = self.stage, partitions = ?assigned, "partitions assigned");
            self.ledger.assigned(&assigned);
            // Nothing is delivered before the stage restored the partitions' state.
            if let Err(e) = consumer.pause(tpl) {
                self.ledger
                    .fail(format!("could not pause newly assigned partitions: {e}"));
            }
            let _ = self.events.send(Event::Assigned(assigned));
        }
    }

    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        _offsets: &TopicPartitionList,
    ) {
        if let Err(e) = result {
            // "No offset stored" is the normal answer when nothing new finished.
            if !matches!(e, RdKafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) {
                tracing::warn!(stage = self.stage, error = %e, "offset commit failed; will retry with the next commit");
            }
        }
    }
}

/// Stores `positions` and synchronously commits every stored offset of the assignment: also those
/// the consumer thread stored since the last automatic commit.
pub(crate) fn commit(
    stage: &'static str,
    consumer: &BaseConsumer<DriverContext>,
    positions: &[(TopicPartition, i64)],
) {
    store(stage, consumer, positions);
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) | Err(RdKafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(e) => tracing::warn!(
            stage,
            error = %e,
            "commit failed; records since the last commit will be replayed"
        ),
    }
}

/// Hands committable positions to librdkafka, which commits them every second.
pub(crate) fn store(
    stage: &'static str,
    consumer: &BaseConsumer<DriverContext>,
    positions: &[(TopicPartition, i64)],
) {
    if positions.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), offset) in positions {
        let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset));
    }
    if let Err(e) = consumer.store_offsets(&tpl) {
        // Revoked meanwhile: the new owner replays from the last commit.
        tracing::debug!(stage, error = %e, "offsets not stored");
    }
}

/// How long one `poll` may block: short, so stores and stop requests are served promptly.
const POLL_TIMEOUT: Duration = Duration::from_millis(50);

/// The consumer thread's loop, until `stop` is set or the driver loop is gone.
pub(crate) fn poll_until_stopped(
    consumer: Arc<BaseConsumer<DriverContext>>,
    stop: Arc<AtomicBool>,
) {
    let context = consumer.context();
    let stage = context.stage;
    while !stop.load(Ordering::Acquire) && !context.events.is_closed() {
        store(stage, &consumer, &context.ledger.take_positions());
        match consumer.poll(POLL_TIMEOUT) {
            None => {}
            Some(Ok(message)) => {
                let _ = context.events.send(Event::Record(message.detach()));
            }
            Some(Err(e)) => {
                if let Some((code, reason)) = consumer.client().fatal_error() {
                    let _ = context
                        .events
                        .send(Event::Fatal(format!("{code:?}: {reason}")));
                    break;
                }
                match e {
                    RdKafkaError::PartitionEOF(_) => {}
                    e => tracing::warn!(stage, error = %e, "consume error; continuing"),
                }
            }
        }
    }
}
