//! The dead-letter topic: what could not be processed, with the original bytes and the reason.
//!
//! A dead letter can always be written. It carries the original key, value and headers when they
//! fit in one record; when the producer or the broker refuses the letter as too large (the
//! original was bigger than the producer's `message.max.bytes`, or than the broker's limit), a
//! *truncated* letter is written instead: the first [`TRUNCATED_PREFIX_BYTES`] of the value and
//! key, the original sizes and the value's SHA-256, `gridtalk.dlq.truncated=true`, and none of the
//! original headers. Replay skips truncated letters (their bytes are not the original). The
//! `detail` header is cut to [`MAX_DETAIL_BYTES`] so a long decoder message cannot make a letter
//! too large either.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use gridtalk_config::KafkaConfig;
use gridtalk_contract::DeadLetterReason;

use crate::{tail_consumer, KafkaError};

/// Prefix of the headers gridtalk adds to a dead letter.
pub const DLQ_HEADER_PREFIX: &str = "gridtalk.dlq.";

/// How much of the value and key a truncated letter keeps.
pub const TRUNCATED_PREFIX_BYTES: usize = 1024;

/// The longest `gridtalk.dlq.detail` written; longer details are cut at a character boundary.
pub const MAX_DETAIL_BYTES: usize = 1000;

fn cut_at_char_boundary(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// A record's headers without the ones gridtalk adds to a dead letter, and how many there are.
fn without_dlq_headers<H: Headers>(headers: Option<&H>) -> (OwnedHeaders, usize) {
    let mut kept = OwnedHeaders::new();
    let mut count = 0;
    for h in headers
        .into_iter()
        .flat_map(|h| h.iter())
        .filter(|h| !h.key.starts_with(DLQ_HEADER_PREFIX))
    {
        count += 1;
        kept = kept.insert(Header {
            key: h.key,
            value: h.value,
        });
    }
    (kept, count)
}

/// Whether the producer or the broker refused a record for its size.
fn too_large(error: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode;
    matches!(
        error.rdkafka_error_code(),
        Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::MessageBatchTooLarge)
    )
}

/// Writes `source` to the dead-letter topic with reason headers and waits for the broker's ack.
/// `extra` adds headers such as the WhatsApp error code (`whatsapp_code`).
#[allow(clippy::too_many_arguments)]
pub async fn dead_letter<M: Message>(
    producer: &FutureProducer,
    dlq_topic: &str,
    stage: &str,
    reason: DeadLetterReason,
    detail: &str,
    source: &M,
    extra: &[(&str, &str)],
    timeout: Duration,
) -> Result<(), KafkaError> {
    let failed_at = now_ms();
    let partition = source.partition().to_string();
    let offset = source.offset().to_string();
    let timestamp = source.timestamp().to_millis().unwrap_or(-1).to_string();
    let failed_at = failed_at.to_string();
    let detail = cut_at_char_boundary(detail, MAX_DETAIL_BYTES);
    let mut ours: Vec<(String, String)> = [
        ("reason", reason.as_str()),
        ("detail", detail),
        ("stage", stage),
        ("source_topic", source.topic()),
        ("source_partition", &partition),
        ("source_offset", &offset),
        ("source_timestamp", &timestamp),
        ("failed_at", &failed_at),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    ours.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let with_ours = |mut headers: OwnedHeaders, ours: &[(String, String)]| {
        for (key, value) in ours {
            headers = headers.insert(Header {
                key: &format!("{DLQ_HEADER_PREFIX}{key}"),
                value: Some(value.as_bytes()),
            });
        }
        headers
    };

    let (original, original_headers) = without_dlq_headers(source.headers());
    let mut record = FutureRecord::<[u8], [u8]>::to(dlq_topic).headers(with_ours(original, &ours));
    if let Some(key) = source.key() {
        record = record.key(key);
    }
    if let Some(payload) = source.payload() {
        record = record.payload(payload);
    }
    let mut truncated = false;
    match producer.send(record, timeout).await {
        Ok(_) => {}
        Err((e, _)) if too_large(&e) => {
            // The original cannot travel whole: keep what identifies it.
            truncated = true;
            let value = source.payload().unwrap_or_default();
            let key = source.key().unwrap_or_default();
            ours.extend([
                ("truncated".to_string(), "true".to_string()),
                ("original_value_bytes".into(), value.len().to_string()),
                (
                    "original_value_sha256".into(),
                    hex::encode(<sha2::Sha256 as sha2::Digest>::digest(value)),
                ),
                ("original_key_bytes".into(), key.len().to_string()),
                ("original_headers".into(), original_headers.to_string()),
            ]);
            let mut record = FutureRecord::<[u8], [u8]>::to(dlq_topic)
                .headers(with_ours(OwnedHeaders::new(), &ours));
            if source.key().is_some() {
                record = record.key(&key[..key.len().min(TRUNCATED_PREFIX_BYTES)]);
            }
            if source.payload().is_some() {
                record = record.payload(&value[..value.len().min(TRUNCATED_PREFIX_BYTES)]);
            }
            producer
                .send(record, timeout)
                .await
                .map_err(|(e, _)| KafkaError::Client(e))?;
        }
        Err((e, _)) => return Err(KafkaError::Client(e)),
    }
    gridtalk_telemetry::Metrics::global()
        .dead_letters
        .with_label_values(&[stage, reason.as_str()])
        .inc();
    tracing::warn!(
        stage,
        reason = reason.as_str(),
        detail = %gridtalk_telemetry::redact(detail),
        source_topic = source.topic(),
        source_partition = source.partition(),
        source_offset = source.offset(),
        truncated,
        "record dead-lettered"
    );
    Ok(())
}

/// Which dead letters to replay.
#[derive(Debug, Clone, Default)]
pub struct ReplayFilter {
    /// Only this reason code.
    pub reason: Option<String>,
    /// Only letters that came from this topic.
    pub source_topic: Option<String>,
    /// Only letters of records from this partition of the source topic.
    pub source_partition: Option<i32>,
    /// Only letters of records at or after this offset of the source partition (as the
    /// `record dead-lettered` log line and the `gridtalk.dlq.source_offset` header show it).
    pub from_offset: Option<i64>,
    /// Only letters of records at or before this offset of the source partition.
    pub to_offset: Option<i64>,
    /// Only letters written at or after this time (milliseconds since the epoch).
    pub since_ms: Option<i64>,
    /// Only letters written at or before this time (milliseconds since the epoch).
    pub until_ms: Option<i64>,
    /// Publish to this topic instead of each letter's source topic.
    pub to_topic: Option<String>,
    /// Stop after this many replays.
    pub limit: Option<usize>,
    /// Only count what would be replayed: publish nothing, record nothing.
    pub dry_run: bool,
    /// Also replay letters of records replayed before, if they failed again after that replay
    /// (after a fix of something a first replay did not cure). Never the same letter twice.
    pub again: bool,
}

impl ReplayFilter {
    /// Whether a letter of the record at `partition`/`offset` of its source, written at
    /// `written_ms`, lies inside the partition, offset and time ranges. A letter that lacks a
    /// value a range asks about is outside it.
    pub fn admits_position(
        &self,
        partition: Option<i32>,
        offset: Option<i64>,
        written_ms: Option<i64>,
    ) -> bool {
        let inside = |value: Option<i64>, low: Option<i64>, high: Option<i64>| {
            if low.is_none() && high.is_none() {
                return true;
            }
            value.is_some_and(|v| low.is_none_or(|l| v >= l) && high.is_none_or(|h| v <= h))
        };
        self.source_partition.is_none_or(|p| partition == Some(p))
            && inside(offset, self.from_offset, self.to_offset)
            && inside(written_ms, self.since_ms, self.until_ms)
    }
}

/// The replay ledger: a compacted topic of one partition whose keys are the letters replayed, by
/// their root (the first letter of the record; a record that fails again after its replay makes
/// a new letter of the same root), so a replay never re-publishes what an earlier one did.
#[derive(Debug, Clone)]
pub struct ReplayLedger<'a> {
    pub topic: &'a str,
}

/// Ledger entries never expire on their own: the dead-letter topic's retention bounds what
/// can be replayed, and the ledger is compacted to one entry per root.
const LEDGER_EXPIRY_MS: i64 = i64::MAX;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayReport {
    pub scanned: usize,
    pub replayed: usize,
    /// Matching letters that hold only the start of a record too large to dead-letter whole.
    pub truncated_skipped: usize,
    /// Matching letters whose record an earlier replay already re-published.
    pub already_replayed: usize,
    /// Matching letters whose `gridtalk.dlq.retry_not_before` has not come yet (WhatsApp asked
    /// for a day's wait, `whatsapp_retry_later`): left for a later replay.
    pub not_yet_due: usize,
}

/// Milliseconds since the epoch.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn header<'a, H: Headers>(headers: &'a H, key: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|h| h.key == key)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}

/// The roots in the replay ledger, with when each was last replayed.
fn ledger_entries(
    config: &KafkaConfig,
    ledger: &ReplayLedger<'_>,
) -> Result<std::collections::HashMap<String, i64>, KafkaError> {
    let restored = crate::changelog::restore_partitions(
        config,
        ledger.topic,
        &[0],
        0,
        Duration::from_millis(config.request_timeout_ms.saturating_mul(4)),
    )?;
    Ok(restored
        .entries
        .into_values()
        .flatten()
        .map(|(root, entry)| {
            let at = String::from_utf8_lossy(&entry.value).parse().unwrap_or(0);
            (root, at)
        })
        .collect())
}

/// The root of a letter: the first letter of its record (see [`replay_dead_letters`]).
fn root_of<M: Message>(dlq_topic: &str, message: &M) -> String {
    message
        .headers()
        .and_then(|h| header(h, "gridtalk.replayed_from"))
        .map(String::from)
        .unwrap_or_else(|| format!("{dlq_topic}/{}/{}", message.partition(), message.offset()))
}

/// The dead letters of one reason from one source topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LetterGroup {
    pub reason: String,
    pub source_topic: String,
    pub letters: usize,
    /// Letters whose record a replay re-published (this letter, or a later one of its record,
    /// was replayed after it was written).
    pub replayed: usize,
    /// When the oldest and the newest letter were written (milliseconds since the epoch).
    pub oldest_ms: i64,
    pub newest_ms: i64,
}

/// Every dead letter, counted by reason and source topic, sorted by reason then topic.
pub fn list_dead_letters(
    config: &KafkaConfig,
    dlq_topic: &str,
    ledger: &ReplayLedger<'_>,
) -> Result<Vec<LetterGroup>, KafkaError> {
    let replayed = ledger_entries(config, ledger)?;
    let consumer = crate::changelog::tail_reader(config)?;
    let mut tpl = TopicPartitionList::new();
    for partition in crate::partitions_of(&consumer, dlq_topic)? {
        tpl.add_partition_offset(dlq_topic, partition, Offset::Beginning)?;
    }
    let mut groups: std::collections::BTreeMap<(String, String), LetterGroup> =
        std::collections::BTreeMap::new();
    crate::changelog::read_to_end(
        &consumer,
        dlq_topic,
        &tpl,
        Duration::from_millis(config.request_timeout_ms.saturating_mul(4)),
        |message| {
            let headers = message.headers();
            let text = |key: &str| {
                headers
                    .and_then(|h| header(h, key))
                    .unwrap_or("-")
                    .to_string()
            };
            let (reason, source) = (
                text("gridtalk.dlq.reason"),
                text("gridtalk.dlq.source_topic"),
            );
            let written = message.timestamp().to_millis().unwrap_or(0);
            let group = groups
                .entry((reason.clone(), source.clone()))
                .or_insert(LetterGroup {
                    reason,
                    source_topic: source,
                    letters: 0,
                    replayed: 0,
                    oldest_ms: i64::MAX,
                    newest_ms: i64::MIN,
                });
            group.letters += 1;
            if replayed
                .get(&root_of(dlq_topic, message))
                .is_some_and(|at| written <= *at)
            {
                group.replayed += 1;
            }
            group.oldest_ms = group.oldest_ms.min(written);
            group.newest_ms = group.newest_ms.max(written);
        },
    )?;
    Ok(groups.into_values().collect())
}

/// Re-publishes the dead letters that match `filter`, from the start of the topic up to its end
/// at the time of the call, with their original key, value and headers (reason headers removed,
/// `gridtalk.replayed_from` added: the letter's root). Each replay is acknowledged, then recorded
/// in the ledger and acknowledged, before the next is read; a letter whose root the ledger holds
/// is not replayed again (see [`ReplayFilter::again`]), so re-running a replay is a no-op.
pub async fn replay_dead_letters(
    config: &KafkaConfig,
    producer: &FutureProducer,
    dlq_topic: &str,
    ledger: &ReplayLedger<'_>,
    filter: &ReplayFilter,
    mut progress: impl FnMut(&ReplayReport),
) -> Result<ReplayReport, KafkaError> {
    // Root → when it was last replayed.
    let mut replayed = ledger_entries(config, ledger)?;
    // Ends first (exactly, see `end_offsets`), so letters that replays produce are not replayed again.
    let ends_now = crate::end_offsets(config, dlq_topic)?;
    let consumer: BaseConsumer = tail_consumer(config)?;
    let mut assignment = TopicPartitionList::new();
    let mut ends = std::collections::HashMap::new();
    for (p, high) in ends_now {
        if high > 0 {
            ends.insert(p, high);
            assignment.add_partition_offset(dlq_topic, p, Offset::Beginning)?;
        }
    }
    let mut report = ReplayReport::default();
    progress(&report);
    if ends.is_empty() {
        return Ok(report);
    }
    consumer.assign(&assignment)?;
    let mut remaining = ends.clone();
    while !remaining.is_empty() {
        if filter.limit.is_some_and(|l| report.replayed >= l) {
            break;
        }
        let Some(result) = consumer.poll(Duration::from_secs(5)) else {
            continue;
        };
        let message = result?;
        let end = ends[&message.partition()];
        if message.offset() + 1 >= end {
            remaining.remove(&message.partition());
        }
        if message.offset() >= end {
            continue;
        }
        report.scanned += 1;
        let headers = message.headers();
        let reason = headers.and_then(|h| header(h, "gridtalk.dlq.reason"));
        let source = headers.and_then(|h| header(h, "gridtalk.dlq.source_topic"));
        if filter.reason.as_deref().is_some_and(|r| Some(r) != reason) {
            continue;
        }
        if filter
            .source_topic
            .as_deref()
            .is_some_and(|t| Some(t) != source)
        {
            continue;
        }
        if !filter.admits_position(
            headers
                .and_then(|h| header(h, "gridtalk.dlq.source_partition"))
                .and_then(|p| p.parse().ok()),
            headers
                .and_then(|h| header(h, "gridtalk.dlq.source_offset"))
                .and_then(|o| o.parse().ok()),
            message.timestamp().to_millis(),
        ) {
            continue;
        }
        let not_before: Option<i64> = headers
            .and_then(|h| header(h, "gridtalk.dlq.retry_not_before"))
            .and_then(|t| t.parse().ok());
        if not_before.is_some_and(|t| t > now_ms()) {
            report.not_yet_due += 1;
            continue;
        }
        if headers.and_then(|h| header(h, "gridtalk.dlq.truncated")) == Some("true") {
            tracing::warn!(
                offset = message.offset(),
                "dead letter holds only the start of an oversized record; not replayed"
            );
            report.truncated_skipped += 1;
            continue;
        }
        let Some(target) = filter.to_topic.as_deref().or(source) else {
            tracing::warn!(
                offset = message.offset(),
                "dead letter without a source topic; skipped"
            );
            continue;
        };
        // The root: the first letter of the record, which a replayed record carries along (and
        // a letter of it again, since dead letters keep the record's headers).
        let root = root_of(dlq_topic, &message);
        let written_at = message.timestamp().to_millis().unwrap_or(0);
        if let Some(last) = replayed.get(&root) {
            // Again: only a letter written after the last replay of its record (it failed again).
            if !filter.again || written_at <= *last {
                report.already_replayed += 1;
                continue;
            }
        }
        if filter.dry_run {
            report.replayed += 1;
            progress(&report);
            continue;
        }
        let (mut out, _) = without_dlq_headers(headers);
        out = out.insert(Header {
            key: "gridtalk.replayed_from",
            value: Some(root.as_bytes()),
        });
        let mut record = FutureRecord::<[u8], [u8]>::to(target).headers(out);
        if let Some(k) = message.key() {
            record = record.key(k);
        }
        if let Some(p) = message.payload() {
            record = record.payload(p);
        }
        producer
            .send(record, Duration::from_millis(config.request_timeout_ms))
            .await
            .map_err(|(e, _)| KafkaError::Client(e))?;
        let now = now_ms();
        let at = now.to_string();
        crate::changelog::write(
            producer,
            ledger.topic,
            0,
            &root,
            Some((at.as_bytes(), LEDGER_EXPIRY_MS)),
        )?
        .await
        .map_err(|_| KafkaError::Restore("the replay ledger write was cancelled".into()))?
        .map_err(|(e, _)| KafkaError::Client(e))?;
        replayed.insert(root, now);
        report.replayed += 1;
        progress(&report);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::ReplayFilter;

    #[test]
    fn no_range_admits_every_letter_even_without_position_headers() {
        assert!(ReplayFilter::default().admits_position(None, None, None));
        assert!(ReplayFilter::default().admits_position(Some(3), Some(17), Some(5)));
    }

    #[test]
    fn offset_ranges_are_inclusive_and_need_the_partition() {
        let filter = ReplayFilter {
            source_partition: Some(1),
            from_offset: Some(10),
            to_offset: Some(20),
            ..ReplayFilter::default()
        };
        assert!(filter.admits_position(Some(1), Some(10), None));
        assert!(filter.admits_position(Some(1), Some(20), None));
        assert!(!filter.admits_position(Some(1), Some(9), None));
        assert!(!filter.admits_position(Some(1), Some(21), None));
        assert!(!filter.admits_position(Some(0), Some(15), None));
        assert!(!filter.admits_position(None, Some(15), None));
        assert!(!filter.admits_position(Some(1), None, None));
    }

    #[test]
    fn open_ended_time_ranges() {
        let since = ReplayFilter {
            since_ms: Some(1_000),
            ..ReplayFilter::default()
        };
        assert!(since.admits_position(None, None, Some(1_000)));
        assert!(since.admits_position(None, None, Some(i64::MAX)));
        assert!(!since.admits_position(None, None, Some(999)));
        assert!(!since.admits_position(None, None, None));
        let until = ReplayFilter {
            until_ms: Some(1_000),
            ..ReplayFilter::default()
        };
        assert!(until.admits_position(None, None, Some(0)));
        assert!(!until.admits_position(None, None, Some(1_001)));
    }
}
