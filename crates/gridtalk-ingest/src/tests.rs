//! The ingest stage's supervision against librdkafka's mock cluster: a broker that goes away
//! turns readiness false (and webhooks get 500 for Meta to redeliver) until it answers again, and
//! a fatal producer error stops the stage with an error instead of answering 500 forever.

use std::time::{Duration, Instant};

use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

use super::*;

const APP_SECRET: &str = "ingest-test-app-secret";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn config(bootstrap: &str, port: u16) -> Arc<Config> {
    let settings = [
        ("SEND__ACCESS_TOKEN", "unused".to_string()),
        ("INGEST__VERIFY_TOKEN", "verify".to_string()),
        ("INGEST__APP_SECRET", APP_SECRET.to_string()),
        ("INGEST__LISTEN", format!("127.0.0.1:{port}")),
        ("KAFKA__BOOTSTRAP_SERVERS", bootstrap.to_string()),
        ("KAFKA__REQUEST_TIMEOUT_MS", "3000".to_string()),
        ("KAFKA__DELIVERY_TIMEOUT_MS", "3000".to_string()),
    ];
    Arc::new(
        Config::load(
            None,
            settings
                .into_iter()
                .map(|(k, v)| (format!("GRIDTALK__{k}"), v)),
        )
        .expect("test configuration"),
    )
}

/// A signed webhook with one status, as Meta posts it.
async fn post_status(port: u16, n: u32) -> u16 {
    let body = serde_json::json!({
        "object": "whatsapp_business_account",
        "entry": [{"id": "1", "changes": [{"field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "15550000000", "phone_number_id": "106540352242922"},
            "statuses": [{"id": format!("wamid.T{n}"), "status": "delivered", "timestamp": "1795514400",
                          "recipient_id": "4915100000001"}]
        }}]}]
    })
    .to_string();
    let mut mac = Hmac::<Sha256>::new_from_slice(APP_SECRET.as_bytes()).expect("key");
    mac.update(body.as_bytes());
    let signature = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/webhook"))
        .header("content-type", "application/json")
        .header("x-hub-signature-256", signature)
        .body(body)
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

async fn wait_for(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let started = Instant::now();
    while !condition() {
        assert!(started.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn ingest_ready(readiness: &Readiness) -> bool {
    !readiness.pending().iter().any(|name| name == "ingest")
}

/// The ingest stage on a mock cluster with the webhook and audit topics, once it accepted a
/// first webhook.
async fn start_ingest(
    shutdown: CancellationToken,
) -> (
    MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    u16,
    Readiness,
    tokio::task::JoinHandle<Result<(), IngestError>>,
) {
    let mock = MockCluster::new(1).expect("mock cluster");
    let port = free_port();
    let config = config(&mock.bootstrap_servers(), port);
    mock.create_topic(&config.topics.webhook, 2, 1)
        .expect("topic");
    mock.create_topic(&config.topics.audit, 1, 1)
        .expect("topic");
    let readiness = Readiness::default();
    let stage = tokio::spawn(run(config, readiness.clone(), shutdown));
    wait_for("ingest ready", Duration::from_secs(10), || {
        ingest_ready(&readiness)
    })
    .await;
    assert_eq!(post_status(port, 1).await, 200);
    (mock, port, readiness, stage)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_makes_ingest_unready_until_the_broker_answers_again() {
    let shutdown = CancellationToken::new();
    let (mock, port, readiness, stage) = start_ingest(shutdown.clone()).await;

    mock.broker_down(1).expect("broker down");
    assert_eq!(
        post_status(port, 2).await,
        500,
        "Meta is asked to redeliver"
    );
    assert!(
        !ingest_ready(&readiness),
        "not ready while publishing fails"
    );

    mock.broker_up(1).expect("broker up");
    wait_for(
        "ready again once the broker answers",
        Duration::from_secs(30),
        || ingest_ready(&readiness),
    )
    .await;
    // Meta redelivers until it gets 200; the producer may need a moment to settle after the
    // outage (records it could not deliver time out first).
    let started = Instant::now();
    let mut n = 3;
    while post_status(port, n).await != 200 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "webhooks are accepted again after the outage"
        );
        n += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(ingest_ready(&readiness));
    shutdown.cancel();
    stage.await.expect("joined").expect("a clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fatal_producer_error_stops_the_stage_instead_of_answering_500_forever() {
    let (mock, port, readiness, stage) = start_ingest(CancellationToken::new()).await;
    // The broker fences the idempotent producer: librdkafka raises a fatal error.
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER; 4],
    );
    let status = post_status(port, 2).await;
    assert_ne!(status, 200, "not acknowledged");
    let ended = tokio::time::timeout(Duration::from_secs(30), stage)
        .await
        .expect("the stage stops by itself")
        .expect("joined");
    match ended {
        Err(IngestError::Producer(detail)) => assert!(!detail.is_empty()),
        other => panic!("expected a producer failure, got {other:?}"),
    }
    assert!(!ingest_ready(&readiness));
}
