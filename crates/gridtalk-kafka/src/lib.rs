//! Kafka I/O shared by every stage: client settings, topic management, the stage [`driver`] that
//! owns every consuming stage's consumer, changelog-backed state, and the dead-letter writer.
//!
//! Guarantees:
//! - Offsets are never committed automatically for records that were merely read: consumers run
//!   with `enable.auto.offset.store=false`, and the driver stores an offset only when a record's
//!   ticket is finished and the [`OffsetTracker`] says every earlier record of the partition is
//!   finished too. librdkafka then commits stored offsets every second; the driver commits
//!   synchronously on revoke and on close.
//! - Producers are idempotent with `acks=all`, so a retried produce never duplicates or reorders
//!   records within a partition.
//! - A dead letter keeps the original key, value and headers and adds `gridtalk.dlq.*` headers;
//!   [`dead_letter`] returns only once the broker has acknowledged it.

pub mod changelog;
mod diagnose;
mod dlq;
pub mod driver;
mod ends;
mod offsets;
pub mod published;
mod topics;

use std::time::Duration;

use gridtalk_config::KafkaConfig;
use rdkafka::config::ClientConfig;
use rdkafka::producer::FutureProducer;

pub use diagnose::{probe, settings_problems, why_unreachable};
pub use dlq::{
    dead_letter, list_dead_letters, replay_dead_letters, LetterGroup, ReplayFilter, ReplayLedger,
    ReplayReport, DLQ_HEADER_PREFIX,
};
pub use ends::{caught_up, committed_offsets, end_offsets, end_offsets_of, partitions_of};
pub use gridtalk_contract::DeadLetterReason;
pub use offsets::OffsetTracker;
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
        .set("message.timeout.ms", config.delivery_timeout_ms.to_string())
        .set("request.timeout.ms", config.request_timeout_ms.to_string());
    for (key, value) in &config.producer {
        client.set(key, value);
    }
    Ok(client.create()?)
}

/// Waits for the broker's acknowledgement of every delivery (records enqueued in order with
/// `send_result`); the first failure is returned.
pub async fn acknowledged(
    deliveries: Vec<rdkafka::producer::DeliveryFuture>,
) -> Result<(), String> {
    for delivery in futures::future::join_all(deliveries).await {
        match delivery {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => return Err(e.to_string()),
            Err(_) => return Err("cancelled".into()),
        }
    }
    Ok(())
}

/// A consumer without a group, for tailing a topic from the beginning (the directory).
pub fn tail_consumer(config: &KafkaConfig) -> Result<rdkafka::consumer::BaseConsumer, KafkaError> {
    Ok(client_config(config)
        .set("group.id", "gridtalk-unused")
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()?)
}

/// Runs a blocking Kafka call (metadata, admin) off the async workers. `None` when `shutdown`
/// comes first: a stage starting against an unreachable cluster stops at once rather than after
/// the call's timeout (the call finishes, unobserved, on its blocking thread).
/// A call that takes longer than a few seconds (the cluster does not answer) is logged once,
/// with `what` it is for and why the cluster does not answer ([`why_unreachable`]).
pub async fn unless_stopped<T: Send + 'static>(
    shutdown: &tokio_util::sync::CancellationToken,
    kafka: &KafkaConfig,
    what: &'static str,
    call: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let call = tokio::task::spawn_blocking(call);
    tokio::pin!(call);
    let slow = tokio::time::sleep(Duration::from_secs(5));
    tokio::pin!(slow);
    let mut told = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            done = &mut call => return Some(done.expect("a blocking Kafka call panicked")),
            _ = &mut slow, if !told => {
                told = true;
                let reason = tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    reason = why_unreachable(kafka) => reason,
                };
                let reason = reason.unwrap_or_else(|| "the cluster answers, slowly".into());
                tracing::warn!(
                    bootstrap = %kafka.bootstrap_servers,
                    "still waiting for Kafka ({what}); not ready: {reason}"
                );
            }
        }
    }
}

/// Timeout for metadata and admin calls.
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);
