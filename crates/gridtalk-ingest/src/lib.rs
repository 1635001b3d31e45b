//! The ingest stage: the HTTPS endpoint Meta posts WhatsApp webhooks to.
//!
//! Guarantees:
//! - **Nobody gets in uninvited.** A POST is accepted only if `X-Hub-Signature-256` is the
//!   HMAC-SHA256 of the raw body under the app secret, compared in constant time, before the body
//!   is parsed. Anything else is answered 401, counted, and nothing is published. Bodies above
//!   `ingest.max_body_bytes` are refused with 413 unread. The GET subscription handshake answers
//!   the challenge only for the configured verify token (constant-time compare).
//! - **Nothing lost.** A verified body is split into its items (every message and every status of
//!   every change of every entry) and each is produced to the webhook topic, keyed by the contact's
//!   WhatsApp id, with `acks=all`. Only when every item is acknowledged does Meta get 200; if any
//!   produce fails Meta gets 500 and redelivers, and the converse stage drops the repeats by item id.
//! - **Supervised.** While publishing fails the stage reports not ready (so Kubernetes sends
//!   Meta's retries to another replica) and probes the broker until it answers again; a fatal
//!   producer error (a fenced idempotent producer) stops the stage with an error, so the process
//!   restarts with a new producer instead of answering 500 to every webhook forever.
//! - **Bounded.** Connections are capped and must send their request head and body within
//!   their timeouts (`server`); nobody can hold the port with idle or dribbling connections.
//! - The endpoint runs on its own port, apart from `/metrics` and the health checks.

mod server;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use hmac::{Hmac, Mac};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;

use gridtalk_config::{Config, Secret};
use gridtalk_kafka::KafkaError;
use gridtalk_telemetry::{Metrics, Readiness};

pub use gridtalk_contract::webhook_body::{split, unparsed};
pub use gridtalk_contract::WebhookItem;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error("the webhook producer cannot go on (fatal Kafka client error): {0}")]
    Producer(String),
    #[error("webhook endpoint on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

struct Shared {
    verify_token: Secret,
    app_secret: Secret,
    producer: FutureProducer,
    topic: String,
    audit_topic: String,
    /// How audit records are framed (settled at start-up, see [`gridtalk_kafka::published`]).
    audit_framing: gridtalk_contract::Framing,
    timeout: Duration,
    max_body_bytes: usize,
    body_read_timeout: Duration,
    health: ProducerHealth,
    /// Bounds the audit records refused requests write (`ingest.max_refusal_audits_per_minute`);
    /// none when it is 0 (nothing audited, everything still counted).
    refusal_audits: Option<
        governor::RateLimiter<
            governor::state::NotKeyed,
            governor::state::InMemoryState,
            governor::clock::DefaultClock,
        >,
    >,
}

/// Whether webhooks can be published: readiness follows it, and a fatal producer error stops
/// the stage (the process exits non-zero and is restarted with a new producer) instead of
/// answering 500 to every webhook forever.
struct ProducerHealth {
    ready: Arc<AtomicBool>,
    /// Since when publishing fails (none while it works).
    failing_since: Mutex<Option<Instant>>,
    /// Cancelled on a fatal producer error; the reason is kept in `fatal_reason`.
    fatal: CancellationToken,
    fatal_reason: Mutex<Option<String>>,
}

impl ProducerHealth {
    fn published(&self) {
        if self.failing_since.lock().expect("health").take().is_some() {
            tracing::info!("the webhook producer reaches the broker; ready");
            self.ready.store(true, Ordering::Release);
        }
    }

    /// A publish failed: not ready until publishing works again (webhooks then get 500 and Meta
    /// redelivers them, to this or another replica). A fatal producer error ends the stage.
    fn failed(&self, producer: &FutureProducer) {
        self.ready.store(false, Ordering::Release);
        self.failing_since
            .lock()
            .expect("health")
            .get_or_insert_with(Instant::now);
        if let Some((code, reason)) = producer.client().fatal_error() {
            let detail = format!("{code:?}: {reason}");
            tracing::error!(error = %detail, "webhook producer failed fatally; stopping the ingest stage so the process restarts with a new one");
            self.fatal_reason
                .lock()
                .expect("health")
                .get_or_insert(detail);
            self.fatal.cancel();
        }
    }

    fn is_failing(&self) -> bool {
        self.failing_since.lock().expect("health").is_some()
    }
}

/// While publishing fails, checks every `PROBE_INTERVAL` whether the broker answers again, so a
/// replica taken out of service by its readiness comes back without needing a webhook first.
const PROBE_INTERVAL: Duration = Duration::from_secs(5);

/// The stage starts out failing, so the first probe (at once) is what makes it ready: not before
/// its producer has reached the broker.
async fn probe_while_failing(shared: Arc<Shared>, stop: CancellationToken) {
    let mut told = false;
    loop {
        if shared.health.is_failing() {
            let probe = shared.clone();
            let reachable = tokio::task::spawn_blocking(move || {
                probe
                    .producer
                    .client()
                    .fetch_metadata(Some(&probe.topic), probe.timeout)
                    .is_ok()
            });
            // A probe against an unreachable broker takes the request timeout; stopping does not
            // wait for it.
            let reachable = tokio::select! {
                _ = stop.cancelled() => return,
                reachable = reachable => reachable.unwrap_or(false),
            };
            if reachable && shared.producer.client().fatal_error().is_none() {
                shared.health.published();
                told = false;
            } else if !told {
                // Once per failing period; the probe goes on every PROBE_INTERVAL.
                tracing::warn!(topic = %shared.topic, "the webhook producer cannot reach Kafka; not ready");
                told = true;
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(PROBE_INTERVAL) => {}
        }
    }
}

/// Whether `header` (`sha256=<hex>`) is the HMAC-SHA256 of `body` under `secret`.
pub fn signature_valid(secret: &[u8], body: &[u8], header: Option<&str>) -> bool {
    let Some(hex_digest) = header.and_then(|h| h.strip_prefix("sha256=")) else {
        return false;
    };
    let Ok(given) = hex::decode(hex_digest.trim()) else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(body);
    // verify_slice compares in constant time.
    mac.verify_slice(&given).is_ok()
}

/// The router of the webhook endpoint (exposed for tests and embedding).
fn router(shared: Arc<Shared>, path: &str) -> Router {
    Router::new()
        .route(path, get(handshake).post(receive))
        .with_state(shared)
}

/// Reads a request body whole: refused with 413 (unread) above `max_body_bytes`, and with 408 and
/// the connection closed when it has not fully arrived within `body_read_timeout`.
async fn read_body(shared: &Shared, headers: &HeaderMap, body: Body) -> Result<Bytes, Response> {
    let metrics = Metrics::global();
    let too_large = || {
        metrics.webhooks.with_label_values(&["too_large"]).inc();
        StatusCode::PAYLOAD_TOO_LARGE.into_response()
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > shared.max_body_bytes as u64) {
        return Err(too_large());
    }
    match tokio::time::timeout(
        shared.body_read_timeout,
        collect_body(body, shared.max_body_bytes),
    )
    .await
    {
        Ok(Ok(Some(bytes))) => Ok(bytes),
        Ok(Ok(None)) => Err(too_large()),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "webhook body not read");
            Err(StatusCode::BAD_REQUEST.into_response())
        }
        Err(_) => {
            metrics.webhooks.with_label_values(&["body_timeout"]).inc();
            tracing::debug!(
                timeout_ms = shared.body_read_timeout.as_millis() as u64,
                "webhook body not received in time; closing the connection"
            );
            Err((StatusCode::REQUEST_TIMEOUT, [(header::CONNECTION, "close")]).into_response())
        }
    }
}

/// The whole body, or none as soon as it exceeds `limit` bytes (the rest is not read).
async fn collect_body(body: Body, limit: usize) -> Result<Option<Bytes>, axum::Error> {
    use futures::StreamExt;
    let mut chunks = body.into_data_stream();
    let mut whole = bytes::BytesMut::new();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk?;
        if whole.len() + chunk.len() > limit {
            return Ok(None);
        }
        whole.extend_from_slice(&chunk);
    }
    Ok(Some(whole.freeze()))
}

async fn handshake(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<std::collections::HashMap<String, String>>,
) -> Response {
    let mode = query.get("hub.mode").map(String::as_str);
    let token = query
        .get("hub.verify_token")
        .map(String::as_bytes)
        .unwrap_or_default();
    let expected = shared.verify_token.expose().as_bytes();
    let token_ok: bool = token.ct_eq(expected).into();
    match (mode, token_ok, query.get("hub.challenge")) {
        (Some("subscribe"), true, Some(challenge)) => {
            Metrics::global()
                .webhooks
                .with_label_values(&["verified_handshake"])
                .inc();
            (StatusCode::OK, challenge.clone()).into_response()
        }
        _ => {
            Metrics::global()
                .webhooks
                .with_label_values(&["refused_handshake"])
                .inc();
            tracing::warn!("webhook subscription handshake refused");
            StatusCode::FORBIDDEN.into_response()
        }
    }
}

async fn receive(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Body) -> Response {
    let metrics = Metrics::global();
    let body = match read_body(&shared, &headers, body).await {
        Ok(body) => body,
        Err(refused) => return refused,
    };
    let signature = headers
        .get("x-hub-signature-256")
        .and_then(|v| v.to_str().ok());
    if !signature_valid(shared.app_secret.expose().as_bytes(), &body, signature) {
        metrics.webhooks.with_label_values(&["bad_signature"]).inc();
        metrics
            .refusals
            .with_label_values(&["ingest", "bad_signature"])
            .inc();
        // Counted always; audited (and logged) at a bounded rate, so that anyone who can reach
        // the endpoint cannot fill the audit topic or the logs.
        let audited = shared
            .refusal_audits
            .as_ref()
            .is_some_and(|limit| limit.check().is_ok());
        if audited {
            tracing::warn!(
                bytes = body.len(),
                "webhook refused: missing or invalid X-Hub-Signature-256"
            );
            audit_bad_signature(&shared, &body, signature.is_some()).await;
        } else {
            metrics
                .webhooks
                .with_label_values(&["bad_signature_not_audited"])
                .inc();
        }
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let received_at = chrono::Utc::now().timestamp_millis();
    let items = match split(&body, received_at) {
        Ok(items) => items,
        Err(detail) => {
            // Signed by Meta but not a payload we understand: 200 would lose it silently, 4xx makes
            // Meta retry forever; keep it on the topic as an "unparsed" item for inspection.
            metrics.webhooks.with_label_values(&["malformed"]).inc();
            tracing::warn!(error = %detail, "signed webhook body is not a WhatsApp payload; kept as unparsed");
            vec![unparsed(&body, received_at, &detail)]
        }
    };
    let values: Vec<Vec<u8>> = items.iter().map(WebhookItem::to_json).collect();
    let deliveries: Vec<_> = items
        .iter()
        .zip(&values)
        .map(|(item, value)| {
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "gridtalk.webhook.kind",
                    value: Some(item.kind.as_bytes()),
                })
                .insert(Header {
                    key: "gridtalk.webhook.item_id",
                    value: Some(item.item_id.as_bytes()),
                });
            let record = FutureRecord::to(&shared.topic)
                .key(&item.contact)
                .payload(value)
                .headers(headers);
            shared.producer.send(record, shared.timeout)
        })
        .collect();
    // Meta waits for an answer only so long: past the request timeout it gets 500 and
    // redelivers (a record delivered late anyway is dropped by converse as a redelivery).
    let Ok(delivered) =
        tokio::time::timeout(shared.timeout, futures::future::join_all(deliveries)).await
    else {
        metrics
            .webhooks
            .with_label_values(&["publish_failed"])
            .inc();
        tracing::error!(
            timeout_ms = shared.timeout.as_millis() as u64,
            "webhook items not acknowledged in time; answering 500 so Meta redelivers"
        );
        shared.health.failed(&shared.producer);
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    for (delivery, item) in delivered.into_iter().zip(&items) {
        if let Err((e, _)) = delivery {
            metrics
                .webhooks
                .with_label_values(&["publish_failed"])
                .inc();
            tracing::error!(error = %e, "webhook item not published; answering 500 so Meta redelivers");
            shared.health.failed(&shared.producer);
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
        metrics.webhook_items.with_label_values(&[&item.kind]).inc();
    }
    shared.health.published();
    metrics.webhooks.with_label_values(&["accepted"]).inc();
    StatusCode::OK.into_response()
}

/// Records a refused webhook on the audit topic. The body is not parsed (it is untrusted); the
/// record carries its size and digest. A failed publish is logged: the refusal stands regardless.
async fn audit_bad_signature(shared: &Shared, body: &[u8], had_signature: bool) {
    use gridtalk_contract::AvroRecord;
    use sha2::Digest;
    let digest = hex::encode(&Sha256::digest(body)[..12]);
    let at = chrono::Utc::now().timestamp_millis();
    let audit = gridtalk_contract::AuditRecord {
        audit_id: format!("webhook:{digest}:{at}"),
        reason: "bad_signature".into(),
        stage: "ingest".into(),
        detail: format!(
            "{} X-Hub-Signature-256 on a {}-byte body (sha256 prefix {digest}); refused with 401 unread",
            if had_signature { "invalid" } else { "missing" },
            body.len()
        ),
        wa_id: None,
        contact_id: None,
        request_id: None,
        action: None,
        correlation_id: None,
        wa_message_id: None,
        at,
    };
    let bytes = audit.encode(shared.audit_framing);
    let record = FutureRecord::to(&shared.audit_topic)
        .key("webhook")
        .payload(&bytes)
        .headers(OwnedHeaders::new().insert(Header {
            key: "gridtalk.audit.reason",
            value: Some("bad_signature".as_bytes()),
        }));
    if let Err((e, _)) = shared.producer.send(record, shared.timeout).await {
        tracing::error!(error = %e, "audit record for a refused webhook not published");
    }
}

/// Runs the webhook endpoint until `shutdown`.
pub async fn run(
    config: Arc<Config>,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> Result<(), IngestError> {
    let ready = readiness.register("ingest");
    let (verify_token, app_secret) = config.ingest_secrets().map_err(IngestError::Config)?;
    let audit_framing = match gridtalk_kafka::published::framing_for(
        &config,
        &config.topics.audit,
        gridtalk_contract::AUDIT_RECORD_AVSC,
        &shutdown,
    )
    .await
    {
        None => return Ok(()),
        Some(framing) => framing.map_err(IngestError::Config)?,
    };
    let shared = Arc::new(Shared {
        verify_token,
        app_secret,
        producer: gridtalk_kafka::producer(&config.kafka)?,
        topic: config.topics.webhook.clone(),
        audit_topic: config.topics.audit.clone(),
        audit_framing,
        timeout: Duration::from_millis(config.kafka.request_timeout_ms),
        max_body_bytes: config.ingest.max_body_bytes,
        body_read_timeout: Duration::from_millis(config.ingest.body_read_timeout_ms),
        health: ProducerHealth {
            ready: ready.clone(),
            // Not ready until the producer has reached the broker (the first probe).
            failing_since: Mutex::new(Some(Instant::now())),
            fatal: CancellationToken::new(),
            fatal_reason: Mutex::new(None),
        },
        refusal_audits: std::num::NonZeroU32::new(config.ingest.max_refusal_audits_per_minute)
            .map(|n| governor::RateLimiter::direct(governor::Quota::per_minute(n))),
    });
    let addr = config.ingest.listen;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| IngestError::Listen { addr, source })?;
    let app = router(shared.clone(), &config.ingest.path);
    let limits = server::ConnectionLimits {
        header_read_timeout: Duration::from_millis(config.ingest.header_read_timeout_ms),
        max_connections: config.ingest.max_connections,
    };
    tracing::info!(listen = %addr, path = %config.ingest.path, topic = %config.topics.webhook, "ingest stage listening");
    let fatal = shared.health.fatal.clone();
    let stop = CancellationToken::new();
    let probe = tokio::spawn(probe_while_failing(shared.clone(), stop.clone()));
    server::serve(listener, app, limits, async move {
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = fatal.cancelled() => {}
        }
    })
    .await;
    stop.cancel();
    let _ = probe.await;
    ready.store(false, Ordering::Release);
    if let Some(reason) = shared.health.fatal_reason.lock().expect("health").clone() {
        return Err(IngestError::Producer(reason));
    }
    tracing::info!("ingest stage stopped");
    Ok(())
}

#[cfg(test)]
mod tests;
