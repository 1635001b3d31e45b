//! The send stage's start-up: the token, the sent index's partitions, then the strategy handed to
//! the driver (see the crate docs for the guarantees).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use gridtalk_config::{Config, Secret, TemplateCheck};
use gridtalk_kafka::driver::{Driver, DriverSettings};
use gridtalk_kafka::KafkaError;
use gridtalk_telemetry::Readiness;
use gridtalk_whatsapp::catalogue::CatalogueTemplate;
use gridtalk_whatsapp::CloudApiClient;

use crate::strategy::{SendStrategy, Sending, STAGE};

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error("configuration: {0}")]
    Config(String),
    #[error("stopped so that the records are replayed: {0}")]
    Failed(String),
}

/// Runs the send stage until `shutdown` is cancelled or the stage fails.
pub async fn run(
    config: Arc<Config>,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> Result<(), SendError> {
    let ready = readiness.register(STAGE);
    let token = config.read_access_token().map_err(SendError::Config)?;
    let catalogue = check_templates(&config, &token).await?;
    {
        let (config, kafka) = (config.clone(), config.kafka.clone());
        match gridtalk_kafka::unless_stopped(
            &shutdown,
            &kafka,
            "the partitions of the outbox and the sent index",
            move || check_index_partitions(&config),
        )
        .await
        {
            None => return Ok(()),
            Some(checked) => checked?,
        }
    }
    let driver = Driver::new(
        &config.kafka,
        DriverSettings::for_stage(&config, STAGE, vec![config.topics.outbox.clone()]),
        ready,
    )?;
    let send = &config.send;
    let client = CloudApiClient::new(
        &send.api_base_url,
        &send.api_version,
        &send.phone_number_id,
        Duration::from_millis(send.request_timeout_ms),
    );
    let sending = Arc::new(Sending::new(
        config.clone(),
        gridtalk_kafka::producer(&config.kafka)?,
        client,
        token,
    ));
    // What Meta has paused or disabled stops at once, before any webhook says so.
    sending.seed_template_statuses(&catalogue);
    driver
        .run(SendStrategy::new(sending), shutdown)
        .await
        .map_err(|e| SendError::Failed(e.0))
}

/// The start-up comparison of the configured templates with the business account's catalogue
/// (`send.template_check`, with `send.business_account_id` set). A catalogue that cannot be read
/// is a warning either way: Meta being unreachable must not keep the queue from draining once
/// it is back.
async fn check_templates(
    config: &Config,
    token: &Secret,
) -> Result<Vec<CatalogueTemplate>, SendError> {
    let send = &config.send;
    let Some(waba) = send.business_account_id.as_deref() else {
        return Ok(Vec::new());
    };
    if send.template_check == TemplateCheck::Off {
        return Ok(Vec::new());
    }
    let catalogue = match gridtalk_whatsapp::catalogue::fetch_catalogue(
        &send.api_base_url,
        &send.api_version,
        waba,
        token,
        Duration::from_millis(send.request_timeout_ms),
    )
    .await
    {
        Ok(catalogue) => catalogue,
        Err(e) => {
            tracing::warn!(error = %e, "the business account's templates could not be read; not checked");
            return Ok(Vec::new());
        }
    };
    let found = gridtalk_whatsapp::catalogue::mismatches(&config.templates, &catalogue);
    for mismatch in &found {
        tracing::warn!(%mismatch, "configured template differs from the business account's");
    }
    if !found.is_empty() && send.template_check == TemplateCheck::Fail {
        return Err(SendError::Config(format!(
            "{} configured templates differ from business account {waba}'s (send.template_check = \"fail\"); `gridtalk templates check` lists them",
            found.len()
        )));
    }
    if found.is_empty() {
        tracing::info!(
            templates = config.templates.len(),
            "configured templates match the business account's"
        );
    }
    Ok(catalogue)
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
