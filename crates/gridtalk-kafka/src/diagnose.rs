//! Why the cluster does not answer, in librdkafka's own words.
//!
//! Admin and metadata calls fail with little more than "timed out" or "broker transport
//! failure"; the reason (connection refused, a name that does not resolve, a TLS handshake that
//! failed, `SASL authentication error: … invalid-proof`) only reaches a client's log and error
//! callbacks, which librdkafka queues for whoever polls the client. [`why_unreachable`] asks the
//! cluster for metadata with a client of its own that it polls, and returns the last error that
//! client reported.

use std::sync::Mutex;
use std::time::Duration;

use gridtalk_config::KafkaConfig;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError as RdKafkaError;

use crate::client_config;

/// Keeps the last error or warning the client reported.
#[derive(Default)]
struct LastProblem(Mutex<Option<String>>);

impl LastProblem {
    fn keep(&self, problem: String) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(problem);
    }
}

impl ClientContext for LastProblem {
    fn log(&self, level: RDKafkaLogLevel, _facility: &str, message: &str) {
        if (level as i32) <= (RDKafkaLogLevel::Warning as i32) {
            self.keep(message.to_string());
        }
    }

    fn error(&self, error: RdKafkaError, reason: &str) {
        self.keep(if reason.is_empty() {
            error.to_string()
        } else {
            reason.to_string()
        });
    }
}

impl ConsumerContext for LastProblem {}

/// How long one metadata request of the probe waits, and how many it makes: a refused connection
/// or a refused login is reported within milliseconds, a silent cluster only by the timeout.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
const PROBE_ATTEMPTS: u32 = 3;

/// Asks the cluster for its metadata; `None` when it answers, else the reason it does not, as
/// precise as librdkafka reported it. Blocks for at most a few seconds (run it off the async
/// workers, see [`why_unreachable`]).
pub fn probe(config: &KafkaConfig) -> Option<String> {
    let consumer: BaseConsumer<LastProblem> =
        match client_config(config).create_with_context(LastProblem::default()) {
            Ok(consumer) => consumer,
            Err(e) => return Some(format!("the Kafka client settings are refused: {e}")),
        };
    let mut failure = None;
    for _ in 0..PROBE_ATTEMPTS {
        match consumer.fetch_metadata(None, PROBE_TIMEOUT) {
            Ok(_) => return None,
            Err(e) => failure = Some(e.to_string()),
        }
        // Serves the queued log and error events, so the context sees them.
        let _ = consumer.poll(Duration::from_millis(50));
        if let Some(reported) = consumer.context().0.lock().ok().and_then(|p| p.clone()) {
            return Some(reported);
        }
    }
    failure
}

/// [`probe`] off the async workers: `None` when the cluster answers.
pub async fn why_unreachable(config: &KafkaConfig) -> Option<String> {
    let config = config.clone();
    tokio::task::spawn_blocking(move || probe(&config))
        .await
        .unwrap_or_else(|e| Some(format!("the probe failed: {e}")))
}

/// What librdkafka refuses in the client settings (`kafka.client.*`, `kafka.producer.*`): an
/// unknown property, a value out of range, a SASL mechanism or OIDC token retrieval this build
/// cannot do. Found by creating, and at once dropping, a producer and a consumer with the
/// settings the stages use; nothing is sent.
pub fn settings_problems(config: &KafkaConfig) -> Vec<String> {
    let mut problems = Vec::new();
    if let Err(e) = crate::producer(config) {
        problems.push(format!(
            "kafka.client / kafka.producer: librdkafka refuses the producer settings: {e}"
        ));
    }
    if let Err(e) = crate::tail_consumer(config) {
        let e = e.to_string();
        if !problems.iter().any(|p| p.contains(&e)) {
            problems.push(format!(
                "kafka.client: librdkafka refuses the consumer settings: {e}"
            ));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    /// The librdkafka this build links can do what secured clusters and their producers ask for.
    #[test]
    fn librdkafka_is_built_with_kerberos_oidc_scram_tls_and_every_codec() {
        let native = rdkafka::ClientConfig::new()
            .create_native_config()
            .expect("a configuration");
        let features = native.get("builtin.features").expect("builtin.features");
        let features: Vec<&str> = features.split(',').collect();
        for wanted in [
            "ssl",
            "sasl_plain",
            "sasl_scram",
            "sasl_gssapi",
            "sasl_oauthbearer",
            "oidc",
            "gzip",
            "snappy",
            "lz4",
            "zstd",
        ] {
            assert!(
                features.contains(&wanted),
                "{wanted} missing from {features:?}"
            );
        }
    }
}
