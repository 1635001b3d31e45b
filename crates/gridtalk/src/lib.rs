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
