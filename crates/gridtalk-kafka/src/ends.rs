//! Exact end offsets of a topic's partitions.
//!
//! The usual way to ask for the end of a partition, a ListOffsets request (`fetch_watermarks`),
//! is not exact on every Kafka-compatible broker: some answer with the base offset of the last
//! record batch plus one, which undercounts when the last batch holds several records (idempotent
//! producers batch). The high watermark a broker reports in every fetch response is exact
//! everywhere, so [`end_offsets`] starts a fetch on each partition and takes the high watermark
//! of the first response (from librdkafka's statistics). It costs a fetch per partition, not a
//! read of the topic.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use gridtalk_config::KafkaConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::statistics::Statistics;
use rdkafka::ClientContext;
use rdkafka::{Offset, TopicPartitionList};

use crate::{client_config, KafkaError, ADMIN_TIMEOUT};

/// The partitions of `topic`, or [`KafkaError::MissingTopics`].
pub fn partitions_of<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
) -> Result<Vec<i32>, KafkaError> {
    let metadata = consumer.fetch_metadata(Some(topic), ADMIN_TIMEOUT)?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(KafkaError::MissingTopics(topic.to_string()));
    }
    Ok(partitions)
}

/// The offset the next record of each partition of `topic` will get, as of the call.
pub fn end_offsets(config: &KafkaConfig, topic: &str) -> Result<HashMap<i32, i64>, KafkaError> {
    Ok(end_offsets_of(config, &[topic])?
        .into_iter()
        .map(|((_, partition), end)| (partition, end))
        .collect())
}

/// Keeps the high watermarks librdkafka reports in its statistics, which it takes from fetch
/// responses (not from ListOffsets).
#[derive(Default)]
struct HighWatermarks(Mutex<HashMap<(String, i32), i64>>);

impl ClientContext for HighWatermarks {
    fn stats(&self, statistics: Statistics) {
        let mut known = self.0.lock().expect("watermarks");
        for (topic, t) in statistics.topics {
            for (partition, p) in t.partitions {
                if partition >= 0 && p.hi_offset >= 0 {
                    known.insert((topic.clone(), partition), p.hi_offset);
                }
            }
        }
    }
}

impl ConsumerContext for HighWatermarks {}

/// [`end_offsets`] of several topics at once, keyed by (topic, partition): one reader for all.
pub fn end_offsets_of(
    config: &KafkaConfig,
    topics: &[&str],
) -> Result<HashMap<(String, i32), i64>, KafkaError> {
    let consumer: BaseConsumer<HighWatermarks> = client_config(config)
        .set("group.id", "gridtalk-reader")
        .set("enable.auto.commit", "false")
        .set("statistics.interval.ms", "100")
        .set("fetch.wait.max.ms", "50")
        .create_with_context(HighWatermarks::default())?;
    let mut assignment = TopicPartitionList::new();
    let mut pending: Vec<(String, i32)> = Vec::new();
    for topic in topics {
        let partitions = partitions_of(&consumer, topic)?;
        for p in partitions {
            assignment.add_partition_offset(topic, p, Offset::Beginning)?;
            pending.push((topic.to_string(), p));
        }
    }
    consumer.assign(&assignment)?;
    let mut ends = HashMap::new();
    let started = Instant::now();
    while !pending.is_empty() {
        if started.elapsed() > ADMIN_TIMEOUT {
            return Err(KafkaError::Client(
                rdkafka::error::KafkaError::MessageConsumption(
                    rdkafka::types::RDKafkaErrorCode::OperationTimedOut,
                ),
            ));
        }
        // Polling drives the fetches and the statistics; the records themselves are not needed.
        if let Some(Err(e)) = consumer.poll(Duration::from_millis(50)) {
            return Err(e.into());
        }
        let known = consumer.context().0.lock().expect("watermarks");
        pending.retain(|key| match known.get(key) {
            Some(high) => {
                ends.insert(key.clone(), *high);
                false
            }
            None => true,
        });
    }
    Ok(ends)
}

/// The offsets `group` has committed on each partition of `topic` (absent: nothing committed).
pub fn committed_offsets(
    config: &KafkaConfig,
    group: &str,
    topic: &str,
) -> Result<HashMap<i32, i64>, KafkaError> {
    let consumer: BaseConsumer = client_config(config)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in partitions_of(&consumer, topic)? {
        tpl.add_partition(topic, p);
    }
    let committed = consumer.committed_offsets(tpl, ADMIN_TIMEOUT)?;
    Ok(committed
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some((e.partition(), o)),
            _ => None,
        })
        .collect())
}

/// Whether `group` has committed every record of `topics` written so far.
pub fn caught_up(config: &KafkaConfig, group: &str, topics: &[&str]) -> Result<bool, KafkaError> {
    let ends = end_offsets_of(config, topics)?;
    for topic in topics {
        let committed = committed_offsets(config, group, topic)?;
        let behind = ends
            .iter()
            .filter(|((t, _), end)| t == topic && **end > 0)
            .any(|((_, p), end)| committed.get(p).is_none_or(|c| c < end));
        if behind {
            return Ok(false);
        }
    }
    Ok(true)
}
