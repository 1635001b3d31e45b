//! The converse stage's consumer loop (see the crate docs for its guarantees).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::message::{Header, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use gridtalk_config::Config;
use gridtalk_contract::{AvroRecord, SentMessage, WorkflowResponse};
use gridtalk_directory::SharedDirectory;
use gridtalk_ingest::WebhookItem;
use gridtalk_kafka::{dead_letter, DeadLetterReason, KafkaError, StageProgress};
use gridtalk_telemetry::{Metrics, Readiness};

use crate::conversation::{Conversations, Handled, Outcome, Settings};

const STAGE: &str = "converse";
/// Publishes awaiting acknowledgement at once; the loop waits beyond it.
const MAX_IN_FLIGHT: usize = 512;
/// How long the converse state remembers a decision, a status or an answered item: longer than
/// a button stays valid and than Meta keeps redelivering a webhook.
const STATE_RETENTION_MS: i64 = 8 * 24 * 3_600_000;

#[derive(Debug, thiserror::Error)]
pub enum ConverseError {
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error("configuration: {0}")]
    Config(String),
    #[error("hand-off failed, stopping so that the records are replayed: {0}")]
    HandOff(String),
}

struct Shared {
    config: Arc<Config>,
    progress: StageProgress,
    producer: FutureProducer,
    /// Response ids found on the response topic at the last takeovers, with when they were
    /// read: a replayed item whose response is among them is not published again.
    published: std::sync::Mutex<HashMap<String, i64>>,
    /// When each state entry of each held webhook partition expires, for its tombstone.
    expiries: std::sync::Mutex<HashMap<i32, HashMap<String, i64>>>,
}

impl Shared {
    fn finish(&self, message: &OwnedMessage) {
        self.progress
            .finish(message.topic(), message.partition(), message.offset());
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.config.kafka.request_timeout_ms)
    }
}

/// A webhook item waiting for the sent-log record of the message it refers to.
struct Waiting {
    message: OwnedMessage,
    item: WebhookItem,
    deadline: Instant,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn settings(config: &Config) -> Result<Settings, ConverseError> {
    let secret = config
        .button_secret()
        .map_err(ConverseError::Config)?
        .ok_or_else(|| {
            ConverseError::Config(
                "the converse stage verifies buttons: set route.button_secret or route.button_secret_file"
                    .into(),
            )
        })?;
    let template = config
        .templates
        .iter()
        .find(|t| t.name == config.converse.confirmation_template)
        .ok_or_else(|| {
            ConverseError::Config(format!(
                "converse.confirmation_template {} is not a configured template",
                config.converse.confirmation_template
            ))
        })?;
    Ok(Settings {
        button_secret: secret.expose().as_bytes().to_vec(),
        service_window_ms: (config.converse.service_window_minutes as i64).saturating_mul(60_000),
        confirmation_template: template.name.clone(),
        confirmation_languages: template.languages.clone(),
        phone_number_id: config.send.phone_number_id.clone(),
        remembered_items: config.converse.remembered_items,
    })
}

/// Fails unless the webhook topic and the sent log have the same partition count: the join is
/// local only if a contact's replies and sent messages land on partitions of the same number.
fn check_co_partitioned(config: &Config) -> Result<(), ConverseError> {
    let probe = gridtalk_kafka::tail_consumer(&config.kafka)?;
    let sent = gridtalk_kafka::partitions_of(&probe, &config.topics.sent)?;
    let webhook = gridtalk_kafka::partitions_of(&probe, &config.topics.webhook)?;
    if sent.len() != webhook.len() {
        return Err(ConverseError::Config(format!(
            "topics {} ({} partitions) and {} ({} partitions) must have the same partition count to be joined",
            config.topics.sent,
            sent.len(),
            config.topics.webhook,
            webhook.len()
        )));
    }
    Ok(())
}

/// Runs the converse stage until `shutdown` is cancelled or a hand-off fails.
pub async fn run(
    config: Arc<Config>,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> Result<(), ConverseError> {
    let ready = readiness.register("converse");
    let mut conversations = Conversations::new(settings(&config)?);
    {
        let config = config.clone();
        tokio::task::spawn_blocking(move || check_co_partitioned(&config))
            .await
            .map_err(|e| ConverseError::Config(e.to_string()))??;
    }
    let directory = gridtalk_directory::open(&config, &shutdown)
        .await
        .map_err(ConverseError::Config)?;

    let group = format!("{}-converse", config.kafka.group_prefix);
    let consumer = gridtalk_kafka::co_partitioned_consumer(&config.kafka, &group, STAGE)?;
    consumer
        .subscribe(&[&config.topics.sent, &config.topics.webhook])
        .map_err(KafkaError::from)?;
    let shared = Arc::new(Shared {
        producer: gridtalk_kafka::producer(&config.kafka)?,
        config: config.clone(),
        progress: StageProgress::new(STAGE, consumer, shutdown.child_token()),
        published: std::sync::Mutex::new(HashMap::new()),
        expiries: std::sync::Mutex::new(HashMap::new()),
    });
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let join_wait = Duration::from_millis(config.converse.join_wait_ms);
    let mut waiting: HashMap<String, Vec<Waiting>> = HashMap::new();
    let mut restored: std::collections::HashSet<i32> = std::collections::HashSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut last_sweep = Instant::now();
    ready.store(true, Ordering::Release);
    tracing::info!(group, sent = %config.topics.sent, webhook = %config.topics.webhook, "converse stage running");

    loop {
        let message = tokio::select! {
            _ = shared.progress.stop.cancelled() => break,
            _ = tick.tick() => {
                if last_sweep.elapsed() > Duration::from_secs(60) {
                    sweep_state(&shared);
                    last_sweep = Instant::now();
                }
                // Items whose message never showed up in the sent log within the join wait.
                let now = Instant::now();
                let expired: Vec<String> = waiting
                    .iter()
                    .filter(|(_, items)| items.iter().any(|w| w.deadline <= now))
                    .map(|(wamid, _)| wamid.clone())
                    .collect();
                for wamid in expired {
                    let items = waiting.remove(&wamid).unwrap_or_default();
                    for mut w in items {
                        // Unknown only once the sent log of the item's partition has also been
                        // read to its end: after a restart with a backlog, the stage itself can
                        // be what keeps the sent record from it, not the send stage.
                        if w.deadline <= now
                            && !shared
                                .progress
                                .consumer()
                                .context()
                                .caught_up(&config.topics.sent, w.message.partition())
                        {
                            w.deadline = now + Duration::from_secs(1);
                        }
                        if w.deadline <= now {
                            offer(&shared, &in_flight, &mut conversations, &directory, &mut waiting, w, true, join_wait).await;
                        } else {
                            waiting.entry(wamid.clone()).or_default().push(w);
                        }
                    }
                }
                continue;
            }
            received = shared.progress.consumer().recv() => match received {
                Ok(m) => m.detach(),
                Err(e) => {
                    tracing::warn!(error = %e, "consume error; continuing");
                    continue;
                }
            },
        };
        // State follows the assignment: a revoked webhook partition is restored again if it comes
        // back (merging what its other owner wrote meanwhile), its parked items are left to the
        // new owner (they are uncommitted), and its entries are swept by the new owner.
        for (topic, partition) in shared.progress.take_revoked() {
            if topic == config.topics.webhook {
                restored.remove(&partition);
                shared.expiries.lock().expect("expiries").remove(&partition);
                waiting.retain(|_, items| {
                    items.retain(|w| w.message.partition() != partition);
                    !items.is_empty()
                });
            }
        }
        if message.topic() == config.topics.sent {
            let Some(sent) = message
                .payload()
                .and_then(|p| SentMessage::from_avro(p).ok())
            else {
                Metrics::global()
                    .converse_items
                    .with_label_values(&["unreadable_sent_record"])
                    .inc();
                tracing::warn!(
                    partition = message.partition(),
                    offset = message.offset(),
                    "sent-log record is not a SentMessage; skipped"
                );
                continue;
            };
            conversations.apply_sent(&sent);
            for w in waiting.remove(&sent.wamid).unwrap_or_default() {
                offer(
                    &shared,
                    &in_flight,
                    &mut conversations,
                    &directory,
                    &mut waiting,
                    w,
                    false,
                    join_wait,
                )
                .await;
            }
            continue;
        }
        if !restored.contains(&message.partition()) {
            // The state of every assigned webhook partition, in one pass, before its first item.
            let wanted = shared.progress.partitions_to_restore(
                &config.topics.webhook,
                message.partition(),
                |p| restored.contains(&p),
            );
            // Not ready while state is restored (the process resumes only after it).
            ready.store(false, Ordering::Release);
            let restored_state = gridtalk_kafka::changelog::restore_for_stage(
                &config.kafka,
                "converse",
                &config.topics.converse_state,
                wanted.clone(),
            )
            .await;
            // What reached the response topic but not the state (a crash between the two).
            let published = match restored_state {
                Ok(_) => recently_published(&config).await,
                Err(_) => Ok(Vec::new()),
            };
            ready.store(true, Ordering::Release);
            match (restored_state, published) {
                (Ok(entries), Ok(published)) => {
                    let mut expiries = shared.expiries.lock().expect("expiries");
                    let mut restored_entries = Vec::new();
                    for (partition, partition_entries) in entries {
                        let held = expiries.entry(partition).or_default();
                        for (key, entry) in partition_entries {
                            held.insert(key.clone(), entry.expires_at_ms);
                            restored_entries
                                .push((key, String::from_utf8_lossy(&entry.value).into_owned()));
                        }
                    }
                    drop(expiries);
                    conversations.restore(restored_entries);
                    restored.extend(wanted);
                    let now = now_ms();
                    let lookback = config.converse.replay_lookback_ms as i64;
                    let mut known = shared.published.lock().expect("published");
                    known.retain(|_, read_at| *read_at >= now - lookback);
                    known.extend(published.into_iter().map(|id| (id, now)));
                }
                (Err(e), _) | (_, Err(e)) => {
                    shared.progress.fail(format!("converse state: {e}"));
                    break;
                }
            }
        }
        shared
            .progress
            .start(message.topic(), message.partition(), message.offset());
        let item = match message.payload().map(WebhookItem::from_json) {
            Some(Ok(item)) => item,
            Some(Err(detail)) => {
                spawn_dead_letter(&shared, &in_flight, message, detail).await;
                continue;
            }
            None => {
                spawn_dead_letter(&shared, &in_flight, message, "record has no value".into()).await;
                continue;
            }
        };
        let waiting_item = Waiting {
            message,
            item,
            deadline: Instant::now() + join_wait,
        };
        offer(
            &shared,
            &in_flight,
            &mut conversations,
            &directory,
            &mut waiting,
            waiting_item,
            false,
            join_wait,
        )
        .await;
    }

    // Drain: every started publish finishes (or fails) before the final commit. Items still
    // waiting for their join are not committed and are offered again after a restart.
    let deadline = Duration::from_millis(shared.config.admin.shutdown_deadline_ms);
    if let Some(detail) = shared
        .progress
        .close(&in_flight, MAX_IN_FLIGHT, deadline)
        .await
    {
        return Err(ConverseError::HandOff(detail));
    }
    tracing::info!("converse stage stopped");
    Ok(())
}

/// Offers one item to the conversations and publishes what it produced, or parks it until the
/// message it refers to shows up in the sent log.
#[allow(clippy::too_many_arguments)]
async fn offer(
    shared: &Arc<Shared>,
    in_flight: &Arc<Semaphore>,
    conversations: &mut Conversations,
    directory: &SharedDirectory,
    waiting: &mut HashMap<String, Vec<Waiting>>,
    w: Waiting,
    give_up: bool,
    join_wait: Duration,
) {
    let handled = {
        let directory = directory.read().expect("directory lock");
        conversations.handle(&w.item, &directory, now_ms(), give_up)
    };
    let metrics = Metrics::global();
    match handled {
        Handled::Wait { wamid } => {
            metrics.converse_items.with_label_values(&["waited"]).inc();
            let deadline = if give_up {
                Instant::now() + join_wait
            } else {
                w.deadline
            };
            waiting
                .entry(wamid)
                .or_default()
                .push(Waiting { deadline, ..w });
        }
        Handled::Done { outcome, outcomes } => {
            metrics.converse_items.with_label_values(&[outcome]).inc();
            let changes = conversations.take_changes();
            let permit = in_flight
                .clone()
                .acquire_owned()
                .await
                .expect("semaphore open");
            publish(shared, w.message, &w.item, outcomes, changes, permit);
        }
    }
}

/// Enqueues every outcome now (keeping order), then marks the item done once all are acknowledged.
fn publish(
    shared: &Arc<Shared>,
    message: OwnedMessage,
    item: &WebhookItem,
    outcomes: Vec<Outcome>,
    changes: Vec<(String, String)>,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let metrics = Metrics::global();
    let topics = &shared.config.topics;
    let mut deliveries = Vec::with_capacity(outcomes.len());
    for outcome in &outcomes {
        let (topic, key, bytes, headers) = match outcome {
            Outcome::Response(r)
                if shared
                    .published
                    .lock()
                    .expect("published")
                    .contains_key(&r.response_id) =>
            {
                metrics
                    .converse_items
                    .with_label_values(&["response_already_published"])
                    .inc();
                tracing::debug!(response_id = %r.response_id, "replayed item's response already on the topic; not published again");
                continue;
            }
            Outcome::Response(r) => {
                metrics
                    .responses
                    .with_label_values(&[&r.response_type])
                    .inc();
                if r.response_type == "wa.message.status" {
                    tracing::debug!(request = r.request_id.as_deref().unwrap_or("-"), correlation_id = %r.correlation_id, "delivery status published");
                } else {
                    tracing::info!(
                        response_type = %r.response_type,
                        request = r.request_id.as_deref().unwrap_or("-"),
                        correlation_id = %r.correlation_id,
                        "response published"
                    );
                }
                (
                    &topics.responses,
                    r.correlation_id.clone(),
                    r.to_avro(),
                    OwnedHeaders::new().insert(Header {
                        key: "gridtalk.response_type",
                        value: Some(r.response_type.as_bytes()),
                    }),
                )
            }
            Outcome::Audit(a) => {
                metrics
                    .refusals
                    .with_label_values(&[STAGE, &a.reason])
                    .inc();
                tracing::warn!(
                    reason = %a.reason,
                    detail = %a.detail,
                    request = a.request_id.as_deref().unwrap_or("-"),
                    "inbound refused"
                );
                (
                    &topics.audit,
                    a.request_id
                        .clone()
                        .or_else(|| a.wa_id.clone())
                        .unwrap_or_default(),
                    a.to_avro(),
                    OwnedHeaders::new().insert(Header {
                        key: "gridtalk.audit.reason",
                        value: Some(a.reason.as_bytes()),
                    }),
                )
            }
            Outcome::Reply(o) => {
                let form = if o.template_name.is_some() {
                    "template"
                } else {
                    "text"
                };
                metrics
                    .confirmations
                    .with_label_values(&[o.event_type.trim_start_matches("gridtalk.answer."), form])
                    .inc();
                (
                    &topics.outbox,
                    o.phone_number_id.clone(),
                    o.to_avro(),
                    OwnedHeaders::new()
                        .insert(Header {
                            key: "gridtalk.event_id",
                            value: Some(o.event_id.as_bytes()),
                        })
                        .insert(Header {
                            key: "gridtalk.message_id",
                            value: Some(o.message_id.as_bytes()),
                        }),
                )
            }
        };
        let record = FutureRecord::to(topic)
            .key(&key)
            .payload(&bytes)
            .headers(headers);
        match shared.producer.send_result(record) {
            Ok(delivery) => deliveries.push(delivery),
            Err((e, _)) => {
                shared
                    .progress
                    .fail(format!("publish for item {}: {e}", item.item_id));
                return;
            }
        }
    }
    let shared = shared.clone();
    // The state changes go to the changelog only once the records they account for are durable:
    // a crash in between replays the item, which is then answered again (same response id)
    // rather than remembered as answered and lost.
    tokio::spawn(async move {
        if !shared
            .progress
            .delivered(deliveries, "response publish")
            .await
        {
            return drop(permit);
        }
        let expires = chrono::Utc::now().timestamp_millis() + STATE_RETENTION_MS;
        let mut written = Vec::with_capacity(changes.len());
        for (key, value) in &changes {
            match gridtalk_kafka::changelog::write(
                &shared.producer,
                &shared.config.topics.converse_state,
                message.partition(),
                key,
                Some((value.as_bytes(), expires)),
            ) {
                Ok(delivery) => written.push(delivery),
                Err(e) => {
                    shared.progress.fail(format!("converse state: {e}"));
                    return drop(permit);
                }
            }
        }
        if let Some(held) = shared
            .expiries
            .lock()
            .expect("expiries")
            .get_mut(&message.partition())
        {
            held.extend(changes.iter().map(|(key, _)| (key.clone(), expires)));
        }
        if shared.progress.delivered(written, "converse state").await {
            shared.finish(&message);
        }
        drop(permit);
    });
}

/// The ids of the responses published within `converse.replay_lookback_ms`.
async fn recently_published(config: &Arc<Config>) -> Result<Vec<String>, KafkaError> {
    let config = config.clone();
    tokio::task::spawn_blocking(move || {
        let since = now_ms() - config.converse.replay_lookback_ms as i64;
        let payloads = gridtalk_kafka::changelog::recent_payloads(
            &config.kafka,
            &config.topics.responses,
            since,
            gridtalk_kafka::ADMIN_TIMEOUT,
        )?;
        Ok(payloads
            .iter()
            .filter_map(|p| WorkflowResponse::from_avro(p).ok())
            .map(|r| r.response_id)
            .collect())
    })
    .await
    .map_err(|e| KafkaError::Restore(format!("response topic read: {e}")))?
}

/// Deletes expired state entries of the held partitions from the changelog (tombstones), so it
/// stays bounded; an entry whose tombstone is lost is dropped on restore anyway.
fn sweep_state(shared: &Shared) {
    let now = now_ms();
    let mut expiries = shared.expiries.lock().expect("expiries");
    let mut live = 0;
    for (partition, entries) in expiries.iter_mut() {
        entries.retain(|key, expires_at| {
            if *expires_at > now {
                return true;
            }
            if let Err(e) = gridtalk_kafka::changelog::write(
                &shared.producer,
                &shared.config.topics.converse_state,
                *partition,
                key,
                None,
            ) {
                tracing::warn!(error = %e, "converse state tombstone not written; the entry expires on restore");
            }
            false
        });
        live += entries.len();
    }
    Metrics::global()
        .state_entries
        .with_label_values(&["converse"])
        .set(live as i64);
}

async fn spawn_dead_letter(
    shared: &Arc<Shared>,
    in_flight: &Arc<Semaphore>,
    message: OwnedMessage,
    detail: String,
) {
    tracing::warn!(error = %detail, offset = message.offset(), "webhook item unreadable; dead-lettered");
    let permit = in_flight
        .clone()
        .acquire_owned()
        .await
        .expect("semaphore open");
    let shared = shared.clone();
    tokio::spawn(async move {
        let result = dead_letter(
            &shared.producer,
            &shared.config.topics.dlq,
            STAGE,
            DeadLetterReason::MalformedWebhookItem,
            &detail,
            &message,
            &[],
            shared.timeout(),
        )
        .await;
        match result {
            Ok(()) => shared.finish(&message),
            Err(e) => shared.progress.fail(format!("dead letter: {e}")),
        }
        drop(permit);
    });
}
