//! Telemetry in one place: every metric gridtalk exports is defined here (names follow
//! `gridtalk_<stage>_<what>_total` / `_seconds`, labels are bounded sets: never a phone number,
//! message id or free text), the admin HTTP server (`/metrics`, `/healthz`, `/readyz`) and log setup.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
mod process;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use tokio_util::sync::CancellationToken;

/// All of gridtalk's metrics. One instance per process ([`Metrics::global`]).
#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    /// Input records read by the route stage, by topic.
    pub events_consumed: IntCounterVec,
    /// Events that produced at least one outbox message, by event type.
    pub events_routed: IntCounterVec,
    /// Events dropped as duplicates within the dedupe window, by event type.
    pub events_deduplicated: IntCounterVec,
    /// Events that matched no rule, by event type.
    pub events_unrouted: IntCounterVec,
    /// Records written to the dead-letter topic, by stage and reason.
    pub dead_letters: IntCounterVec,
    /// Outbox messages produced, by template.
    pub messages_rendered: IntCounterVec,
    /// WhatsApp send attempts by outcome (accepted, retry, dead_letter, halt) and error class.
    pub sends: IntCounterVec,
    /// Meta error codes seen, by code (a bounded set: Meta's documented codes).
    pub send_errors: IntCounterVec,
    /// Time spent waiting for a limiter, by limiter (throughput, pair).
    pub rate_limit_wait_seconds: HistogramVec,
    /// Cloud API request latency, by outcome.
    pub send_request_seconds: HistogramVec,
    /// Event occurred-at to WhatsApp acceptance.
    pub end_to_end_seconds: HistogramVec,
    /// 1 while the sending number is halted (token expired, account blocked), else 0.
    pub sender_halted: IntGauge,
    /// Sends in flight.
    pub sends_in_flight: IntGauge,
    /// Coalescing, by outcome: `merged` (messages that went in a digest), `digest` (digests
    /// WhatsApp accepted), `refused` (digests WhatsApp refused for good; their messages went one
    /// by one).
    pub coalesced: IntCounterVec,
    /// Computed summaries sent, by summary and kind (daily, threshold).
    pub summaries_sent: IntCounterVec,
    /// Messages Meta reports as charged (status `pricing` of type `regular`, or the older
    /// `billable: true`), once per message, by Meta's pricing category and gridtalk's flow.
    pub billable_messages: IntCounterVec,
    /// Consumer lag per stage and partition (high watermark minus position).
    pub consumer_lag: IntGaugeVec,
    /// Directory entries loaded, by kind (partner, contact).
    pub directory_entries: IntGaugeVec,
    /// Webhook requests by outcome (accepted, bad_signature, bad_signature_not_audited, too_large,
    /// body_timeout, malformed, publish_failed, verified_handshake, refused_handshake).
    pub webhooks: IntCounterVec,
    /// Connections to the webhook port, by outcome (accepted, over_cap: closed at once because
    /// `ingest.max_connections` were open, header_timeout: closed for not sending a request head
    /// within `ingest.header_read_timeout_ms`).
    pub webhook_connections: IntCounterVec,
    /// Connections open on the webhook port.
    pub webhook_connections_open: IntGauge,
    /// Webhook items published, by kind (message, status).
    pub webhook_items: IntCounterVec,
    /// Webhook items the converse stage handled, by outcome (answered, comment, status,
    /// stale_status, redelivery, refused, waited, unknown, ignored).
    pub converse_items: IntCounterVec,
    /// Records published on the response topic, by response type.
    pub responses: IntCounterVec,
    /// Refused inbounds (each also an audit record), by stage and reason.
    pub refusals: IntCounterVec,
    /// Live entries of partition-local state stores, by store (send_index, …).
    pub state_entries: IntGaugeVec,
    /// Time to restore a partition's state from its changelog, by store.
    pub state_restore_seconds: HistogramVec,
    /// Replies to people queued on the outbox by the converse stage, by kind (recorded,
    /// already_decided) and form (text, template).
    pub confirmations: IntCounterVec,
    /// Request clock commands sent to the clocks' owners, by command (open, close, upstream).
    pub clock_commands: IntCounterVec,
    /// Steps of request clocks fired, by policy, step (reminder, escalation) and trigger (clock:
    /// gridtalk's own clock, upstream: an upstream overdue event).
    pub clock_fires: IntCounterVec,
    /// How long messages waited for their recipient's business hours (quiet hours), by stage
    /// that held them (route: the request itself, decide: a reminder), on the clocks' time.
    pub quiet_hours_wait_seconds: HistogramVec,
    /// Always 1, labelled with the running build's version and commit.
    pub build_info: IntGaugeVec,
    process: process::ProcessMetrics,
}

impl Metrics {
    pub fn global() -> &'static Metrics {
        static METRICS: OnceLock<Metrics> = OnceLock::new();
        METRICS.get_or_init(Metrics::new)
    }

    fn new() -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("metric definition");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let histogram = |name: &str, help: &str, labels: &[&str], buckets: Vec<f64>| {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
                .expect("metric definition");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("metric definition");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("metric definition");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let wait_buckets = vec![
            0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0,
        ];
        let latency_buckets = vec![
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ];
        Metrics {
            events_consumed: counter(
                "gridtalk_route_events_consumed_total",
                "Input records read by the route stage.",
                &["topic"],
            ),
            events_routed: counter(
                "gridtalk_route_events_routed_total",
                "Events that produced outbox messages.",
                &["event_type"],
            ),
            events_deduplicated: counter(
                "gridtalk_route_events_deduplicated_total",
                "Events dropped as duplicates within the dedupe window.",
                &["event_type"],
            ),
            events_unrouted: counter(
                "gridtalk_route_events_unrouted_total",
                "Events that matched no routing rule.",
                &["event_type"],
            ),
            dead_letters: counter(
                "gridtalk_dead_letters_total",
                "Records written to the dead-letter topic.",
                &["stage", "reason"],
            ),
            messages_rendered: counter(
                "gridtalk_route_messages_rendered_total",
                "Outbox messages produced.",
                &["template"],
            ),
            sends: counter(
                "gridtalk_send_attempts_total",
                "WhatsApp send attempts by outcome and error class.",
                &["outcome", "class"],
            ),
            send_errors: counter(
                "gridtalk_send_errors_total",
                "WhatsApp error codes received.",
                &["code"],
            ),
            rate_limit_wait_seconds: histogram(
                "gridtalk_send_rate_limit_wait_seconds",
                "Time spent waiting for a rate limiter.",
                &["limiter"],
                wait_buckets,
            ),
            send_request_seconds: histogram(
                "gridtalk_send_request_seconds",
                "Cloud API request latency.",
                &["outcome"],
                latency_buckets.clone(),
            ),
            end_to_end_seconds: histogram(
                "gridtalk_end_to_end_seconds",
                "Event occurred-at to WhatsApp acceptance.",
                &["event_type"],
                vec![0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0],
            ),
            sender_halted: gauge(
                "gridtalk_send_halted",
                "1 while the sending number is halted and alerting.",
            ),
            sends_in_flight: gauge("gridtalk_send_in_flight", "Sends in flight."),
            summaries_sent: counter(
                "gridtalk_summaries_sent_total",
                "Computed summaries sent, by summary and kind.",
                &["summary", "kind"],
            ),
            billable_messages: counter(
                "gridtalk_whatsapp_billable_messages_total",
                "Messages Meta charges for, by pricing category and flow (from status webhooks).",
                &["category", "flow"],
            ),
            coalesced: counter(
                "gridtalk_send_coalesced_total",
                "Informational messages merged into digests, digests sent and digests refused.",
                &["outcome"],
            ),
            consumer_lag: gauge_vec(
                "gridtalk_consumer_lag",
                "Consumer lag per stage and partition.",
                &["stage", "topic", "partition"],
            ),
            directory_entries: gauge_vec(
                "gridtalk_directory_entries",
                "Directory entries loaded.",
                &["kind"],
            ),
            webhooks: counter(
                "gridtalk_ingest_webhooks_total",
                "Webhook requests by outcome.",
                &["outcome"],
            ),
            webhook_connections: counter(
                "gridtalk_ingest_connections_total",
                "Connections to the webhook port by outcome.",
                &["outcome"],
            ),
            webhook_connections_open: gauge(
                "gridtalk_ingest_connections_open",
                "Connections open on the webhook port.",
            ),
            webhook_items: counter(
                "gridtalk_ingest_items_total",
                "Webhook items (messages, statuses) published to the webhook topic.",
                &["kind"],
            ),
            clock_commands: counter(
                "gridtalk_clock_commands_total",
                "Request clock commands sent to the clocks' owners, by command.",
                &["command"],
            ),
            clock_fires: counter(
                "gridtalk_clock_fires_total",
                "Steps of request clocks fired (reminders, escalations), by policy, step and trigger.",
                &["policy", "step", "trigger"],
            ),
            state_entries: gauge_vec(
                "gridtalk_state_entries",
                "Live entries of partition-local state stores, by store.",
                &["store"],
            ),
            quiet_hours_wait_seconds: histogram(
                "gridtalk_quiet_hours_wait_seconds",
                "How long messages waited for their recipient's business hours.",
                &["stage"],
                vec![60.0, 600.0, 3_600.0, 14_400.0, 28_800.0, 57_600.0, 86_400.0, 259_200.0],
            ),
            state_restore_seconds: histogram(
                "gridtalk_state_restore_seconds",
                "Time to restore a partition's state from its changelog, by store.",
                &["store"],
                vec![0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0],
            ),
            converse_items: counter(
                "gridtalk_converse_items_total",
                "Webhook items handled by the converse stage, by outcome.",
                &["outcome"],
            ),
            responses: counter(
                "gridtalk_responses_total",
                "Records published on the response topic, by response type.",
                &["type"],
            ),
            refusals: counter(
                "gridtalk_refusals_total",
                "Refused inbounds (bad signature, bad token, unauthorised, already decided), by stage and reason.",
                &["stage", "reason"],
            ),
            confirmations: counter(
                "gridtalk_confirmations_total",
                "Replies to people queued by the converse stage, by kind and form.",
                &["kind", "form"],
            ),
            build_info: gauge_vec(
                "gridtalk_build_info",
                "Always 1: the version and commit of the running build.",
                &["version", "commit"],
            ),
            process: process::ProcessMetrics::register(&registry),
            registry,
        }
    }

    /// Records the running build: `gridtalk_build_info{version,commit} 1`.
    pub fn set_build(&self, version: &str, commit: &str) {
        self.build_info.reset();
        self.build_info.with_label_values(&[version, commit]).set(1);
    }

    /// Creates every series of a counter whose label values are known in advance, at zero, so
    /// that `increase(...)` sees the first event after a restart (a series that appears with
    /// the value 1 has no increase to show).
    pub fn start_at_zero(counter: &IntCounterVec, label_sets: &[Vec<&str>]) {
        for labels in label_sets {
            let _ = counter.with_label_values(labels);
        }
    }

    /// The sum of every series of a counter.
    pub fn total(counter: &IntCounterVec) -> u64 {
        use prometheus::core::Collector;
        counter
            .collect()
            .iter()
            .flat_map(|family| family.get_metric())
            .map(|m| m.get_counter().get_value() as u64)
            .sum()
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        self.process.update();
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .expect("text encoding");
        String::from_utf8(buffer).expect("utf-8 exposition")
    }
}

/// Named readiness flags, one per stage.
type Checks = Vec<(String, Arc<AtomicBool>)>;

/// Readiness of the process: ready once every stage that runs has joined its group, reached the
/// broker and restored its state. Nothing registered yet is not ready ("startup"): a process
/// still waiting for Kafka before its stages start must not look healthy.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    checks: Arc<std::sync::Mutex<Checks>>,
}

impl Readiness {
    /// Registers a named check, initially not ready, and returns its flag. Registering a name
    /// again returns the same flag, so a check can be announced (pending) before the part that
    /// sets it has started.
    pub fn register(&self, name: &str) -> Arc<AtomicBool> {
        let mut checks = self.checks.lock().expect("readiness");
        if let Some((_, flag)) = checks.iter().find(|(n, _)| n == name) {
            return flag.clone();
        }
        let flag = Arc::new(AtomicBool::new(false));
        checks.push((name.to_string(), flag.clone()));
        flag
    }

    /// Names of checks that are not ready (`startup` while nothing is registered).
    pub fn pending(&self) -> Vec<String> {
        let checks = self.checks.lock().expect("readiness");
        if checks.is_empty() {
            return vec!["startup".into()];
        }
        checks
            .iter()
            .filter(|(_, f)| !f.load(Ordering::Acquire))
            .map(|(n, _)| n.clone())
            .collect()
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` until `shutdown` is cancelled.
pub async fn serve_admin(
    listen: SocketAddr,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    tracing::info!(%listen, "admin endpoint listening");
    axum::serve(listener, admin_router(readiness))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

pub fn admin_router(readiness: Readiness) -> Router {
    Router::new()
        .route("/metrics", get(|| async { Metrics::global().render() }))
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(readiness): State<Readiness>| async move {
                let pending = readiness.pending();
                if pending.is_empty() {
                    (StatusCode::OK, "ready".to_string())
                } else {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("waiting for: {}", pending.join(", ")),
                    )
                }
            }),
        )
        .with_state(readiness)
}

/// Installs the log subscriber: `format` `json` or `text`, the filter from `RUST_LOG` (default:
/// info, librdkafka and the embedded broker at warn), to standard error with colours only when it
/// is a terminal.
pub fn init_logging(format: &str) {
    init_logging_with(format, None, None);
}

/// [`init_logging`] with a filter that takes precedence over `RUST_LOG` (e.g. `debug`,
/// `info,gridtalk_send=debug`) and, with `file`, written to that file (without colours) instead
/// of standard error.
pub fn init_logging_with(format: &str, filter: Option<&str>, file: Option<std::fs::File>) {
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::EnvFilter;
    let default = "info,rdkafka=warn,tansu=warn,tansu_broker=warn,tansu_storage=warn";
    let filter = match filter {
        Some(f) => EnvFilter::try_new(f).unwrap_or_else(|_| EnvFilter::new(default)),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default)),
    };
    let ansi = file.is_none() && std::io::stderr().is_terminal();
    let writer = match file {
        Some(file) => {
            tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::sync::Mutex::new(file))
        }
        None => tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::io::stderr),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    let _ = if format == "json" {
        builder
            .json()
            .flatten_event(true)
            .finish()
            .with(RepeatLimit::default())
            .try_init()
    } else {
        builder
            .with_target(false)
            .finish()
            .with(RepeatLimit::default())
            .try_init()
    };
}

/// Rate limit for repeated warnings and errors: while a broker is down, librdkafka reports the
/// same failure on every reconnect attempt (hundreds of lines a second across a process's
/// clients). A WARN or ERROR line whose call site and message start match one written in the
/// last [`RepeatLimit::INTERVAL`] is left out; the first is always written, so every distinct
/// problem is seen at once. INFO and DEBUG lines are never limited.
#[derive(Debug, Default)]
pub struct RepeatLimit {
    written: std::sync::Mutex<
        std::collections::HashMap<(tracing::callsite::Identifier, String), std::time::Instant>,
    >,
}

impl RepeatLimit {
    pub const INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);
    /// How much of the message identifies a repeat (the rest is often a changing count).
    const PREFIX: usize = 48;
    /// Distinct lines remembered; past it the memory starts over.
    const CAPACITY: usize = 1024;

    /// Whether a line with this call site and message is written at `now`.
    fn admit(
        &self,
        site: tracing::callsite::Identifier,
        message: &str,
        now: std::time::Instant,
    ) -> bool {
        let prefix: String = message.chars().take(Self::PREFIX).collect();
        let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        if written.len() >= Self::CAPACITY {
            written.clear();
        }
        match written.get_mut(&(site.clone(), prefix.clone())) {
            Some(at) if now.duration_since(*at) < Self::INTERVAL => false,
            Some(at) => {
                *at = now;
                true
            }
            None => {
                written.insert((site, prefix), now);
                true
            }
        }
    }
}

/// The `message` field of an event, as written.
#[derive(Default)]
struct MessageText(String);

impl tracing::field::Visit for MessageText {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.0 = value.to_string();
        }
    }
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for RepeatLimit {
    fn event_enabled(
        &self,
        event: &tracing::Event<'_>,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        if *event.metadata().level() > tracing::Level::WARN {
            return true;
        }
        let mut message = MessageText::default();
        event.record(&mut message);
        self.admit(
            event.metadata().callsite(),
            &message.0,
            std::time::Instant::now(),
        )
    }
}

/// Masks a phone number for logs: keeps the country-code side and the last two digits.
pub fn mask_phone(phone: &str) -> String {
    let digits: Vec<char> = phone.chars().filter(|c| c.is_ascii_digit()).collect();
    if digits.len() <= 4 {
        return "***".into();
    }
    let head: String = digits[..2].iter().collect();
    let tail: String = digits[digits.len() - 2..].iter().collect();
    format!("+{head}{}{tail}", "*".repeat(digits.len() - 4))
}

/// A WhatsApp message id as logs show it: a stable 64-bit hash (`wamid:3f2a…`). A real wamid is
/// base64 of a structure that contains the recipient's phone number, so it is never logged as
/// is; the hash still lets lines about one message be found together, across processes and
/// versions (FNV-1a, fixed).
pub fn mask_wamid(wamid: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in wamid.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("wamid:{hash:016x}")
}

/// `text` with every wamid replaced by [`mask_wamid`] and every run of seven or more digits
/// (a phone number, possibly with a leading `+`) by [`mask_phone`]: for free text that reaches a
/// log line (an error's detail, a refusal's reason).
pub fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while !rest.is_empty() {
        if let Some(tail) = rest.strip_prefix("wamid.") {
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || "+/=_-".contains(c)))
                .unwrap_or(tail.len());
            out.push_str(&mask_wamid(&rest[..6 + end]));
            rest = &tail[end..];
            continue;
        }
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '+'))
            .unwrap_or(rest.len());
        let run = &rest[..digits];
        if run.chars().filter(char::is_ascii_digit).count() >= 7 {
            out.push_str(&mask_phone(run));
            rest = &rest[digits..];
            continue;
        }
        let next = rest.chars().next().expect("not empty");
        out.push(next);
        rest = &rest[next.len_utf8()..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wamids_and_numbers_never_reach_a_log_line_in_clear() {
        let wamid = "wamid.HBgLMTQxNTU1NTAxMDEVAgARGBI5QTNDQTVCM0Q0Q0Q2RTY3RTcA";
        assert_eq!(mask_wamid(wamid), mask_wamid(wamid));
        assert_ne!(mask_wamid(wamid), mask_wamid("wamid.other"));
        let line = redact(&format!(
            "status read for message {wamid}, from +14155550101."
        ));
        assert!(
            !line.contains("HBgL") && !line.contains("4155550101"),
            "{line}"
        );
        assert!(
            line.contains(&mask_wamid(wamid)) && line.ends_with("01."),
            "{line}"
        );
        assert_eq!(
            redact("attempt 3 of 12, code 131047"),
            "attempt 3 of 12, code 131047"
        );
    }

    #[test]
    fn readiness_is_pending_until_every_announced_check_is_set() {
        let readiness = Readiness::default();
        assert_eq!(readiness.pending(), ["startup"]);
        let announced = readiness.register("route");
        let registered = readiness.register("route");
        assert!(Arc::ptr_eq(&announced, &registered));
        readiness.register("kafka");
        assert_eq!(readiness.pending(), ["route", "kafka"]);
        announced.store(true, Ordering::Release);
        assert_eq!(readiness.pending(), ["kafka"]);
    }

    #[test]
    fn a_repeated_warning_is_written_once_per_interval() {
        struct Site;
        static SITE: Site = Site;
        impl tracing::callsite::Callsite for Site {
            fn set_interest(&self, _: tracing::subscriber::Interest) {}
            fn metadata(&self) -> &tracing::Metadata<'_> {
                unimplemented!()
            }
        }
        let limit = RepeatLimit::default();
        let site = || tracing::callsite::Identifier(&SITE);
        let t0 = std::time::Instant::now();
        let later = |s| t0 + std::time::Duration::from_secs(s);
        let down = "Global error: AllBrokersDown (Local: All broker connections are down): 1/1";
        assert!(limit.admit(site(), down, t0));
        assert!(!limit.admit(site(), &down.replace("1/1", "0/1"), later(1)));
        assert!(limit.admit(site(), "Global error: Authentication failed", later(1)));
        assert!(limit.admit(site(), down, later(61)));
    }

    #[test]
    fn phones_are_masked() {
        assert_eq!(mask_phone("+15551234567"), "+15*******67");
        assert_eq!(mask_phone("12"), "***");
    }

    #[test]
    fn metrics_render_with_conventional_names() {
        let m = Metrics::global();
        m.dead_letters
            .with_label_values(&["route", "malformed_avro"])
            .inc();
        let text = m.render();
        assert!(
            text.contains("gridtalk_dead_letters_total{reason=\"malformed_avro\",stage=\"route\"}")
        );
    }
}
