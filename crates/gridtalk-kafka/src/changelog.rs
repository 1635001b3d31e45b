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
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError as RdKafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

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

/// The restore consumer's context: reaching the end of the partition is the goal, not an error.
pub(crate) struct RestoreContext;

impl ClientContext for RestoreContext {
    fn error(&self, error: RdKafkaError, reason: &str) {
        // librdkafka reports it as a partition's or as a global error.
        let end_of_partition = matches!(error, RdKafkaError::PartitionEOF(_))
            || error.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::PartitionEOF);
        if !end_of_partition {
            tracing::warn!(error = %error, reason, "changelog reader error");
        }
    }
}

impl ConsumerContext for RestoreContext {}

/// The live entries of one changelog partition.
pub type PartitionEntries = HashMap<String, StoredEntry>;

/// What a stage calls on assignment: [`restore_partitions`] off the async runtime, then a
/// tombstone for every expired entry it met (so restores stay bounded however long a partition
/// went unowned), with the time it took recorded in `gridtalk_state_restore_seconds{store}` and
/// logged. Entries expired at the start of the restore are left out; the deadline is four request
/// timeouts.
pub async fn restore_for_stage(
    config: &KafkaConfig,
    store: &'static str,
    topic: &str,
    partitions: Vec<i32>,
) -> Result<HashMap<i32, PartitionEntries>, KafkaError> {
    let (reader_config, topic_name) = (config.clone(), topic.to_string());
    let started = Instant::now();
    let restored = tokio::task::spawn_blocking(move || {
        let deadline = Duration::from_millis(reader_config.request_timeout_ms.saturating_mul(4));
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        restore_partitions(&reader_config, &topic_name, &partitions, now_ms, deadline)
    })
    .await
    .map_err(|e| KafkaError::Restore(e.to_string()))??;
    let tombstoned = tombstone_expired(config, topic, &restored.expired).await?;
    gridtalk_telemetry::Metrics::global()
        .state_restore_seconds
        .with_label_values(&[store])
        .observe(started.elapsed().as_secs_f64());
    tracing::info!(
        store,
        topic,
        partitions = ?restored.entries.keys().collect::<Vec<_>>(),
        entries = restored.entries.values().map(HashMap::len).sum::<usize>(),
        records = restored.read,
        tombstoned,
        millis = started.elapsed().as_millis() as u64,
        "state restored"
    );
    Ok(restored.entries)
}

/// What one pass over changelog partitions found.
#[derive(Debug, Default)]
pub struct Restored {
    /// The live entries per partition.
    pub entries: HashMap<i32, PartitionEntries>,
    /// Per partition, the keys whose latest record is an expired entry (or unreadable): they
    /// need a tombstone, or every later restore reads them again.
    pub expired: HashMap<i32, Vec<String>>,
    /// Records read.
    pub read: u64,
}

/// Reads several partitions of one changelog topic in one pass (one consumer, fetched together),
/// each from its start to its end.
pub fn restore_partitions(
    config: &KafkaConfig,
    topic: &str,
    partitions: &[i32],
    now_ms: i64,
    deadline: Duration,
) -> Result<Restored, KafkaError> {
    let mut restored: HashMap<i32, PartitionEntries> =
        partitions.iter().map(|p| (*p, HashMap::new())).collect();
    let mut expired: HashMap<i32, std::collections::HashSet<String>> = HashMap::new();
    if partitions.is_empty() {
        return Ok(Restored {
            entries: restored,
            ..Restored::default()
        });
    }
    let consumer = tail_reader(config)?;
    let mut tpl = TopicPartitionList::new();
    for partition in partitions {
        tpl.add_partition_offset(topic, *partition, Offset::Beginning)?;
    }
    let mut read = 0u64;
    read_to_end(&consumer, topic, &tpl, deadline, |message| {
        read += 1;
        let Some(key) = message
            .key()
            .map(|k| String::from_utf8_lossy(k).into_owned())
        else {
            return;
        };
        let entries = restored.entry(message.partition()).or_default();
        let expired = expired.entry(message.partition()).or_default();
        match message.payload().map(decode_entry) {
            Some(Some(entry)) if entry.expires_at_ms > now_ms => {
                expired.remove(&key);
                entries.insert(key, entry);
            }
            // Expired, or not an entry at all: deleted, and tombstoned after the pass.
            Some(_) => {
                entries.remove(&key);
                expired.insert(key);
            }
            // A tombstone.
            None => {
                entries.remove(&key);
                expired.remove(&key);
            }
        }
    })?;
    Ok(Restored {
        entries: restored,
        expired: expired
            .into_iter()
            .map(|(p, keys)| (p, keys.into_iter().collect()))
            .filter(|(_, keys): &(i32, Vec<String>)| !keys.is_empty())
            .collect(),
        read,
    })
}

/// Writes a tombstone for every expired key `restored` found, and waits for the broker's
/// acknowledgement: the next restore of these partitions (and, after compaction, the topic)
/// no longer holds them. Returns how many were written.
pub async fn tombstone_expired(
    config: &KafkaConfig,
    topic: &str,
    expired: &HashMap<i32, Vec<String>>,
) -> Result<usize, KafkaError> {
    let count: usize = expired.values().map(Vec::len).sum();
    if count == 0 {
        return Ok(0);
    }
    let producer = crate::producer(config)?;
    let mut deliveries = Vec::with_capacity(count);
    for (partition, keys) in expired {
        for key in keys {
            deliveries.push(write(&producer, topic, *partition, key, None)?);
        }
    }
    for delivery in futures::future::join_all(deliveries).await {
        match delivery {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => return Err(KafkaError::Client(e)),
            Err(_) => return Err(KafkaError::Restore("tombstone cancelled".into())),
        }
    }
    Ok(count)
}

/// Reads the partitions of `tpl` from their given offsets to their ends (as of the fetch
/// responses' high watermarks), handing every record to `on_record`.
pub(crate) fn read_to_end(
    consumer: &BaseConsumer<RestoreContext>,
    topic: &str,
    tpl: &TopicPartitionList,
    deadline: Duration,
    mut on_record: impl FnMut(&BorrowedMessage<'_>),
) -> Result<(), KafkaError> {
    if tpl.count() == 0 {
        return Ok(());
    }
    consumer.assign(tpl)?;
    let mut open: std::collections::HashSet<i32> =
        tpl.elements().iter().map(|e| e.partition()).collect();
    let started = Instant::now();
    while !open.is_empty() {
        if started.elapsed() > deadline {
            return Err(KafkaError::Restore(format!(
                "{topic} partitions {open:?}: not read to the end within {deadline:?}"
            )));
        }
        match consumer.poll(Duration::from_millis(50)) {
            None => continue,
            Some(Err(RdKafkaError::PartitionEOF(partition))) => {
                open.remove(&partition);
            }
            Some(Err(e)) => tracing::warn!(topic, error = %e, "partition read failed; retrying"),
            Some(Ok(message)) => on_record(&message),
        }
    }
    Ok(())
}

/// A consumer outside any group that reports the end of each partition it reads.
pub(crate) fn tail_reader(
    config: &KafkaConfig,
) -> Result<BaseConsumer<RestoreContext>, KafkaError> {
    Ok(client_config(config)
        .set("group.id", "gridtalk-restore")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        // An empty or short partition should not cost the broker's default fetch wait.
        .set("fetch.wait.max.ms", "20")
        .create_with_context(RestoreContext)?)
}

/// The payloads of every record of every partition of `topic` with a timestamp at or after
/// `since_ms`, read to the end as of now (a tail read, not a consumer group's).
pub fn recent_payloads(
    config: &KafkaConfig,
    topic: &str,
    since_ms: i64,
    deadline: Duration,
) -> Result<Vec<Vec<u8>>, KafkaError> {
    let consumer = tail_reader(config)?;
    let tpl = positions_since(&consumer, topic, since_ms, deadline)?;
    let mut payloads = Vec::new();
    read_to_end(&consumer, topic, &tpl, deadline, |message| {
        // Brokers that cannot look a time up answer with an earlier offset; the record
        // timestamps keep the read to what was asked for.
        let recent = message
            .timestamp()
            .to_millis()
            .is_none_or(|at| at >= since_ms);
        if let (true, Some(payload)) = (recent, message.payload()) {
            payloads.push(payload.to_vec());
        }
    })?;
    Ok(payloads)
}

/// Where each partition of `topic` holds its first record at or after `since_ms` (a partition
/// with nothing that recent: its end).
fn positions_since<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    since_ms: i64,
    deadline: Duration,
) -> Result<TopicPartitionList, KafkaError> {
    let metadata = consumer.fetch_metadata(Some(topic), deadline)?;
    let mut wanted = TopicPartitionList::new();
    for partition in metadata
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
    {
        wanted.add_partition_offset(topic, partition, Offset::Offset(since_ms))?;
    }
    let found = consumer.offsets_for_times(wanted, deadline)?;
    let mut tpl = TopicPartitionList::new();
    for element in found.elements() {
        match element.offset() {
            Offset::Offset(offset) => {
                tpl.add_partition_offset(topic, element.partition(), Offset::Offset(offset))?
            }
            // Nothing that recent: what comes next.
            _ => tpl.add_partition_offset(topic, element.partition(), Offset::End)?,
        }
    }
    Ok(tpl)
}

/// Reads every partition of a topic from a point in time on, as records arrive (outside any
/// consumer group, nothing committed): for looking something up in recent traffic.
pub struct TopicFollower {
    consumer: BaseConsumer<RestoreContext>,
    since_ms: i64,
    /// Where each partition was started: `None` at its end (nothing that recent).
    starts: HashMap<i32, Option<i64>>,
}

impl TopicFollower {
    /// Starts at the first record of each partition at or after `since_ms`.
    pub fn since(
        config: &KafkaConfig,
        topic: &str,
        since_ms: i64,
        deadline: Duration,
    ) -> Result<Self, KafkaError> {
        let consumer = tail_reader(config)?;
        let tpl = positions_since(&consumer, topic, since_ms, deadline)?;
        consumer.assign(&tpl)?;
        let starts = tpl
            .elements()
            .iter()
            .map(|e| match e.offset() {
                Offset::Offset(offset) => (e.partition(), Some(offset)),
                _ => (e.partition(), None),
            })
            .collect();
        Ok(TopicFollower {
            consumer,
            since_ms,
            starts,
        })
    }

    /// Where each partition was started (`None`: at its end, nothing that recent).
    pub fn starts(&self) -> &HashMap<i32, Option<i64>> {
        &self.starts
    }

    /// The next record, waiting up to `timeout`; `None` when nothing came. The payload of a
    /// record older than the start (a broker that cannot look a time up answers an earlier
    /// offset) or without a value is `None`.
    pub fn next(&self, timeout: Duration) -> Result<Option<Followed>, KafkaError> {
        match self.consumer.poll(timeout) {
            None => Ok(None),
            Some(Err(RdKafkaError::PartitionEOF(_))) => Ok(None),
            Some(Err(e)) => Err(e.into()),
            Some(Ok(message)) => {
                let recent = message
                    .timestamp()
                    .to_millis()
                    .is_none_or(|at| at >= self.since_ms);
                Ok(Some(Followed {
                    partition: message.partition(),
                    offset: message.offset(),
                    payload: message.payload().filter(|_| recent).map(<[u8]>::to_vec),
                }))
            }
        }
    }
}

/// One record a [`TopicFollower`] read.
#[derive(Debug)]
pub struct Followed {
    pub partition: i32,
    pub offset: i64,
    pub payload: Option<Vec<u8>>,
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
