//! The dead-letter topic: what could not be processed, with the original bytes and the reason.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use gridtalk_config::KafkaConfig;

use crate::{tail_consumer, KafkaError};

/// Prefix of the headers gridtalk adds to a dead letter.
pub const DLQ_HEADER_PREFIX: &str = "gridtalk.dlq.";

/// Why a record was dead-lettered. The code is the `gridtalk.dlq.reason` header and the `reason`
/// label of `gridtalk_dead_letters_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterReason {
    MalformedAvro,
    UnknownSchema,
    MissingField,
    Oversized,
    UnknownEventType,
    UnknownPartner,
    NoRecipient,
    InvalidPhone,
    UnknownTemplate,
    WhatsappPermanent,
    WhatsappRetriesExhausted,
    MalformedOutbox,
    MalformedWebhookItem,
}

impl DeadLetterReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::MalformedAvro => "malformed_avro",
            DeadLetterReason::UnknownSchema => "unknown_schema",
            DeadLetterReason::MissingField => "missing_field",
            DeadLetterReason::Oversized => "oversized",
            DeadLetterReason::UnknownEventType => "unknown_event_type",
            DeadLetterReason::UnknownPartner => "unknown_partner",
            DeadLetterReason::NoRecipient => "no_recipient",
            DeadLetterReason::InvalidPhone => "invalid_phone",
            DeadLetterReason::UnknownTemplate => "unknown_template",
            DeadLetterReason::WhatsappPermanent => "whatsapp_permanent",
            DeadLetterReason::WhatsappRetriesExhausted => "whatsapp_retries_exhausted",
            DeadLetterReason::MalformedOutbox => "malformed_outbox",
            DeadLetterReason::MalformedWebhookItem => "malformed_webhook_item",
        }
    }
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
    let mut headers = OwnedHeaders::new();
    if let Some(original) = source.headers() {
        for h in original
            .iter()
            .filter(|h| !h.key.starts_with(DLQ_HEADER_PREFIX))
        {
            headers = headers.insert(Header {
                key: h.key,
                value: h.value,
            });
        }
    }
    let failed_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default();
    let partition = source.partition().to_string();
    let offset = source.offset().to_string();
    let timestamp = source.timestamp().to_millis().unwrap_or(-1).to_string();
    let failed_at = failed_at.to_string();
    let mut ours: Vec<(String, &str)> = vec![
        ("reason".into(), reason.as_str()),
        ("detail".into(), detail),
        ("stage".into(), stage),
        ("source_topic".into(), source.topic()),
        ("source_partition".into(), &partition),
        ("source_offset".into(), &offset),
        ("source_timestamp".into(), &timestamp),
        ("failed_at".into(), &failed_at),
    ];
    ours.extend(extra.iter().map(|(k, v)| (k.to_string(), *v)));
    for (key, value) in &ours {
        headers = headers.insert(Header {
            key: &format!("{DLQ_HEADER_PREFIX}{key}"),
            value: Some(value.as_bytes()),
        });
    }
    let mut record = FutureRecord::<[u8], [u8]>::to(dlq_topic).headers(headers);
    if let Some(key) = source.key() {
        record = record.key(key);
    }
    if let Some(payload) = source.payload() {
        record = record.payload(payload);
    }
    producer
        .send(record, timeout)
        .await
        .map_err(|(e, _)| KafkaError::Client(e))?;
    gridtalk_telemetry::Metrics::global()
        .dead_letters
        .with_label_values(&[stage, reason.as_str()])
        .inc();
    tracing::warn!(
        stage,
        reason = reason.as_str(),
        detail,
        source_topic = source.topic(),
        source_partition = source.partition(),
        source_offset = source.offset(),
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
    /// Publish to this topic instead of each letter's source topic.
    pub to_topic: Option<String>,
    /// Stop after this many replays.
    pub limit: Option<usize>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayReport {
    pub scanned: usize,
    pub replayed: usize,
}

fn header<'a, H: Headers>(headers: &'a H, key: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|h| h.key == key)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}

/// Re-publishes the dead letters that match `filter`, from the start of the topic up to its end
/// at the time of the call, with their original key, value and headers (reason headers removed,
/// `gridtalk.replayed_from` added). Each replay is acknowledged before the next is read.
pub async fn replay_dead_letters(
    config: &KafkaConfig,
    producer: &FutureProducer,
    dlq_topic: &str,
    filter: &ReplayFilter,
) -> Result<ReplayReport, KafkaError> {
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
        let Some(target) = filter.to_topic.as_deref().or(source) else {
            tracing::warn!(
                offset = message.offset(),
                "dead letter without a source topic; skipped"
            );
            continue;
        };
        let mut out = OwnedHeaders::new();
        if let Some(h) = headers {
            for h in h.iter().filter(|h| !h.key.starts_with(DLQ_HEADER_PREFIX)) {
                out = out.insert(Header {
                    key: h.key,
                    value: h.value,
                });
            }
        }
        let origin = format!("{dlq_topic}/{}/{}", message.partition(), message.offset());
        out = out.insert(Header {
            key: "gridtalk.replayed_from",
            value: Some(origin.as_bytes()),
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
        report.replayed += 1;
    }
    Ok(report)
}
