//! The send stage's consumer loop and per-recipient workers (see the crate docs).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rand::Rng;
use rdkafka::consumer::Consumer;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use gridtalk_config::{Config, Secret};
use gridtalk_contract::{AvroRecord, OutboxMessage, SentMessage};
use gridtalk_kafka::{dead_letter, DeadLetterReason, KafkaError, StageProgress};
use gridtalk_telemetry::{mask_phone, Metrics, Readiness};
use gridtalk_whatsapp::{CloudApiClient, ErrorClass, RetryScope};

use crate::index::{IndexedSend, SentIndex};
use crate::limits::SendLimits;

const STAGE: &str = "send";

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error("configuration: {0}")]
    Config(String),
    #[error("hand-off failed, stopping so that the records are replayed: {0}")]
    HandOff(String),
}

struct Job {
    message: OwnedMessage,
    outbox: OutboxMessage,
    _permit: OwnedSemaphorePermit,
}

struct Shared {
    config: Arc<Config>,
    progress: StageProgress,
    producer: FutureProducer,
    client: CloudApiClient,
    token: RwLock<Secret>,
    limits: SendLimits,
    /// Pending jobs per recipient; a recipient has an entry exactly while its worker runs.
    queues: Mutex<HashMap<String, VecDeque<Job>>>,
    halted: watch::Sender<bool>,
    /// Held by the one worker that probes while the number is halted.
    prober: tokio::sync::Mutex<()>,
    /// What WhatsApp already accepted, per held outbox partition.
    index: Mutex<SentIndex>,
}

impl Shared {
    fn finish(&self, message: &OwnedMessage) {
        self.progress
            .finish(message.topic(), message.partition(), message.offset());
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.config.kafka.request_timeout_ms)
    }

    /// Whether an outbox record still needs sending by this process: its partition is assigned
    /// here with its sent index restored (otherwise the partition's new owner sends it), and
    /// WhatsApp has not accepted the message yet (such a replay is counted, logged and finished
    /// here). Asked when the record is read, when its turn comes and after every wait, since a
    /// partition can move, or come back and re-deliver records, at any of those points.
    fn still_to_send(&self, message: &OwnedMessage, message_id: &str) -> bool {
        let partition = message.partition();
        let accepted = {
            let index = self.index.lock().expect("index");
            let owned = self
                .progress
                .consumer()
                .context()
                .owns(message.topic(), partition);
            if !owned || !index.is_restored(partition) {
                tracing::debug!(
                    partition,
                    "partition revoked; message left to its new owner"
                );
                return false;
            }
            index.accepted(partition, message_id)
        };
        match accepted {
            Some(wamid) => {
                Metrics::global()
                    .sends
                    .with_label_values(&["replay_suppressed", "none"])
                    .inc();
                tracing::info!(%wamid, message_id, "outbox replay of an accepted message skipped");
                self.finish(message);
                false
            }
            None => true,
        }
    }

    /// How far back a send still weighs on its recipient's pair limit.
    fn pair_memory_ms(&self) -> i64 {
        i64::try_from(self.limits.pair_memory().as_millis()).unwrap_or(i64::MAX)
    }

    /// Sleeps unless the stage stops first. Returns false when stopping.
    async fn pause(&self, duration: Duration) -> bool {
        tokio::select! {
            _ = self.progress.stop.cancelled() => false,
            _ = tokio::time::sleep(duration) => true,
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let initial = self.config.send.retry_initial_backoff_ms as f64;
        let max = self.config.send.retry_max_backoff_ms as f64;
        let base = (initial * 2f64.powi(attempt.min(20) as i32)).min(max);
        // Full jitter between half and the whole backoff.
        Duration::from_millis(rand::rng().random_range(base / 2.0..=base.max(1.0)) as u64)
    }
}

/// Runs the send stage until `shutdown` is cancelled or a hand-off fails.
pub async fn run(
    config: Arc<Config>,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> Result<(), SendError> {
    let ready = readiness.register("send");
    let token = config.read_access_token().map_err(SendError::Config)?;
    {
        let config = config.clone();
        tokio::task::spawn_blocking(move || check_index_partitions(&config))
            .await
            .map_err(|e| SendError::Config(e.to_string()))??;
    }
    let group = format!("{}-send", config.kafka.group_prefix);
    let consumer = gridtalk_kafka::stage_consumer(&config.kafka, &group, STAGE)?;
    consumer
        .subscribe(&[config.topics.outbox.as_str()])
        .map_err(KafkaError::from)?;
    let send = &config.send;
    let shared = Arc::new(Shared {
        producer: gridtalk_kafka::producer(&config.kafka)?,
        client: CloudApiClient::new(
            &send.api_base_url,
            &send.api_version,
            &send.phone_number_id,
            Duration::from_millis(send.request_timeout_ms),
        ),
        token: RwLock::new(token),
        limits: SendLimits::new(send),
        queues: Mutex::new(HashMap::new()),
        halted: watch::channel(false).0,
        prober: tokio::sync::Mutex::new(()),
        index: Mutex::new(SentIndex::default()),
        progress: StageProgress::new(STAGE, consumer, shutdown.child_token()),
        config: config.clone(),
    });
    let max_in_flight = config.send.max_in_flight.max(1);
    let in_flight = Arc::new(Semaphore::new(max_in_flight));
    ready.store(true, Ordering::Release);
    tracing::info!(group, topic = %config.topics.outbox, "send stage running");
    let mut last_shrink = Instant::now();
    let mut last_sweep = Instant::now();

    loop {
        let permit = tokio::select! {
            _ = shared.progress.stop.cancelled() => break,
            p = in_flight.clone().acquire_owned() => p.expect("semaphore open"),
        };
        let message = tokio::select! {
            _ = shared.progress.stop.cancelled() => break,
            received = shared.progress.consumer().recv() => match received {
                Ok(m) => m.detach(),
                Err(e) => {
                    tracing::warn!(error = %e, "consume error; continuing");
                    continue;
                }
            },
        };
        // State follows the assignment: forget revoked partitions, restore new ones before use.
        for (_, partition) in shared.progress.take_revoked() {
            shared
                .index
                .lock()
                .expect("index")
                .drop_partition(partition);
        }
        let partition = message.partition();
        if !shared.index.lock().expect("index").is_restored(partition) {
            // Restore every assigned outbox partition still missing, in one pass.
            let wanted = {
                let index = shared.index.lock().expect("index");
                shared
                    .progress
                    .partitions_to_restore(&config.topics.outbox, partition, |p| {
                        index.is_restored(p)
                    })
            };
            // Not ready while state is restored (the process resumes only after it).
            ready.store(false, Ordering::Release);
            let restored_state = gridtalk_kafka::changelog::restore_for_stage(
                &config.kafka,
                "send_index",
                &config.topics.send_index,
                wanted,
            )
            .await;
            ready.store(true, Ordering::Release);
            match restored_state {
                Ok(restored) => {
                    let mut index = shared.index.lock().expect("index");
                    let now_ms = chrono::Utc::now().timestamp_millis();
                    let since_ms = now_ms.saturating_sub(shared.pair_memory_ms());
                    for (p, entries) in restored {
                        index.restored(p, entries);
                        // The pair limit follows the partition: the previous owner's recent
                        // sends count as if this process had made them.
                        shared.limits.seed_pair_history(
                            &index.sends_since(p, since_ms),
                            now_ms,
                            Duration::from_millis(shared.config.send.request_timeout_ms),
                        );
                    }
                }
                Err(e) => {
                    shared
                        .progress
                        .fail(format!("sent index of partition {partition}: {e}"));
                    break;
                }
            }
        }
        shared
            .progress
            .start(message.topic(), message.partition(), message.offset());
        Metrics::global()
            .sends_in_flight
            .set((max_in_flight - in_flight.available_permits()) as i64);
        let outbox = match message.payload().map(OutboxMessage::from_avro) {
            Some(Ok(o)) => o,
            other => {
                let detail = match other {
                    Some(Err(e)) => e.to_string(),
                    _ => "outbox record has no value".into(),
                };
                let shared = shared.clone();
                tokio::spawn(async move {
                    dead_letter_job(
                        &shared,
                        &message,
                        DeadLetterReason::MalformedOutbox,
                        &detail,
                        &[],
                    )
                    .await;
                    drop(permit);
                });
                continue;
            }
        };
        if !shared.still_to_send(&message, &outbox.message_id) {
            drop(permit);
            continue;
        }
        if last_sweep.elapsed() > Duration::from_secs(60) {
            sweep_index(&shared);
            last_sweep = Instant::now();
        }
        let recipient = outbox.recipient.clone();
        let job = Job {
            message,
            outbox,
            _permit: permit,
        };
        let spawn_worker = {
            let mut queues = shared.queues.lock().expect("queues");
            match queues.get_mut(&recipient) {
                Some(queue) => {
                    queue.push_back(job);
                    false
                }
                None => {
                    queues.insert(recipient.clone(), VecDeque::from([job]));
                    true
                }
            }
        };
        if spawn_worker {
            tokio::spawn(recipient_worker(shared.clone(), recipient));
        }
        if last_shrink.elapsed() > Duration::from_secs(60) {
            shared.limits.shrink();
            last_shrink = Instant::now();
        }
    }

    // Drain: wait for in-flight sends up to the deadline, then commit what finished.
    let deadline = Duration::from_millis(shared.config.admin.shutdown_deadline_ms);
    if let Some(detail) = shared
        .progress
        .close(&in_flight, max_in_flight, deadline)
        .await
    {
        return Err(SendError::HandOff(detail));
    }
    tracing::info!("send stage stopped");
    Ok(())
}

/// Fails unless the sent index has a partition for every outbox partition.
fn check_index_partitions(config: &Config) -> Result<(), SendError> {
    let probe = gridtalk_kafka::tail_consumer(&config.kafka)?;
    let outbox = gridtalk_kafka::partitions_of(&probe, &config.topics.outbox)?;
    let index = gridtalk_kafka::partitions_of(&probe, &config.topics.send_index)?;
    if index.len() < outbox.len() {
        return Err(SendError::Config(format!(
            "topic {} has {} partitions but the outbox {} has {}: the sent index needs one per outbox partition",
            config.topics.send_index,
            index.len(),
            config.topics.outbox,
            outbox.len()
        )));
    }
    Ok(())
}

/// Deletes expired sent-index entries, in memory and (with tombstones) in the changelog.
fn sweep_index(shared: &Shared) {
    let (expired, live) = {
        let mut index = shared.index.lock().expect("index");
        let expired = index.expire(chrono::Utc::now().timestamp_millis());
        (expired, index.len())
    };
    Metrics::global()
        .state_entries
        .with_label_values(&["send_index"])
        .set(live as i64);
    for (partition, message_id) in expired {
        if let Err(e) = gridtalk_kafka::changelog::write(
            &shared.producer,
            &shared.config.topics.send_index,
            partition,
            &message_id,
            None,
        ) {
            tracing::warn!(error = %e, "sent-index tombstone not written; compaction keeps the entry until the next one");
        }
    }
}

async fn recipient_worker(shared: Arc<Shared>, recipient: String) {
    loop {
        let job = {
            let mut queues = shared.queues.lock().expect("queues");
            let Some(queue) = queues.get_mut(&recipient) else {
                return;
            };
            match queue.pop_front() {
                Some(job) => job,
                None => {
                    queues.remove(&recipient);
                    return;
                }
            }
        };
        if !send_job(&shared, &job).await {
            // Stopping: leave the rest unfinished so they are replayed.
            shared.queues.lock().expect("queues").remove(&recipient);
            return;
        }
    }
}

async fn dead_letter_job(
    shared: &Shared,
    message: &OwnedMessage,
    reason: DeadLetterReason,
    detail: &str,
    extra: &[(&str, &str)],
) {
    match dead_letter(
        &shared.producer,
        &shared.config.topics.dlq,
        STAGE,
        reason,
        detail,
        message,
        extra,
        shared.timeout(),
    )
    .await
    {
        Ok(()) => shared.finish(message),
        Err(e) => shared.progress.fail(format!("dead letter: {e}")),
    }
}

/// Sends one message until it is accepted, dead-lettered, or the stage stops (returns false).
async fn send_job(shared: &Shared, job: &Job) -> bool {
    let metrics = Metrics::global();
    let outbox = &job.outbox;
    // Checked again now, not only when the record was read: a partition revoked and assigned
    // back re-delivers records whose first copy may be queued ahead of this one and sent since.
    if !shared.still_to_send(&job.message, &outbox.message_id) {
        return true;
    }
    let mut attempt: u32 = 0;
    let mut recipient_attempt: u32 = 0;
    loop {
        if *shared.halted.borrow() {
            match shared.prober.try_lock() {
                Ok(_probe) => {
                    // This worker probes for the number: wait, pick up a rotated token, try.
                    if !shared
                        .pause(Duration::from_millis(
                            shared.config.send.halt_probe_interval_ms,
                        ))
                        .await
                    {
                        return false;
                    }
                    match shared.config.read_access_token() {
                        Ok(token) => *shared.token.write().expect("token") = token,
                        Err(e) => tracing::warn!(error = %e, "could not re-read the access token"),
                    }
                }
                Err(_) => {
                    let mut rx = shared.halted.subscribe();
                    tokio::select! {
                        _ = shared.progress.stop.cancelled() => return false,
                        _ = rx.wait_for(|halted| !*halted) => {}
                    }
                    continue;
                }
            }
        }
        tokio::select! {
            _ = shared.progress.stop.cancelled() => return false,
            _ = shared.limits.until_ready(&outbox.recipient) => {}
        }
        // The wait may have outlasted the assignment: once the partition moved, its new owner
        // sends this message (and counts the recipient's pair limit); sending here as well
        // would break both.
        if !shared.still_to_send(&job.message, &outbox.message_id) {
            return true;
        }
        let token = shared.token.read().expect("token").clone();
        let started = Instant::now();
        let sent_at_ms = chrono::Utc::now().timestamp_millis();
        let result = shared.client.send(&token, &outbox.request_json).await;
        attempt += 1;
        match result {
            Ok(accepted) => {
                metrics
                    .send_request_seconds
                    .with_label_values(&["accepted"])
                    .observe(started.elapsed().as_secs_f64());
                metrics.sends.with_label_values(&["accepted", "none"]).inc();
                if shared.halted.send_replace(false) {
                    metrics.sender_halted.set(0);
                    tracing::warn!(phone_number_id = %outbox.phone_number_id, "sending resumed");
                }
                let sent = SentMessage {
                    wamid: accepted.wamid.clone(),
                    message_id: outbox.message_id.clone(),
                    event_id: outbox.event_id.clone(),
                    event_type: outbox.event_type.clone(),
                    correlation_id: outbox.correlation_id.clone(),
                    document_key: outbox.document_key.clone(),
                    partner_id: outbox.partner_id.clone(),
                    phone_number_id: outbox.phone_number_id.clone(),
                    contact_id: outbox.contact_id.clone(),
                    recipient: outbox.recipient.clone(),
                    wa_id: accepted.wa_id.clone(),
                    template_name: outbox.template_name.clone(),
                    message_status: accepted.message_status.clone(),
                    attempts: attempt as i32,
                    accepted_at: chrono::Utc::now().timestamp_millis(),
                };
                let bytes = sent.to_avro();
                let record = FutureRecord::to(&shared.config.topics.sent)
                    // Keyed by the WhatsApp id Meta resolved the recipient to: webhooks name the
                    // contact by that id, so replies and statuses land on the same partition number.
                    .key(accepted.wa_id.as_bytes())
                    .payload(&bytes);
                if let Err((e, _)) = shared.producer.send(record, shared.timeout()).await {
                    shared.progress.fail(format!("sent log: {e}"));
                    return false;
                }
                // Then the sent index, before the outbox offset may move: a replay of this record
                // finds it and is not sent again.
                let partition = job.message.partition();
                let expires = sent.accepted_at
                    + (shared.config.send.index_retention_hours as i64).saturating_mul(3_600_000);
                let indexed_send = IndexedSend {
                    wamid: accepted.wamid.clone(),
                    recipient: outbox.recipient.clone(),
                    sent_at_ms,
                };
                let indexed = gridtalk_kafka::changelog::write(
                    &shared.producer,
                    &shared.config.topics.send_index,
                    partition,
                    &outbox.message_id,
                    Some((&indexed_send.encode(), expires)),
                );
                match indexed {
                    Ok(delivery) => {
                        if !shared
                            .progress
                            .delivered(vec![delivery], "sent index")
                            .await
                        {
                            return false;
                        }
                    }
                    Err(e) => {
                        shared.progress.fail(format!("sent index: {e}"));
                        return false;
                    }
                }
                shared.index.lock().expect("index").record(
                    partition,
                    &outbox.message_id,
                    &indexed_send,
                    expires,
                );
                let age = (sent.accepted_at - outbox.created_at).max(0) as f64 / 1000.0;
                metrics
                    .end_to_end_seconds
                    .with_label_values(&[&outbox.event_type])
                    .observe(age);
                tracing::info!(wamid = %accepted.wamid, to = %mask_phone(&outbox.recipient), template = outbox.template_name.as_deref().unwrap_or("-"), event_id = %outbox.event_id, attempts = attempt, "message accepted by WhatsApp");
                shared.finish(&job.message);
                return true;
            }
            Err(error) => {
                let class = error.class();
                let code = error
                    .code()
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "transport".into());
                metrics
                    .send_request_seconds
                    .with_label_values(&["error"])
                    .observe(started.elapsed().as_secs_f64());
                metrics.send_errors.with_label_values(&[&code]).inc();
                let wait = match class {
                    ErrorClass::Retry(RetryScope::Number) => shared.backoff(attempt - 1),
                    ErrorClass::Retry(RetryScope::Recipient) => {
                        // Meta's advice for the pair limit: 4^x seconds, only for this recipient.
                        recipient_attempt += 1;
                        Duration::from_secs(4u64.pow(recipient_attempt.min(4) - 1)).min(
                            Duration::from_millis(shared.config.send.retry_max_backoff_ms),
                        )
                    }
                    ErrorClass::Retry(RetryScope::Limited)
                        if attempt < shared.config.send.max_unknown_error_attempts =>
                    {
                        shared.backoff(attempt - 1)
                    }
                    ErrorClass::Retry(RetryScope::Limited) | ErrorClass::Permanent => {
                        metrics
                            .sends
                            .with_label_values(&["dead_letter", class.label()])
                            .inc();
                        let reason = if class == ErrorClass::Permanent {
                            DeadLetterReason::WhatsappPermanent
                        } else {
                            DeadLetterReason::WhatsappRetriesExhausted
                        };
                        dead_letter_job(
                            shared,
                            &job.message,
                            reason,
                            &error.to_string(),
                            &[("whatsapp_code", &code)],
                        )
                        .await;
                        return true;
                    }
                    ErrorClass::HaltSender => {
                        metrics
                            .sends
                            .with_label_values(&["halt", class.label()])
                            .inc();
                        if !shared.halted.send_replace(true) {
                            metrics.sender_halted.set(1);
                            tracing::error!(code = %code, error = %error, phone_number_id = %outbox.phone_number_id, "sending halted for the number: operator action needed (token, account or policy); messages are kept");
                        }
                        continue;
                    }
                };
                metrics
                    .sends
                    .with_label_values(&["retry", class.label()])
                    .inc();
                tracing::info!(code = %code, attempt, wait_ms = wait.as_millis() as u64, to = %mask_phone(&outbox.recipient), "send will be retried");
                if !shared.pause(wait).await {
                    return false;
                }
            }
        }
    }
}
