//! The partner and contact directory: who works for which partner, in which roles, at which phone
//! number, in which language, and whether they opted in to WhatsApp.
//!
//! Two sources: a TOML file (the baseline, read at start-up) and a compacted Kafka topic whose
//! records override or delete entries (key `partner:<id>` or `contact:<id>`, JSON value, null value
//! deletes). Every route and converse instance reads the whole topic (it is not partitioned work), from the
//! beginning, and is ready only once it has caught up with the topic's end.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use gridtalk_config::KafkaConfig;
use gridtalk_kafka::DeadLetterReason;

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Partner {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub trading_addresses: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Contact {
    pub id: String,
    pub name: String,
    /// E.164, with or without `+`.
    pub phone: String,
    /// Preferred template language, e.g. `de_DE`.
    #[serde(default)]
    pub language: Option<String>,
    /// Only contacts who opted in receive WhatsApp messages.
    #[serde(default)]
    pub opted_in: bool,
    /// The partner this contact works for; none for the company's own people.
    #[serde(default)]
    pub partner: Option<String>,
    #[serde(default)]
    pub roles: Vec<String>,
}

/// The file format.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DirectoryFile {
    #[serde(default)]
    pub partners: Vec<Partner>,
    #[serde(default)]
    pub contacts: Vec<Contact>,
}

#[derive(Debug, Clone, Default)]
pub struct Directory {
    partners: HashMap<String, Partner>,
    contacts: HashMap<String, Contact>,
}

impl Directory {
    pub fn from_file_data(file: DirectoryFile) -> Self {
        let mut d = Directory::default();
        for p in file.partners {
            d.partners.insert(p.id.clone(), p);
        }
        for c in file.contacts {
            d.contacts.insert(c.id.clone(), c);
        }
        d
    }

    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let file: DirectoryFile =
            toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Self::from_file_data(file))
    }

    /// Applies one directory-topic record. A record it cannot apply is refused with the
    /// dead-letter reason and why, and the entry is left as it was: a key that is not
    /// `partner:<id>` / `contact:<id>` or a value that is not such an entry is
    /// `malformed_directory_record`; a contact whose phone is not a number WhatsApp can reach is
    /// `invalid_phone` here, once, instead of at every event for that contact.
    pub fn apply(
        &mut self,
        key: &str,
        value: Option<&[u8]>,
    ) -> Result<(), (DeadLetterReason, String)> {
        let malformed = |detail: String| (DeadLetterReason::MalformedDirectoryRecord, detail);
        let (kind, id) = key
            .split_once(':')
            .ok_or_else(|| malformed(format!("key {key:?} is not kind:id")))?;
        match (kind, value) {
            ("partner", None) => {
                self.partners.remove(id);
            }
            ("contact", None) => {
                self.contacts.remove(id);
            }
            ("partner", Some(v)) => {
                let p: Partner =
                    serde_json::from_slice(v).map_err(|e| malformed(format!("{key}: {e}")))?;
                self.partners.insert(id.to_string(), p);
            }
            ("contact", Some(v)) => {
                let c: Contact =
                    serde_json::from_slice(v).map_err(|e| malformed(format!("{key}: {e}")))?;
                if let Err(e) = gridtalk_whatsapp::normalize_phone(&c.phone) {
                    return Err((
                        DeadLetterReason::InvalidPhone,
                        format!("{key}: phone {:?}: {e}", c.phone),
                    ));
                }
                self.contacts.insert(id.to_string(), c);
            }
            _ => {
                return Err(malformed(format!(
                    "key {key:?}: kind must be partner or contact"
                )))
            }
        }
        Ok(())
    }

    pub fn partner(&self, id: &str) -> Option<&Partner> {
        self.partners.get(id)
    }

    pub fn contact(&self, id: &str) -> Option<&Contact> {
        self.contacts.get(id)
    }

    /// Contacts of `partner` (or internal ones when `None`) having any of `roles`, sorted by id.
    pub fn with_roles(&self, partner: Option<&str>, roles: &[String]) -> Vec<&Contact> {
        let mut found: Vec<&Contact> = self
            .contacts
            .values()
            .filter(|c| {
                c.partner.as_deref() == partner && c.roles.iter().any(|r| roles.contains(r))
            })
            .collect();
        found.sort_by(|a, b| a.id.cmp(&b.id));
        found
    }

    /// The contact whose phone number is the WhatsApp id `wa_id` (digits of E.164), if any.
    /// Numbers in the directory are compared after the same normalisation as when sending.
    pub fn contact_by_wa_id(&self, wa_id: &str) -> Option<&Contact> {
        let mut found: Vec<&Contact> = self
            .contacts
            .values()
            .filter(|c| gridtalk_whatsapp::normalize_phone(&c.phone).is_ok_and(|p| p == wa_id))
            .collect();
        // One number shared by two directory entries is ambiguous: the lowest id decides, stably.
        found.sort_by(|a, b| a.id.cmp(&b.id));
        found.into_iter().next()
    }

    pub fn counts(&self) -> (usize, usize) {
        (self.partners.len(), self.contacts.len())
    }
}

/// The directory shared between the tailing task and the route stage.
pub type SharedDirectory = Arc<RwLock<Directory>>;

fn publish_counts(directory: &Directory) {
    let (partners, contacts) = directory.counts();
    let m = gridtalk_telemetry::Metrics::global();
    m.directory_entries
        .with_label_values(&["partner"])
        .set(partners as i64);
    m.directory_entries
        .with_label_values(&["contact"])
        .set(contacts as i64);
}

/// Tails the directory topic into `directory` until `shutdown`. Sets `ready` once the end of the
/// topic as of start-up has been applied. Runs on a blocking thread (librdkafka polling).
pub fn tail_directory(
    kafka: KafkaConfig,
    topic: String,
    dlq_topic: String,
    directory: SharedDirectory,
    ready: Arc<AtomicBool>,
    shutdown: CancellationToken,
) -> Result<(), String> {
    // The end as of start-up, exactly (see `gridtalk_kafka::end_offsets`): routing waits for it.
    let ends = gridtalk_kafka::end_offsets(&kafka, &topic).map_err(|e| e.to_string())?;
    let consumer: BaseConsumer =
        gridtalk_kafka::tail_consumer(&kafka).map_err(|e| e.to_string())?;
    // Made on the first refused record: most directories never need it.
    let mut producer = None;
    let runtime = tokio::runtime::Handle::current();
    let mut assignment = TopicPartitionList::new();
    let mut catch_up: HashMap<i32, i64> = HashMap::new();
    for (partition, end) in ends {
        assignment
            .add_partition_offset(&topic, partition, Offset::Beginning)
            .map_err(|e| e.to_string())?;
        if end > 0 {
            catch_up.insert(partition, end);
        }
    }
    consumer.assign(&assignment).map_err(|e| e.to_string())?;
    if catch_up.is_empty() {
        ready.store(true, Ordering::Release);
    }
    publish_counts(&directory.read().expect("directory lock"));
    while !shutdown.is_cancelled() {
        let Some(result) = consumer.poll(Duration::from_millis(250)) else {
            continue;
        };
        let message = match result {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "directory topic read failed; retrying");
                continue;
            }
        };
        let key = message
            .key()
            .map(String::from_utf8_lossy)
            .unwrap_or_default();
        let refused = {
            let mut d = directory.write().expect("directory lock");
            let applied = d.apply(&key, message.payload());
            publish_counts(&d);
            applied.err()
        };
        match refused {
            None => tracing::debug!(key = %key, "directory entry updated"),
            // The operator sees it on the dead-letter topic (and its metric and log line); every
            // process reading the directory refuses it alike, so each writes one.
            Some((reason, detail)) => {
                if producer.is_none() {
                    producer = Some(gridtalk_kafka::producer(&kafka).map_err(|e| e.to_string())?);
                }
                let producer = producer.as_ref().expect("made above");
                let written = runtime.block_on(gridtalk_kafka::dead_letter(
                    producer,
                    &dlq_topic,
                    "directory",
                    reason,
                    &detail,
                    &message,
                    &[],
                    Duration::from_millis(kafka.delivery_timeout_ms),
                ));
                if let Err(e) = written {
                    tracing::error!(error = %e, key = %key, offset = message.offset(), reason = reason.as_str(), detail, "directory record refused; its dead letter could not be written");
                }
            }
        }
        if let Some(high) = catch_up.get(&message.partition()).copied() {
            if message.offset() + 1 >= high {
                catch_up.remove(&message.partition());
                if catch_up.is_empty() {
                    tracing::info!("directory caught up with its topic");
                    ready.store(true, Ordering::Release);
                }
            }
        }
    }
    Ok(())
}

/// Opens the directory a stage works with: the file baseline, then the directory topic's
/// overrides, tailed in the background. Returns once the topic is caught up (as of start-up), so
/// nothing is decided on a stale directory; an error if the file is unreadable or the reader stops.
pub async fn open(
    config: &gridtalk_config::Config,
    shutdown: &CancellationToken,
) -> Result<SharedDirectory, String> {
    let directory: SharedDirectory = Arc::new(RwLock::new(match &config.directory.file {
        Some(path) => Directory::load(path)?,
        None => Directory::default(),
    }));
    let ready = Arc::new(AtomicBool::new(false));
    let tail = {
        let (kafka, topic, dlq, directory, ready, stop) = (
            config.kafka.clone(),
            config.topics.directory.clone(),
            config.topics.dlq.clone(),
            directory.clone(),
            ready.clone(),
            shutdown.child_token(),
        );
        tokio::task::spawn_blocking(move || {
            tail_directory(kafka, topic, dlq, directory, ready, stop)
        })
    };
    while !ready.load(Ordering::Acquire) {
        if shutdown.is_cancelled() {
            return Ok(directory);
        }
        if tail.is_finished() {
            return Err(match tail.await {
                Ok(Err(e)) => e,
                Ok(Ok(())) => "directory reader stopped".into(),
                Err(e) => e.to_string(),
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(directory)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_it_cannot_apply_are_refused_with_their_reason_and_change_nothing() {
        let mut d = Directory::default();
        let good = br#"{"id": "c1", "name": "One", "phone": "+1 415 555 0101", "language": "en_US",
                        "opted_in": true, "roles": ["billing"]}"#;
        d.apply("contact:c1", Some(good)).expect("applies");
        let cases: [(&str, &[u8], DeadLetterReason); 4] = [
            (
                "contact:c1",
                br#"{"id": "c1", "name": "One", "phone": "+1-555-CALL-ME", "language": "en_US",
                     "opted_in": true, "roles": ["billing"]}"#,
                DeadLetterReason::InvalidPhone,
            ),
            (
                "contact:c1",
                b"not json",
                DeadLetterReason::MalformedDirectoryRecord,
            ),
            (
                "no-colon",
                b"{}",
                DeadLetterReason::MalformedDirectoryRecord,
            ),
            (
                "robot:r1",
                b"{}",
                DeadLetterReason::MalformedDirectoryRecord,
            ),
        ];
        for (key, value, reason) in cases {
            let refused = d.apply(key, Some(value)).expect_err(key);
            assert_eq!(refused.0, reason, "{key}: {}", refused.1);
        }
        assert_eq!(d.contact("c1").expect("kept").phone, "+1 415 555 0101");
    }
}
