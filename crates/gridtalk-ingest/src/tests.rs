//! The ingest stage against librdkafka's mock cluster: a broker that goes away turns readiness
//! false (and webhooks get 500 for Meta to redeliver) until it answers again, a fatal producer
//! error stops the stage with an error instead of answering 500 forever, and the webhook port's
//! connections are bounded (idle and dribbling clients are cut off, connections are capped)
//! while webhooks from Meta are still accepted.

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

fn config(bootstrap: &str, port: u16, extra: &[(&str, &str)]) -> Arc<Config> {
    let mut settings = vec![
        ("SEND__ACCESS_TOKEN", "unused".to_string()),
        ("INGEST__VERIFY_TOKEN", "verify".to_string()),
        ("INGEST__APP_SECRET", APP_SECRET.to_string()),
        ("INGEST__LISTEN", format!("127.0.0.1:{port}")),
        ("KAFKA__BOOTSTRAP_SERVERS", bootstrap.to_string()),
        ("KAFKA__REQUEST_TIMEOUT_MS", "3000".to_string()),
        ("KAFKA__DELIVERY_TIMEOUT_MS", "3000".to_string()),
    ];
    settings.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
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
    extra: &[(&str, &str)],
) -> (
    MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    u16,
    Readiness,
    tokio::task::JoinHandle<Result<(), IngestError>>,
) {
    let mock = MockCluster::new(1).expect("mock cluster");
    let port = free_port();
    let config = config(&mock.bootstrap_servers(), port, extra);
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
    let (mock, port, readiness, stage) = start_ingest(shutdown.clone(), &[]).await;

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
    let (mock, port, readiness, stage) = start_ingest(CancellationToken::new(), &[]).await;
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

fn connections(outcome: &str) -> u64 {
    Metrics::global()
        .webhook_connections
        .with_label_values(&[outcome])
        .get()
}

/// Reads what the server sends until it closes the connection (or `limit` passes, which fails
/// the test: the server never closed it).
async fn read_until_closed(stream: &mut tokio::net::TcpStream, limit: Duration) -> String {
    use tokio::io::AsyncReadExt;
    let mut received = Vec::new();
    let read = tokio::time::timeout(limit, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the server kept the connection open");
    String::from_utf8_lossy(&received).into_owned()
}

/// Meta's webhooks are still accepted after what the test did; then the stage stops cleanly.
async fn still_accepts_webhooks_then_stops(
    port: u16,
    shutdown: CancellationToken,
    stage: tokio::task::JoinHandle<Result<(), IngestError>>,
) {
    assert_eq!(
        post_status(port, 2).await,
        200,
        "webhooks are still accepted"
    );
    shutdown.cancel();
    stage.await.expect("joined").expect("a clean stop");
}

async fn connect(port: u16) -> tokio::net::TcpStream {
    tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_completes_its_request_head_is_cut_off() {
    use tokio::io::AsyncWriteExt;
    let shutdown = CancellationToken::new();
    let (_mock, port, _readiness, stage) = start_ingest(
        shutdown.clone(),
        &[("INGEST__HEADER_READ_TIMEOUT_MS", "300")],
    )
    .await;
    let timeouts_before = connections("header_timeout");

    // Half a request line, then nothing (a slowloris client).
    let mut slow = connect(port).await;
    slow.write_all(b"POST /webhook HTTP/1.1\r\nHost: gridtalk\r\nContent-Le")
        .await
        .expect("write");
    // A client that connects and never sends a byte.
    let mut silent = connect(port).await;
    // A client that sends one webhook and then keeps the connection idle.
    let mut idle = connect(port).await;
    idle.write_all(b"GET /webhook?hub.mode=subscribe&hub.verify_token=verify&hub.challenge=7 HTTP/1.1\r\nHost: gridtalk\r\n\r\n")
        .await
        .expect("write");

    for (who, stream) in [("slow", &mut slow), ("silent", &mut silent)] {
        let received = read_until_closed(stream, Duration::from_secs(20)).await;
        assert!(
            !received.contains("200 OK"),
            "{who}: nothing was served: {received}"
        );
    }
    let received = read_until_closed(&mut idle, Duration::from_secs(20)).await;
    assert!(
        received.starts_with("HTTP/1.1 200") && received.ends_with("7"),
        "the request the idle client sent was answered before it was cut off: {received}"
    );
    assert!(
        connections("header_timeout") >= timeouts_before + 2,
        "the cut-off connections are counted"
    );
    still_accepts_webhooks_then_stops(port, shutdown, stage).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_dribbles_its_body_gets_408_and_is_cut_off() {
    use tokio::io::AsyncWriteExt;
    let shutdown = CancellationToken::new();
    let (_mock, port, _readiness, stage) =
        start_ingest(shutdown.clone(), &[("INGEST__BODY_READ_TIMEOUT_MS", "300")]).await;
    let before = Metrics::global()
        .webhooks
        .with_label_values(&["body_timeout"])
        .get();

    let mut dribbling = connect(port).await;
    dribbling
        .write_all(b"POST /webhook HTTP/1.1\r\nHost: gridtalk\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"object\"")
        .await
        .expect("write");
    let received = read_until_closed(&mut dribbling, Duration::from_secs(20)).await;
    assert!(
        received.starts_with("HTTP/1.1 408"),
        "answered 408 Request Timeout: {received}"
    );
    assert!(
        received.to_ascii_lowercase().contains("connection: close"),
        "and told the connection closes: {received}"
    );
    assert_eq!(
        Metrics::global()
            .webhooks
            .with_label_values(&["body_timeout"])
            .get(),
        before + 1
    );
    still_accepts_webhooks_then_stops(port, shutdown, stage).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_limit_is_refused_whether_or_not_it_declares_its_length() {
    use tokio::io::AsyncWriteExt;
    let shutdown = CancellationToken::new();
    let (_mock, port, _readiness, stage) =
        start_ingest(shutdown.clone(), &[("INGEST__MAX_BODY_BYTES", "1024")]).await;

    // Declared too large: refused before a byte of the body is sent.
    let mut declared = connect(port).await;
    declared
        .write_all(b"POST /webhook HTTP/1.1\r\nHost: gridtalk\r\nContent-Length: 5000000\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let received = read_until_closed(&mut declared, Duration::from_secs(20)).await;
    assert!(received.starts_with("HTTP/1.1 413"), "{received}");

    // Chunked, with no length: refused once the chunks pass the limit.
    let mut chunked = connect(port).await;
    let mut request = b"POST /webhook HTTP/1.1\r\nHost: gridtalk\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    for _ in 0..4 {
        request.extend_from_slice(b"200\r\n");
        request.extend_from_slice(&[b' '; 0x200]);
        request.extend_from_slice(b"\r\n");
    }
    let _ = chunked.write_all(&request).await;
    let received = read_until_closed(&mut chunked, Duration::from_secs(20)).await;
    assert!(received.starts_with("HTTP/1.1 413"), "{received}");

    still_accepts_webhooks_then_stops(port, shutdown, stage).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_are_closed_at_once_and_served_again_when_one_closes() {
    let shutdown = CancellationToken::new();
    let (_mock, port, _readiness, stage) =
        start_ingest(shutdown.clone(), &[("INGEST__MAX_CONNECTIONS", "2")]).await;
    let over_cap_before = connections("over_cap");

    // Two connections take the cap (and hold it: the header timeout is the default 10 s); the
    // kernel hands connections to the accept loop in order, so the next one is the third. The
    // connection of the webhook `start_ingest` posted may still hold a place until the server has
    // seen it close: then the second is the one over the cap, and the attempt is repeated.
    let started = Instant::now();
    let (first, _second) = loop {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "a third connection was never closed at once"
        );
        let first = connect(port).await;
        let second = connect(port).await;
        let mut third = connect(port).await;
        match tokio::time::timeout(Duration::from_secs(2), async {
            use tokio::io::AsyncReadExt;
            let mut buf = [0u8; 64];
            third.read(&mut buf).await
        })
        .await
        {
            // Closed without an answer: the cap held.
            Ok(Ok(0)) | Ok(Err(_)) => break (first, second),
            Ok(Ok(n)) => panic!("the third connection got {n} bytes instead of being closed"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    assert!(
        connections("over_cap") > over_cap_before,
        "counted over_cap"
    );

    // Once a connection closes, its place is free for Meta's next webhook.
    drop(first);
    let started = Instant::now();
    while post_status(port, 2).await != 200 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "a freed place is served again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown.cancel();
    stage.await.expect("joined").expect("a clean stop");
}
