//! The route stage's consumer loop (see the crate docs for its guarantees).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::Consumer;
use rdkafka::message::{Header, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use gridtalk_config::Config;
use gridtalk_contract::{
    AvroRecord, ContractSchemas, DecodeErrorKind, EventDecoder, EventView, RegistryClient,
    SchemaSet,
};
use gridtalk_kafka::{dead_letter, DeadLetterReason, KafkaError, StageProgress};
use gridtalk_telemetry::{Metrics, Readiness};

use crate::dedupe::DedupeWindow;
use crate::render::plan;
use gridtalk_directory::SharedDirectory;

const STAGE: &str = "route";

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error("configuration: {0}")]
    Config(String),
    #[error("hand-off failed, stopping so that the records are replayed: {0}")]
    HandOff(String),
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

struct Shared {
    config: Arc<Config>,
    progress: StageProgress,
    producer: FutureProducer,
    button_secret: Option<gridtalk_config::Secret>,
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

fn decoder(config: &Config) -> Result<EventDecoder, RouteError> {
    let mut known = SchemaSet::contract();
    if let Some(dir) = &config.contract.extra_schema_dir {
        known
            .load_dir(dir)
            .map_err(|e| RouteError::Config(e.join("; ")))?;
    }
    let registry = config.contract.schema_registry_url.as_deref().map(|url| {
        let auth = config.contract.schema_registry_username.clone().map(|u| {
            (
                u,
                config
                    .contract
                    .schema_registry_password
                    .as_ref()
                    .map(|p| p.expose().to_string())
                    .unwrap_or_default(),
            )
        });
        RegistryClient::new(url, auth, Duration::from_secs(10))
    });
    Ok(EventDecoder::new(
        ContractSchemas::get().trading_grid_event.clone(),
        known,
        registry,
        config.contract.max_event_bytes,
    ))
}

/// Runs the route stage until `shutdown` is cancelled or a hand-off fails.
pub async fn run(
    config: Arc<Config>,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> Result<(), RouteError> {
    let ready = readiness.register("route");
    let missing = gridtalk_kafka::missing_topics(&config.kafka, &config.topics.inputs)?;
    if !missing.is_empty() {
        return Err(KafkaError::MissingTopics(missing.join(", ")).into());
    }
    let decoder = decoder(&config)?;
    let button_secret = config.button_secret().map_err(RouteError::Config)?;
    if button_secret.is_none() {
        if let Some(t) = config.templates.iter().find(|t| !t.buttons.is_empty()) {
            return Err(RouteError::Config(format!(
                "template {} has buttons: set route.button_secret or route.button_secret_file",
                t.name
            )));
        }
    }

    ensure_dedupe_changelogs(&config).await?;

    // The directory: file baseline, then the topic's overrides, caught up before routing starts.
    let directory = gridtalk_directory::open(&config, &shutdown)
        .await
        .map_err(RouteError::Config)?;

    let group = format!("{}-route", config.kafka.group_prefix);
    let consumer = gridtalk_kafka::stage_consumer(&config.kafka, &group, STAGE)?;
    let inputs: Vec<&str> = config.topics.inputs.iter().map(String::as_str).collect();
    consumer.subscribe(&inputs).map_err(KafkaError::from)?;
    let shared = Arc::new(Shared {
        producer: gridtalk_kafka::producer(&config.kafka)?,
        config: config.clone(),
        progress: StageProgress::new(STAGE, consumer, shutdown.child_token()),
        button_secret,
    });
    let in_flight = Arc::new(Semaphore::new(config.route.max_in_flight.max(1)));
    let mut windows: HashMap<(String, i32), DedupeWindow> = HashMap::new();
    let mut last_sweep = std::time::Instant::now();
    ready.store(true, Ordering::Release);
    tracing::info!(group, topics = ?config.topics.inputs, "route stage running");

    loop {
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
        let permit = tokio::select! {
            _ = shared.progress.stop.cancelled() => break,
            p = in_flight.clone().acquire_owned() => p.expect("semaphore open"),
        };
        // The dedupe window follows the partition: dropped on revoke, restored before first use.
        for revoked in shared.progress.take_revoked() {
            windows.remove(&revoked);
        }
        let key = (message.topic().to_string(), message.partition());
        if !windows.contains_key(&key) {
            // Restore every assigned partition of this input still missing, in one pass.
            let wanted = shared.progress.partitions_to_restore(&key.0, key.1, |p| {
                windows.contains_key(&(key.0.clone(), p))
            });
            // Not ready while state is restored (the process resumes only after it).
            ready.store(false, Ordering::Release);
            let restored_state = restore_windows(&config, &key.0, wanted).await;
            ready.store(true, Ordering::Release);
            match restored_state {
                Ok(restored) => {
                    for (partition, window) in restored {
                        windows.insert((key.0.clone(), partition), window);
                    }
                }
                Err(e) => {
                    shared
                        .progress
                        .fail(format!("dedupe windows of {}: {e}", key.0));
                    break;
                }
            }
        }
        shared
            .progress
            .start(message.topic(), message.partition(), message.offset());
        Metrics::global()
            .events_consumed
            .with_label_values(&[message.topic()])
            .inc();
        let window = windows.get_mut(&key).expect("restored above");
        route_one(&shared, &decoder, &directory, window, message, permit).await;
        if last_sweep.elapsed() > Duration::from_secs(60) {
            sweep_windows(&shared, &mut windows);
            last_sweep = std::time::Instant::now();
        }
    }

    // Drain: every started hand-off finishes (or fails) before the final commit.
    let deadline = Duration::from_millis(shared.config.admin.shutdown_deadline_ms);
    if let Some(detail) = shared
        .progress
        .close(&in_flight, config.route.max_in_flight.max(1), deadline)
        .await
    {
        return Err(RouteError::HandOff(detail));
    }
    tracing::info!("route stage stopped");
    Ok(())
}

/// The dedupe changelog of input topic `input`.
fn dedupe_changelog(config: &Config, input: &str) -> String {
    format!("{}{input}", config.topics.dedupe_changelog_prefix)
}

/// Creates (when `topics.create`) and checks the dedupe changelogs: compacted, one per input
/// topic, at least as many partitions as the input.
async fn ensure_dedupe_changelogs(config: &Arc<Config>) -> Result<(), RouteError> {
    let counts = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || -> Result<Vec<(String, usize)>, KafkaError> {
            let probe = gridtalk_kafka::tail_consumer(&config.kafka)?;
            config
                .topics
                .inputs
                .iter()
                .map(|t| Ok((t.clone(), gridtalk_kafka::partitions_of(&probe, t)?.len())))
                .collect()
        })
        .await
        .map_err(|e| RouteError::Config(e.to_string()))??
    };
    let specs: Vec<gridtalk_kafka::TopicSpec> = counts
        .iter()
        .map(|(input, partitions)| gridtalk_kafka::TopicSpec {
            name: dedupe_changelog(config, input),
            partitions: *partitions as i32,
            configs: vec![("cleanup.policy".into(), "compact".into())],
        })
        .collect();
    if config.topics.create {
        gridtalk_kafka::ensure_topics(&config.kafka, &specs).await?;
    }
    let config = config.clone();
    tokio::task::spawn_blocking(move || -> Result<(), RouteError> {
        let probe = gridtalk_kafka::tail_consumer(&config.kafka)?;
        for (spec, (input, partitions)) in specs.iter().zip(&counts) {
            let have = gridtalk_kafka::partitions_of(&probe, &spec.name)?.len();
            if have < *partitions {
                return Err(RouteError::Config(format!(
                    "dedupe changelog {} has {have} partitions, fewer than its input {input} ({partitions})",
                    spec.name
                )));
            }
        }
        Ok(())
    })
    .await
    .map_err(|e| RouteError::Config(e.to_string()))?
}

/// Reads the dedupe windows of `partitions` of input `input` from its changelog, in one pass.
async fn restore_windows(
    config: &Config,
    input: &str,
    partitions: Vec<i32>,
) -> Result<HashMap<i32, DedupeWindow>, KafkaError> {
    let restored = gridtalk_kafka::changelog::restore_for_stage(
        &config.kafka,
        "dedupe",
        &dedupe_changelog(config, input),
        partitions,
    )
    .await?;
    let now = now_ms();
    let window_ms = (config.route.dedupe_window_secs as i64).saturating_mul(1000);
    Ok(restored
        .into_iter()
        .map(|(partition, entries)| {
            let entries = entries
                .into_iter()
                .map(|(id, e)| (id, e.expires_at_ms))
                .collect();
            let window =
                DedupeWindow::restored(window_ms, config.route.dedupe_max_entries, entries, now);
            (partition, window)
        })
        .collect())
}

/// Expires dedupe entries and deletes what the windows forgot from their changelogs.
fn sweep_windows(shared: &Shared, windows: &mut HashMap<(String, i32), DedupeWindow>) {
    let now = now_ms();
    let mut live = 0;
    for ((input, partition), window) in windows.iter_mut() {
        window.expire_now(now);
        live += window.len();
        let changelog = dedupe_changelog(&shared.config, input);
        for id in window.take_forgotten() {
            if let Err(e) = gridtalk_kafka::changelog::write(
                &shared.producer,
                &changelog,
                *partition,
                &id,
                None,
            ) {
                tracing::warn!(error = %e, "dedupe tombstone not written; the entry expires on restore");
            }
        }
    }
    Metrics::global()
        .state_entries
        .with_label_values(&["dedupe"])
        .set(live as i64);
}

fn spawn_dead_letter(
    shared: Arc<Shared>,
    message: OwnedMessage,
    reason: DeadLetterReason,
    detail: String,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    tokio::spawn(async move {
        let result = dead_letter(
            &shared.producer,
            &shared.config.topics.dlq,
            STAGE,
            reason,
            &detail,
            &message,
            &[],
            shared.timeout(),
        )
        .await;
        match result {
            Ok(()) => shared.finish(&message),
            Err(e) => shared.progress.fail(format!(
                "dead letter for {}/{}/{}: {e}",
                message.topic(),
                message.partition(),
                message.offset()
            )),
        }
        drop(permit);
    });
}

async fn route_one(
    shared: &Arc<Shared>,
    decoder: &EventDecoder,
    directory: &SharedDirectory,
    dedupe: &mut DedupeWindow,
    message: OwnedMessage,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let dead = |reason: DeadLetterReason, detail: String, permit| {
        spawn_dead_letter(shared.clone(), message.clone(), reason, detail, permit)
    };
    let Some(payload) = message.payload() else {
        return dead(
            DeadLetterReason::MalformedAvro,
            "record has no value".into(),
            permit,
        );
    };
    let decoded = loop {
        match decoder.decode(payload).await {
            Ok(d) => break d,
            Err(e) if e.kind == DecodeErrorKind::RegistryUnavailable => {
                // Not the record's fault: wait for the registry rather than dead-letter.
                tracing::warn!(error = %e, "schema registry unavailable; retrying");
                tokio::select! {
                    _ = shared.progress.stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(2)) => continue,
                }
            }
            Err(e) => {
                let reason = match e.kind {
                    DecodeErrorKind::Malformed => DeadLetterReason::MalformedAvro,
                    DecodeErrorKind::UnknownSchema => DeadLetterReason::UnknownSchema,
                    DecodeErrorKind::Oversized => DeadLetterReason::Oversized,
                    _ => DeadLetterReason::MissingField,
                };
                return dead(reason, e.detail, permit);
            }
        }
    };
    let view = EventView::from_resolved(&decoded.value, decoder.reader_schema());
    let now = now_ms();
    if dedupe.contains(view.event_id(), now) {
        Metrics::global()
            .events_deduplicated
            .with_label_values(&[view.event_type()])
            .inc();
        tracing::info!(
            event_id = view.event_id(),
            event_type = view.event_type(),
            "duplicate event dropped"
        );
        shared.finish(&message);
        return;
    }
    let planned = {
        let directory = directory.read().expect("directory lock");
        plan(
            &view,
            &shared.config,
            &directory,
            shared.button_secret.as_ref().map(|s| s.expose().as_bytes()),
            now,
        )
    };
    let plan = match planned {
        Ok(p) => p,
        Err(failure) => return dead(failure.reason, failure.detail, permit),
    };
    if plan.messages.is_empty() {
        Metrics::global()
            .events_unrouted
            .with_label_values(&[view.event_type()])
            .inc();
        tracing::info!(
            event_id = view.event_id(),
            event_type = view.event_type(),
            "no rule matched"
        );
        shared.finish(&message);
        return;
    }
    let expires = dedupe.remember(view.event_id(), now);
    let mut deliveries = Vec::with_capacity(plan.messages.len());
    for outbox in &plan.messages {
        let bytes = outbox.to_avro();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "gridtalk.event_id",
                value: Some(outbox.event_id.as_bytes()),
            })
            .insert(Header {
                key: "gridtalk.message_id",
                value: Some(outbox.message_id.as_bytes()),
            });
        let record = FutureRecord::to(&shared.config.topics.outbox)
            .key(outbox.phone_number_id.as_bytes())
            .payload(&bytes)
            .headers(headers);
        // send_result enqueues now (keeping consumption order); the ack is awaited below.
        match shared.producer.send_result(record) {
            Ok(delivery) => deliveries.push(delivery),
            Err((e, _)) => {
                shared.progress.fail(format!("outbox enqueue: {e}"));
                return;
            }
        }
        Metrics::global()
            .messages_rendered
            .with_label_values(&[outbox.template_name.as_deref().unwrap_or("none")])
            .inc();
    }
    Metrics::global()
        .events_routed
        .with_label_values(&[view.event_type()])
        .inc();
    tracing::info!(
        event_id = view.event_id(),
        event_type = view.event_type(),
        messages = plan.messages.len(),
        "event routed"
    );
    // The dedupe entry is written only once the outbox holds the messages: a crash in between
    // replays the event, and the sender's index drops the repeated messages. The reverse order
    // could remember an event whose messages never reached the outbox, and lose them.
    let shared = shared.clone();
    let event_id = view.event_id().to_string();
    tokio::spawn(async move {
        if !shared
            .progress
            .delivered(deliveries, "outbox produce")
            .await
        {
            return drop(permit);
        }
        let remembered = gridtalk_kafka::changelog::write(
            &shared.producer,
            &dedupe_changelog(&shared.config, message.topic()),
            message.partition(),
            &event_id,
            Some((&[], expires)),
        );
        let durable = match remembered {
            Ok(delivery) => {
                shared
                    .progress
                    .delivered(vec![delivery], "dedupe changelog")
                    .await
            }
            Err(e) => {
                shared.progress.fail(format!("dedupe changelog: {e}"));
                false
            }
        };
        if durable {
            shared.finish(&message);
        }
        drop(permit);
    });
}
