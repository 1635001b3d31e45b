//! The embedded default: an in-process Kafka-compatible broker (tansu; memory storage, or SQLite
//! files that survive a restart) and a traffic generator that publishes realistic Trading Grid events for the eight flows. Used by the
//! `demo` command and the tests; never part of the production binary.

use std::net::TcpListener;
use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use tansu_broker::broker::Broker;
use tansu_broker::coordinator::group::administrator::Controller;
use tansu_storage::StorageContainer;

use gridtalk_contract::samples::{sample_event, EVENT_TYPES};
use gridtalk_contract::{encode_single_object, json_to_avro, ContractSchemas};

/// A free TCP port on the loopback interface.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Where the embedded broker keeps its data by default: in memory, gone with the process.
pub const MEMORY_STORAGE: &str = "memory://tansu/";

/// Starts a tansu broker with memory storage on `127.0.0.1:port` and returns its bootstrap address
/// once it accepts connections.
pub async fn start_broker(port: u16) -> anyhow::Result<String> {
    start_broker_with_storage(port, MEMORY_STORAGE, false).await
}

/// Starts a tansu broker on `127.0.0.1:port` with `storage`: [`MEMORY_STORAGE`], or
/// `sqlite://NAME.db` for a SQLite file relative to the current directory, whose topics, records,
/// groups and committed offsets survive a restart of the broker.
///
/// The broker runs on its own thread with its own Tokio runtime, so that clients which block a
/// worker thread of the caller's runtime (librdkafka's synchronous commit on close, for example)
/// can never starve the broker they are waiting for. The broker lives until the process exits.
///
/// With `sasl`, every client must authenticate (SASL_PLAINTEXT): PLAIN accepts any password for
/// any user, SCRAM-SHA-256/512 checks against the credentials stored with
/// AlterUserScramCredentials. Memory storage keeps no SCRAM credentials, so there every SCRAM
/// login is refused, as a real cluster refuses an unknown user or a wrong password.
pub async fn start_broker_with_storage(
    port: u16,
    storage: &str,
    sasl: bool,
) -> anyhow::Result<String> {
    let storage = url::Url::parse(storage)?;
    let address = format!("127.0.0.1:{port}");
    let url = url::Url::parse(&format!("tcp://{address}"))?;
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<anyhow::Result<()>>();
    std::thread::Builder::new()
        .name("embedded-broker".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.into()));
                    return;
                }
            };
            runtime.block_on(async move {
                let built = Broker::<Controller<StorageContainer>, StorageContainer>::builder()
                    .node_id(111)
                    .cluster_id("gridtalk")
                    .incarnation_id(uuid::Uuid::new_v4())
                    .advertised_listener(url.clone())
                    .listener(url)
                    .storage(storage)
                    .authentication(sasl)
                    .silent(true)
                    .build()
                    .await;
                let mut broker = match built {
                    Ok(broker) => broker,
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow::anyhow!("embedded broker: {e:?}")));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                if let Err(e) = broker.serve(tokio::time::Instant::now()).await {
                    tracing::error!(error = ?e, "embedded broker stopped");
                }
            });
        })?;
    ready_rx
        .await
        .map_err(|_| anyhow::anyhow!("embedded broker thread exited during start"))??;
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(&address).await.is_ok() {
            return Ok(address);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    anyhow::bail!("embedded broker did not start listening on {address}")
}

/// Which input topic an event type belongs on (the default topic layout).
pub fn topic_for(event_type: &str) -> &'static str {
    match event_type {
        t if t.starts_with("tg.shipment.exception") || t.starts_with("tg.document.") => {
            "tg.exceptions.v1"
        }
        t if t.starts_with("tg.onboarding.") => "tg.onboarding.v1",
        t if t.starts_with("wf.approval.") => "wf.approvals.v1",
        t if t.starts_with("wf.case.") => "wf.cases.v1",
        t if t.starts_with("ops.") => "ops.summaries.v1",
        _ => "tg.documents.v1",
    }
}

/// Publishes sample events round-robin over every event type and partner until `count` events
/// (or forever with `None`), `per_second` at most. Each record is keyed by its correlation id.
pub async fn generate(
    bootstrap: &str,
    partners: &[&str],
    per_second: f64,
    count: Option<u64>,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<u64> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        // One record per batch: the embedded broker answers a fetch from inside a batch with
        // the next batch, so consumers replaying from a commit must find a batch start there.
        .set("batch.num.messages", "1")
        .create()?;
    let schema = &ContractSchemas::get().trading_grid_event;
    let mut interval = tokio::time::interval(Duration::from_secs_f64(1.0 / per_second.max(0.01)));
    let mut seq = 0u64;
    while count.is_none_or(|c| seq < c) {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = interval.tick() => {}
        }
        let (event_type, _, _) = EVENT_TYPES[(seq as usize) % EVENT_TYPES.len()];
        let partner = partners[(seq as usize / EVENT_TYPES.len()) % partners.len()];
        let now = chrono::Utc::now().timestamp_millis();
        let json = sample_event(event_type, seq, partner, now).expect("known event type");
        let key = json["correlation_id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let value = json_to_avro(&json, schema).map_err(|e| anyhow::anyhow!(e))?;
        let bytes = encode_single_object(schema, value)?;
        producer
            .send(
                FutureRecord::to(topic_for(event_type))
                    .key(&key)
                    .payload(&bytes),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)?;
        seq += 1;
    }
    Ok(seq)
}
