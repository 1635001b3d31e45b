//! Partition-local state backed by compacted changelog topics.
//!
//! A stage that keeps state about the records of input partition `p` writes every change to
//! partition `p` of its changelog topic (the key is the entry's key; a null value deletes it), and
//! on being assigned `p` reads that changelog partition from its start to its end before it
//! processes any record of `p`. Compaction keeps the topic bounded to the live entries; entries
//! that expire are deleted with tombstones. Values carry their expiry: 8 bytes of big-endian unix
//! milliseconds, then the entry's bytes.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use gridtalk_config::KafkaConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError as RdKafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use crate::{client_config, KafkaError};

/// A live entry: its bytes and when it expires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEntry {
    pub value: Vec<u8>,
    pub expires_at_ms: i64,
}

/// Encodes an entry for the changelog.
pub fn encode_entry(value: &[u8], expires_at_ms: i64) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(8 + value.len());
    bytes.extend_from_slice(&expires_at_ms.to_be_bytes());
    bytes.extend_from_slice(value);
    bytes
}

fn decode_entry(bytes: &[u8]) -> Option<StoredEntry> {
    let (expiry, value) = bytes.split_at_checked(8)?;
    Some(StoredEntry {
        value: value.to_vec(),
        expires_at_ms: i64::from_be_bytes(expiry.try_into().ok()?),
    })
}

/// Reads partition `partition` of `topic` from its start to its end and returns the live entries
/// (tombstones applied, entries expired at `now_ms` left out) and how many records it read.
pub fn restore(
    config: &KafkaConfig,
    topic: &str,
    partition: i32,
    now_ms: i64,
    deadline: Duration,
) -> Result<(HashMap<String, StoredEntry>, u64), KafkaError> {
    let consumer: BaseConsumer = client_config(config)
        .set("group.id", "gridtalk-restore")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Beginning)?;
    consumer.assign(&tpl)?;
    let mut entries = HashMap::new();
    let mut read = 0u64;
    let started = Instant::now();
    loop {
        if started.elapsed() > deadline {
            return Err(KafkaError::Restore(format!(
                "{topic}/{partition}: not read to its end within {deadline:?}"
            )));
        }
        match consumer.poll(Duration::from_millis(200)) {
            None => continue,
            // End of the partition as of the fetch response's high watermark.
            Some(Err(RdKafkaError::PartitionEOF(_))) => break,
            Some(Err(e)) => {
                tracing::warn!(topic, partition, error = %e, "changelog read failed; retrying");
                continue;
            }
            Some(Ok(message)) => {
                read += 1;
                let Some(key) = message
                    .key()
                    .map(|k| String::from_utf8_lossy(k).into_owned())
                else {
                    continue;
                };
                match message.payload().and_then(decode_entry) {
                    Some(entry) if entry.expires_at_ms > now_ms => {
                        entries.insert(key, entry);
                    }
                    _ => {
                        entries.remove(&key);
                    }
                }
            }
        }
    }
    Ok((entries, read))
}

/// Enqueues a change of `key` on partition `partition` of `topic` (`None` deletes it); await the
/// returned future before treating the change as durable.
pub fn write(
    producer: &FutureProducer,
    topic: &str,
    partition: i32,
    key: &str,
    entry: Option<(&[u8], i64)>,
) -> Result<DeliveryFuture, KafkaError> {
    let bytes = entry.map(|(value, expires)| encode_entry(value, expires));
    let mut record = FutureRecord::<str, Vec<u8>>::to(topic)
        .partition(partition)
        .key(key);
    if let Some(bytes) = &bytes {
        record = record.payload(bytes);
    }
    producer
        .send_result(record)
        .map_err(|(e, _)| KafkaError::Client(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_carry_their_expiry() {
        let bytes = encode_entry(b"wamid.X", 1_700_000_000_000);
        assert_eq!(
            decode_entry(&bytes),
            Some(StoredEntry {
                value: b"wamid.X".to_vec(),
                expires_at_ms: 1_700_000_000_000
            })
        );
        assert_eq!(decode_entry(b"short"), None);
    }
}
