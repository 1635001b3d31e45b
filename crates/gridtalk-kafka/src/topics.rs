//! Topic checks and creation. Input topics belong to the operator and must exist; gridtalk's own
//! topics are created with the partition count and cleanup policy they need.

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;

use gridtalk_config::KafkaConfig;

use crate::{client_config, KafkaError, ADMIN_TIMEOUT};

/// A topic gridtalk owns.
#[derive(Debug, Clone)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    /// Topic configs, e.g. `cleanup.policy=compact`.
    pub configs: Vec<(String, String)>,
}

/// Creates every topic in `specs` that does not exist yet. Existing topics are left as they are.
pub async fn ensure_topics(config: &KafkaConfig, specs: &[TopicSpec]) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = client_config(config).create()?;
    let new_topics: Vec<NewTopic<'_>> = specs
        .iter()
        .map(|spec| {
            let mut topic = NewTopic::new(
                &spec.name,
                spec.partitions,
                TopicReplication::Fixed(config.replication_factor),
            );
            for (k, v) in &spec.configs {
                topic = topic.set(k, v);
            }
            topic
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(ADMIN_TIMEOUT));
    for result in admin.create_topics(new_topics.iter(), &options).await? {
        match result {
            Ok(name) => tracing::info!(topic = %name, "created topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(KafkaError::CreateTopic {
                    topic,
                    detail: code.to_string(),
                })
            }
        }
    }
    Ok(())
}

/// The topics of `names` that the broker does not have.
pub fn missing_topics(config: &KafkaConfig, names: &[String]) -> Result<Vec<String>, KafkaError> {
    let consumer: BaseConsumer = client_config(config).create()?;
    let metadata = consumer.fetch_metadata(None, ADMIN_TIMEOUT)?;
    let existing: std::collections::HashSet<&str> = metadata
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .map(|t| t.name())
        .collect();
    Ok(names
        .iter()
        .filter(|n| !existing.contains(n.as_str()))
        .cloned()
        .collect())
}
