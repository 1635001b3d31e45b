//! The framing of the records gridtalk publishes for other systems (responses, audit records),
//! settled once when a stage starts, before it produces anything.
//!
//! Guarantees:
//! - Without a registry (or with `contract.publish_framing = "single_object"`) records are Avro
//!   single-object encoded, as they always were.
//! - With the Confluent framing, each published schema is checked against its subject under the
//!   topic-name strategy (`<topic>-value`, what `KafkaAvroSerializer` and Kafka Connect use by
//!   default) and registered, or only looked up when `contract.schema_registry_auto_register` is
//!   off. An incompatible schema, a schema that is not registered, or refused credentials stop the
//!   stage with the registry's own reasons: a rollout fails loudly rather than writing records
//!   its consumers cannot read.
//! - An unreachable registry is waited for, with the reason logged, and the wait gives way to
//!   shutdown; the stage is not ready meanwhile.

use std::time::Duration;

use gridtalk_config::{Config, ContractConfig};
use gridtalk_contract::{Compatibility, Framing, RegistryClient, RegistryError};
use tokio_util::sync::CancellationToken;

/// The Schema Registry client the contract settings describe, if a registry is configured.
pub fn registry_client(contract: &ContractConfig) -> Option<RegistryClient> {
    contract.schema_registry_url.as_deref().map(|url| {
        RegistryClient::new(
            url,
            contract.schema_registry_auth(),
            Duration::from_secs(10),
            Duration::from_secs(contract.schema_registry_negative_cache_secs),
        )
    })
}

/// The subject a topic's record values are registered under (Confluent's `TopicNameStrategy`).
pub fn value_subject(topic: &str) -> String {
    format!("{topic}-value")
}

/// The framing of records with schema `schema` (Avro JSON) on `topic`. `None` when `shutdown`
/// came first; an error when the registry refuses the schema.
pub async fn framing_for(
    config: &Config,
    topic: &str,
    schema: &str,
    shutdown: &CancellationToken,
) -> Option<Result<Framing, String>> {
    if !config.contract.publishes_confluent() {
        return Some(Ok(Framing::SingleObject));
    }
    let Some(registry) = registry_client(&config.contract) else {
        return Some(Err(
            "the Confluent framing needs contract.schema_registry_url".into(),
        ));
    };
    let subject = value_subject(topic);
    let auto_register = config.contract.schema_registry_auto_register;
    let mut wait = Duration::from_millis(500);
    loop {
        match settle(&registry, &subject, schema, auto_register).await {
            Ok(schema_id) => {
                tracing::info!(%subject, schema_id, "records on {topic} are Confluent-framed");
                return Some(Ok(Framing::Confluent { schema_id }));
            }
            Err(RegistryError::Unavailable(reason)) => {
                tracing::warn!(%subject, "still waiting for the schema registry; not ready: {reason}");
            }
            Err(refused) => return Some(Err(format!("subject {subject}: {refused}"))),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(Duration::from_secs(30));
    }
}

/// Checks and registers (or looks up) `schema` under `subject`; returns its id.
async fn settle(
    registry: &RegistryClient,
    subject: &str,
    schema: &str,
    auto_register: bool,
) -> Result<u32, RegistryError> {
    if let Compatibility::Incompatible(reasons) = registry.compatibility(subject, schema).await? {
        let reasons = if reasons.is_empty() {
            "the registry gave no reason".to_string()
        } else {
            reasons.join("; ")
        };
        return Err(RegistryError::Refused(format!(
            "gridtalk's schema is not compatible with the latest version under the subject's compatibility level: {reasons}"
        )));
    }
    if auto_register {
        return registry.register(subject, schema).await;
    }
    registry.lookup(subject, schema).await?.ok_or_else(|| {
        RegistryError::Refused(
            "gridtalk's schema is not registered and contract.schema_registry_auto_register is off: register schemas/*.avsc under this subject first".into(),
        )
    })
}
