//! Tailing the directory topic into the shared directory; records it cannot apply are
//! dead-lettered with `stage=directory`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use gridtalk_config::KafkaConfig;

use crate::{Directory, SharedDirectory};

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
