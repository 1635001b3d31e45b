//! Kafka I/O shared by every stage: client settings, topic management, the offset tracker that
//! turns "done" into safe commits, and the dead-letter writer.
//!
//! Guarantees:
//! - Offsets are never committed automatically for records that were merely read: consumers run
//!   with `enable.auto.offset.store=false`, and a stage stores an offset only through
//!   [`OffsetTracker`], which yields the lowest offset still unfinished in a partition. librdkafka
//!   then commits stored offsets periodically, on revoke and on close.
//! - Producers are idempotent with `acks=all`, so a retried produce never duplicates or reorders
//!   records within a partition.
//! - A dead letter keeps the original key, value and headers and adds `gridtalk.dlq.*` headers;
//!   [`dead_letter`] returns only once the broker has acknowledged it.

pub mod changelog;
mod dlq;
pub mod driver;
mod ends;
mod offsets;
mod progress;
mod topics;

use std::time::Duration;

use gridtalk_config::KafkaConfig;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::producer::FutureProducer;
use rdkafka::ClientContext;

pub use dlq::{
    dead_letter, replay_dead_letters, DeadLetterReason, ReplayFilter, ReplayReport,
    DLQ_HEADER_PREFIX,
};
pub use ends::{caught_up, committed_offsets, end_offsets, end_offsets_of, partitions_of};
pub use offsets::OffsetTracker;
pub use progress::StageProgress;
pub use topics::{ensure_topics, missing_topics, TopicSpec};

#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    #[error("Kafka client error: {0}")]
    Client(#[from] rdkafka::error::KafkaError),
    #[error("topic(s) missing on the broker: {0}; create them before starting gridtalk")]
    MissingTopics(String),
    #[error("could not create topic {topic}: {detail}")]
    CreateTopic { topic: String, detail: String },
    #[error("state restore: {0}")]
    Restore(String),
}

/// Base client settings: bootstrap servers plus every extra `kafka.client` property (TLS, SASL).
pub fn client_config(config: &KafkaConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &config.bootstrap_servers);
    for (key, value) in &config.client {
        client.set(key, value.expose());
    }
    client
}

/// An idempotent producer (`acks=all`) for hand-offs that must be durable before an offset moves.
pub fn producer(config: &KafkaConfig) -> Result<FutureProducer, KafkaError> {
    let mut client = client_config(config);
    client
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("compression.type", "lz4")
        .set("message.timeout.ms", config.request_timeout_ms.to_string());
    for (key, value) in &config.producer {
        client.set(key, value);
    }
    Ok(client.create()?)
}

/// (offset after the last record handed to the stage, high watermark) per topic partition.
type PartitionPositions = std::collections::HashMap<(String, i32), (i64, i64)>;

/// Logs rebalances and remembers revoked partitions, so a stage can drop the state it holds for
/// them. Offsets stored so far are committed by librdkafka on revoke.
#[derive(Debug, Clone)]
pub struct StageContext {
    pub stage: &'static str,
    revoked: std::sync::Arc<std::sync::Mutex<Vec<(String, i32)>>>,
    owned: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<(String, i32)>>>,
    /// Per partition, from librdkafka's statistics: (offset after the last record handed to the
    /// stage, high watermark).
    positions: std::sync::Arc<std::sync::Mutex<PartitionPositions>>,
}

impl StageContext {
    pub fn new(stage: &'static str) -> Self {
        StageContext {
            stage,
            revoked: Default::default(),
            owned: Default::default(),
            positions: Default::default(),
        }
    }

    /// The partitions revoked since the last call.
    pub fn take_revoked(&self) -> Vec<(String, i32)> {
        std::mem::take(&mut *self.revoked.lock().expect("revoked"))
    }

    /// Whether the stage has been handed every record of the partition that existed at the last
    /// statistics report (every `statistics.interval.ms`). False before the first report.
    pub fn caught_up(&self, topic: &str, partition: i32) -> bool {
        self.positions
            .lock()
            .expect("positions")
            .get(&(topic.to_string(), partition))
            .is_some_and(|(handed, high)| *high <= 0 || handed >= high)
    }

    /// Whether the partition is assigned to this consumer as of the last rebalance it served.
    /// Work that waited (for a limiter, a retry) checks this before acting, so a partition that
    /// moved on meanwhile is left to its new owner.
    pub fn owns(&self, topic: &str, partition: i32) -> bool {
        self.owned
            .lock()
            .expect("owned")
            .contains(&(topic.to_string(), partition))
    }
}

impl ClientContext for StageContext {
    /// Publishes consumer lag per assigned partition from librdkafka's statistics.
    fn stats(&self, statistics: rdkafka::Statistics) {
        let lag = &gridtalk_telemetry::Metrics::global().consumer_lag;
        let mut positions = self.positions.lock().expect("positions");
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                if *partition >= 0 {
                    positions.insert((topic.clone(), *partition), (p.app_offset, p.hi_offset));
                }
                // Partition -1 is librdkafka's internal unassigned queue; -1 lag means unknown.
                if *partition >= 0 && p.consumer_lag >= 0 {
                    lag.with_label_values(&[self.stage, topic, &partition.to_string()])
                        .set(p.consumer_lag);
                }
            }
        }
    }
}

impl ConsumerContext for StageContext {
    fn pre_rebalance(
        &self,
        _consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &Rebalance<'_>,
    ) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                tracing::info!(
                    stage = self.stage,
                    partitions = tpl.count(),
                    "partitions revoked"
                );
                let partitions: Vec<(String, i32)> = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_string(), e.partition()))
                    .collect();
                let mut owned = self.owned.lock().expect("owned");
                for partition in &partitions {
                    owned.remove(partition);
                }
                self.revoked.lock().expect("revoked").extend(partitions);
            }
            Rebalance::Assign(tpl) => {
                tracing::info!(
                    stage = self.stage,
                    partitions = tpl.count(),
                    "partitions assigned"
                );
                self.owned.lock().expect("owned").extend(
                    tpl.elements()
                        .iter()
                        .map(|e| (e.topic().to_string(), e.partition())),
                );
            }
            Rebalance::Error(e) => {
                tracing::warn!(stage = self.stage, error = %e, "rebalance error")
            }
        }
    }

    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        _offsets: &rdkafka::TopicPartitionList,
    ) {
        if let Err(e) = result {
            // "No offset stored" is the normal answer when nothing new finished.
            if !matches!(
                e,
                rdkafka::error::KafkaError::ConsumerCommit(
                    rdkafka::types::RDKafkaErrorCode::NoOffset
                )
            ) {
                tracing::warn!(stage = self.stage, error = %e, "offset commit failed; will retry with the next commit");
            }
        }
    }
}

/// A group consumer for one stage: cooperative-sticky assignment, offsets stored only by the
/// stage, stored offsets committed every second and on revoke/close.
pub fn stage_consumer(
    config: &KafkaConfig,
    group_id: &str,
    stage: &'static str,
) -> Result<StreamConsumer<StageContext>, KafkaError> {
    group_consumer(config, group_id, stage, "cooperative-sticky")
}

/// A group consumer for topics that are co-partitioned (same key, same partition count): the range
/// assignor gives one member the same partition numbers of every subscribed topic, so a stage can
/// join them locally.
pub fn co_partitioned_consumer(
    config: &KafkaConfig,
    group_id: &str,
    stage: &'static str,
) -> Result<StreamConsumer<StageContext>, KafkaError> {
    group_consumer(config, group_id, stage, "range")
}

fn group_consumer(
    config: &KafkaConfig,
    group_id: &str,
    stage: &'static str,
    assignment_strategy: &str,
) -> Result<StreamConsumer<StageContext>, KafkaError> {
    Ok(client_config(config)
        .set("group.id", group_id)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", assignment_strategy)
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
        .create_with_context(StageContext::new(stage))?)
}

/// A consumer without a group, for tailing a topic from the beginning (the directory).
pub fn tail_consumer(config: &KafkaConfig) -> Result<rdkafka::consumer::BaseConsumer, KafkaError> {
    Ok(client_config(config)
        .set("group.id", "gridtalk-unused")
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()?)
}

/// Timeout for metadata and admin calls.
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);
