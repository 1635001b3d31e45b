//! The converse stage's start-up: settings, the co-partitioning check, the directory, then the
//! strategy handed to the driver (see the crate docs for the guarantees).

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use gridtalk_config::Config;
use gridtalk_kafka::driver::{Assignment, Driver, DriverSettings};
use gridtalk_kafka::KafkaError;
use gridtalk_telemetry::Readiness;

use crate::conversation::{Conversations, Settings};
use crate::settle::Settlements;
use crate::settle_strategy::{SettleStrategy, Timekeeping, STAGE as SETTLE_STAGE};
use crate::strategy::{ConverseStrategy, Framings, Publishing, STAGE};

#[derive(Debug, thiserror::Error)]
pub enum ConverseError {
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error("configuration: {0}")]
    Config(String),
    #[error("stopped so that the records are replayed: {0}")]
    Failed(String),
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
        // A message stays answerable while its buttons are valid, and at least as long as the
        // send stage remembers it.
        retention_ms: (config
            .route
            .button_ttl_hours
            .max(config.send.index_retention_hours) as i64)
            .saturating_mul(3_600_000),
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

/// Runs the converse stage until `shutdown` is cancelled or the stage fails.
pub async fn run(
    config: Arc<Config>,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> Result<(), ConverseError> {
    let ready = readiness.register(STAGE);
    let conversations = Conversations::new(settings(&config)?);
    {
        let (config, kafka) = (config.clone(), config.kafka.clone());
        match gridtalk_kafka::unless_stopped(
            &shutdown,
            &kafka,
            "the partitions of the sent log and the webhook topic",
            move || check_co_partitioned(&config),
        )
        .await
        {
            None => return Ok(()),
            Some(checked) => checked?,
        }
    }
    let framings = {
        let mut settled = Vec::new();
        for (topic, schema) in [
            (
                &config.topics.responses,
                gridtalk_contract::WORKFLOW_RESPONSE_AVSC,
            ),
            (&config.topics.audit, gridtalk_contract::AUDIT_RECORD_AVSC),
        ] {
            match gridtalk_kafka::published::framing_for(&config, topic, schema, &shutdown).await {
                None => return Ok(()),
                Some(framing) => settled.push(framing.map_err(ConverseError::Config)?),
            }
        }
        Framings {
            responses: settled[0],
            audit: settled[1],
        }
    };
    let directory = gridtalk_directory::open(&config, &shutdown)
        .await
        .map_err(ConverseError::Config)?;
    let driver = Driver::new(
        &config.kafka,
        DriverSettings {
            // The sent log is read from its start on every assignment: it rebuilds the join.
            untracked_topics: vec![config.topics.sent.clone()],
            // The same partition numbers of both topics on one member: the join is local.
            assignment: Assignment::Range,
            ..DriverSettings::for_stage(
                &config,
                STAGE,
                vec![config.topics.sent.clone(), config.topics.webhook.clone()],
            )
        },
        ready,
    )?;
    // The settlement of deciding taps: its own group over the decisions topic, so each request
    // has one owner among the converse processes.
    let settle_driver = Driver::new(
        &config.kafka,
        DriverSettings::for_stage(&config, SETTLE_STAGE, vec![config.topics.decisions.clone()]),
        readiness.register(SETTLE_STAGE),
    )?;
    // The clocks of requests live with their settlements: the same key, the same owner.
    let timekeeping = Timekeeping {
        time: gridtalk_route::time_source(&config.clock),
        directory: directory.clone(),
        button_secret: config.button_secret().map_err(ConverseError::Config)?,
        supervisor: settle_driver.supervisor(),
    };
    let producer = gridtalk_kafka::producer(&config.kafka)?;
    let publishing = Arc::new(Publishing::new(
        config.clone(),
        producer.clone(),
        STAGE,
        framings,
    ));
    let settling = Arc::new(Publishing::new(
        config.clone(),
        producer,
        SETTLE_STAGE,
        framings,
    ));
    let settlements = Settlements::new(settings(&config)?);
    // Either failing stops both (the process restarts and replays).
    let stop = shutdown.child_token();
    let converse = async {
        let ended = driver
            .run(
                ConverseStrategy::new(publishing, conversations, directory),
                stop.clone(),
            )
            .await;
        stop.cancel();
        ended
    };
    let settle = async {
        let ended = settle_driver
            .run(
                SettleStrategy::new(settling, settlements, timekeeping),
                stop.clone(),
            )
            .await;
        stop.cancel();
        ended
    };
    let (converse, settle) = tokio::join!(converse, settle);
    converse.and(settle).map_err(|e| ConverseError::Failed(e.0))
}
