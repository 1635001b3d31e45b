//! Wiring of gridtalk's stages into one process. The binary and the tests call [`run_stages`]; the
//! stages themselves live in their own crates.

use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use gridtalk_config::Config;
use gridtalk_kafka::TopicSpec;
use gridtalk_telemetry::Readiness;
use tokio_util::sync::CancellationToken;

/// A stage's run, boxed so that the stages can be spawned alike.
type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A stage that can run in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Route,
    Send,
    /// The webhook endpoint (needs `ingest.verify_token` and the app secret).
    Ingest,
    /// Replies and statuses joined with the sent log, published on the response topic.
    Converse,
}

impl Stage {
    /// The stage's name, as `--stages` takes it.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Route => "route",
            Stage::Send => "send",
            Stage::Ingest => "ingest",
            Stage::Converse => "converse",
        }
    }

    /// The readiness checks the stage registers (its drivers' names).
    pub fn readiness_checks(self) -> &'static [&'static str] {
        match self {
            Stage::Route => &["route"],
            Stage::Send => &["send"],
            Stage::Ingest => &["ingest"],
            Stage::Converse => &["converse", "decide"],
        }
    }
}

impl FromStr for Stage {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "route" => Ok(Stage::Route),
            "send" => Ok(Stage::Send),
            "ingest" => Ok(Stage::Ingest),
            "converse" => Ok(Stage::Converse),
            other => Err(format!(
                "unknown stage {other:?} (route, send, ingest, converse)"
            )),
        }
    }
}

/// The topics gridtalk owns, with their partition counts and policies.
pub fn internal_topics(config: &Config) -> Vec<TopicSpec> {
    let t = &config.topics;
    let plain = |name: &str| TopicSpec {
        name: name.to_string(),
        partitions: t.partitions,
        configs: vec![],
    };
    vec![
        plain(&t.outbox),
        plain(&t.sent),
        plain(&t.dlq),
        // Same partition count as the sent log: both are keyed by contact (co-partitioned).
        plain(&t.webhook),
        plain(&t.responses),
        // Keyed by request: partition p's settlements are on partition p of the converse-state
        // changelog (prefix `settled:`), so it has the same partition count.
        plain(&t.decisions),
        plain(&t.audit),
        // Compacted and partitioned like the outbox: partition p holds what was sent from outbox
        // partition p.
        TopicSpec {
            name: t.send_index.clone(),
            partitions: t.partitions,
            configs: vec![("cleanup.policy".into(), "compact".into())],
        },
        // Compacted and partitioned like the webhook topic: partition p holds the converse
        // state of the contacts on webhook partition p.
        TopicSpec {
            name: t.converse_state.clone(),
            partitions: t.partitions,
            configs: vec![("cleanup.policy".into(), "compact".into())],
        },
        TopicSpec {
            name: t.dlq_replays.clone(),
            partitions: 1,
            configs: vec![("cleanup.policy".into(), "compact".into())],
        },
        TopicSpec {
            name: t.directory.clone(),
            partitions: 1,
            configs: vec![("cleanup.policy".into(), "compact".into())],
        },
    ]
}

/// Each value as a one-label set.
fn one_label(values: Vec<&str>) -> Vec<Vec<&str>> {
    values.into_iter().map(|v| vec![v]).collect()
}

/// Creates, at zero, every counter series whose labels the stages can know before the first
/// event: dead letters by stage and reason, events by input topic and event type, messages by
/// template, webhook requests and converse items by outcome. An alert on `increase(...) > 0`
/// then fires on the first dead letter after a restart too.
pub fn start_metrics_at_zero(config: &Config, stages: &[Stage]) {
    use gridtalk_telemetry::Metrics;
    let metrics = Metrics::global();
    let mut dead_letter_stages: Vec<&str> = Vec::new();
    for stage in stages {
        dead_letter_stages.extend(stage.readiness_checks());
        if matches!(stage, Stage::Route | Stage::Converse) {
            dead_letter_stages.push("directory");
        }
    }
    dead_letter_stages.dedup();
    let reasons = gridtalk_contract::DeadLetterReason::ALL;
    let pairs: Vec<Vec<&str>> = dead_letter_stages
        .iter()
        .flat_map(|stage| reasons.iter().map(move |r| vec![*stage, r.as_str()]))
        .collect();
    Metrics::start_at_zero(&metrics.dead_letters, &pairs);
    if stages.contains(&Stage::Route) {
        let event_types = one_label(
            gridtalk_contract::EVENT_TYPES
                .iter()
                .map(|(t, _, _)| *t)
                .collect(),
        );
        for counter in [
            &metrics.events_routed,
            &metrics.events_deduplicated,
            &metrics.events_unrouted,
        ] {
            Metrics::start_at_zero(counter, &event_types);
        }
        let inputs = one_label(config.topics.inputs.iter().map(String::as_str).collect());
        Metrics::start_at_zero(&metrics.events_consumed, &inputs);
        let templates = one_label(config.templates.iter().map(|t| t.name.as_str()).collect());
        Metrics::start_at_zero(&metrics.messages_rendered, &templates);
    }
    if stages.contains(&Stage::Ingest) {
        let outcomes = one_label(vec![
            "accepted",
            "bad_signature",
            "bad_signature_not_audited",
            "too_large",
            "body_timeout",
            "malformed",
            "publish_failed",
        ]);
        Metrics::start_at_zero(&metrics.webhooks, &outcomes);
    }
    if stages.contains(&Stage::Converse) {
        let outcomes = one_label(vec![
            "answered",
            "comment",
            "status",
            "stale_status",
            "redelivery",
            "refused",
            "waited",
            "unknown",
            "ignored",
        ]);
        Metrics::start_at_zero(&metrics.converse_items, &outcomes);
    }
}

/// Runs `stages` until `shutdown` is cancelled. A stage that fails cancels the others (through
/// `shutdown`) and its error is returned.
pub async fn run_stages(
    config: Arc<Config>,
    stages: &[Stage],
    readiness: Readiness,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Announced before anything waits for Kafka: until every stage has set its own check the
    // process is not ready, however long the broker takes to answer.
    for stage in stages {
        for check in stage.readiness_checks() {
            readiness.register(check);
        }
    }
    if config.topics.create {
        let created = readiness.register("kafka topics");
        let specs = internal_topics(&config);
        let ensure = gridtalk_kafka::ensure_topics(&config.kafka, &specs);
        tokio::pin!(ensure);
        let mut reminder = tokio::time::interval_at(
            tokio::time::Instant::now() + Duration::from_secs(5),
            Duration::from_secs(30),
        );
        loop {
            tokio::select! {
                // Stopping while Kafka is unreachable is a clean stop: nothing has started.
                _ = shutdown.cancelled() => return Ok(()),
                ensured = &mut ensure => {
                    ensured?;
                    break;
                }
                _ = reminder.tick() => {
                    let reason = tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        reason = gridtalk_kafka::why_unreachable(&config.kafka) => reason,
                    };
                    let reason = reason.unwrap_or_else(|| "the cluster answers, slowly".into());
                    tracing::warn!(
                        bootstrap = %config.kafka.bootstrap_servers,
                        "still waiting for Kafka to create the internal topics; not ready: {reason}"
                    );
                }
            }
        }
        created.store(true, std::sync::atomic::Ordering::Release);
    }
    let mut tasks = tokio::task::JoinSet::new();
    for stage in stages {
        let (config, readiness, token) = (config.clone(), readiness.clone(), shutdown.clone());
        let (name, run): (&str, BoxFuture<'static, anyhow::Result<()>>) = match stage {
            Stage::Route => (
                "route stage",
                Box::pin(async move { Ok(gridtalk_route::run(config, readiness, token).await?) }),
            ),
            Stage::Send => (
                "send stage",
                Box::pin(async move { Ok(gridtalk_send::run(config, readiness, token).await?) }),
            ),
            Stage::Ingest => (
                "ingest stage",
                Box::pin(async move { Ok(gridtalk_ingest::run(config, readiness, token).await?) }),
            ),
            Stage::Converse => (
                "converse stage",
                Box::pin(
                    async move { Ok(gridtalk_converse::run(config, readiness, token).await?) },
                ),
            ),
        };
        // A stage that fails stops the others.
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            let result = run.await;
            if result.is_err() {
                shutdown.cancel();
            }
            result.map_err(|e| e.context(name))
        });
    }
    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(error = format!("{e:#}"), "stage failed");
                first_error.get_or_insert(e);
            }
            Err(e) => {
                shutdown.cancel();
                first_error.get_or_insert(anyhow::anyhow!("stage panicked: {e}"));
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}
