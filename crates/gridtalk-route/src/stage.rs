//! The route stage's start-up: configuration checks, the changelogs, the directory, then the
//! strategy handed to the driver (see the crate docs for the guarantees).

use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use gridtalk_config::Config;
use gridtalk_contract::{ContractSchemas, EventDecoder, SchemaSet};
use gridtalk_kafka::driver::{Driver, DriverSettings, OffsetReset};
use gridtalk_kafka::KafkaError;
use gridtalk_telemetry::Readiness;

use crate::strategy::{dedupe_changelog, RouteStrategy, Routing, STAGE};

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error("configuration: {0}")]
    Config(String),
    #[error("stopped so that the records are replayed: {0}")]
    Failed(String),
}

fn decoder(config: &Config) -> Result<EventDecoder, RouteError> {
    let mut known = SchemaSet::contract();
    if let Some(dir) = &config.contract.extra_schema_dir {
        known
            .load_dir(dir)
            .map_err(|e| RouteError::Config(e.join("; ")))?;
    }
    let registry = gridtalk_kafka::published::registry_client(&config.contract);
    Ok(EventDecoder::new(
        ContractSchemas::get().trading_grid_event.clone(),
        known,
        registry,
        config.contract.max_event_bytes,
    ))
}

/// Runs the route stage until `shutdown` is cancelled or the stage fails.
pub async fn run(
    config: Arc<Config>,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> Result<(), RouteError> {
    let ready = readiness.register(STAGE);
    let missing = {
        let (kafka, inputs) = (config.kafka.clone(), config.topics.inputs.clone());
        let probe = kafka.clone();
        match gridtalk_kafka::unless_stopped(&shutdown, &probe, "the input topics", move || {
            gridtalk_kafka::missing_topics(&kafka, &inputs)
        })
        .await
        {
            None => return Ok(()),
            Some(missing) => missing?,
        }
    };
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

    let driver = Driver::new(
        &config.kafka,
        DriverSettings {
            offset_reset: if config.route.offset_reset == "latest" {
                OffsetReset::Latest
            } else {
                OffsetReset::Earliest
            },
            ..DriverSettings::for_stage(&config, STAGE, config.topics.inputs.clone())
        },
        ready,
    )?;
    let routing = Arc::new(Routing {
        producer: gridtalk_kafka::producer(&config.kafka)?,
        time: crate::quiet::time_source(&config.clock),
        in_flight: Arc::new(Semaphore::new(config.route.max_in_flight.max(1))),
        config,
        decoder,
        directory,
        button_secret,
    });
    driver
        .run(RouteStrategy::new(routing), shutdown)
        .await
        .map_err(|e| RouteError::Failed(e.0))
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
