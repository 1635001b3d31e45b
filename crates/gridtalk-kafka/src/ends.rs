//! Exact end offsets of a topic's partitions.
//!
//! The usual way to ask for the end of a partition, a ListOffsets request (`fetch_watermarks`),
//! is not exact on every Kafka-compatible broker: some answer with the base offset of the last
//! record batch plus one, which undercounts when the last batch holds several records (idempotent
//! producers batch). The high watermark a broker reports with fetched data is exact everywhere,
//! so [`end_offsets`] reads each partition until the consumer reports end-of-partition and takes
//! the position there. It reads the topic once; use it where correctness matters more than cost
//! (operator replay, catching up a compacted topic, tests).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use gridtalk_config::KafkaConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::{client_config, KafkaError, ADMIN_TIMEOUT};

/// A consumer without a group that reports end-of-partition, for reading topics to their end.
pub fn reader(config: &KafkaConfig) -> Result<BaseConsumer, KafkaError> {
    Ok(client_config(config)
        .set("group.id", "gridtalk-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        .create()?)
}

/// The partitions of `topic`, or [`KafkaError::MissingTopics`].
pub fn partitions_of(consumer: &BaseConsumer, topic: &str) -> Result<Vec<i32>, KafkaError> {
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
    let consumer = reader(config)?;
    let partitions = partitions_of(&consumer, topic)?;
    let mut assignment = TopicPartitionList::new();
    for p in &partitions {
        assignment.add_partition_offset(topic, *p, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    let mut next: HashMap<i32, i64> = HashMap::new();
    let mut ends: HashMap<i32, i64> = HashMap::new();
    let mut last_progress = Instant::now();
    while ends.len() < partitions.len() {
        match consumer.poll(Duration::from_millis(200)) {
            None if last_progress.elapsed() > ADMIN_TIMEOUT => {
                return Err(KafkaError::Client(
                    rdkafka::error::KafkaError::MessageConsumption(
                        rdkafka::types::RDKafkaErrorCode::OperationTimedOut,
                    ),
                ))
            }
            None => {}
            Some(Ok(m)) => {
                last_progress = Instant::now();
                next.insert(m.partition(), m.offset() + 1);
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                last_progress = Instant::now();
                let end = match next.get(&p) {
                    Some(n) => *n,
                    None => consumer
                        .position()?
                        .find_partition(topic, p)
                        .and_then(|e| match e.offset() {
                            Offset::Offset(o) => Some(o),
                            _ => None,
                        })
                        .unwrap_or(0),
                };
                ends.insert(p, end);
            }
            Some(Err(e)) => return Err(e.into()),
        }
    }
    Ok(ends)
}
