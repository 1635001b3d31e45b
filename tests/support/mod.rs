//! Test harness shared by the end-to-end tests: one real Kafka-compatible broker (tansu, embedded,
//! on its own thread) for the whole test binary, and per test a fresh namespace of topics and
//! consumer groups, a WhatsApp sandbox, a directory file and a running pipeline.
//!
//! Waiting is always for a condition (a message count, a committed offset) with a deadline, never
//! a fixed sleep.

#![allow(dead_code)]

pub mod browser;
pub mod hostile;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::message::{Headers, Message, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::Value as Json;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use gridtalk::{run_stages, Stage};
use gridtalk_config::Config;
use gridtalk_contract::samples::sample_event;
use gridtalk_contract::{encode_single_object, json_to_avro, ContractSchemas};
use gridtalk_kafka::TopicSpec;
use gridtalk_sandbox::{Sandbox, SandboxConfig};
use gridtalk_telemetry::Readiness;

/// 2026-11-24T10:00:00Z: events occur at a fixed instant so rendered dates are known.
pub const NOW_MS: i64 = 1_795_514_400_000;
pub const PHONE_NUMBER_ID: &str = "106540352242922";
pub const TOKEN: &str = "test-token";
/// The webhook verify token and the app secret (the sandbox signs with its default secret).
pub const VERIFY_TOKEN: &str = "test-verify-token";
pub const APP_SECRET: &str = "sandbox-app-secret";
/// Signs the button tokens of the test pipelines.
pub const BUTTON_SECRET: &str = "test-button-secret-0123456789";
pub const INPUTS: [&str; 6] = [
    "tg.documents.v1",
    "tg.exceptions.v1",
    "tg.onboarding.v1",
    "wf.approvals.v1",
    "wf.cases.v1",
    "ops.summaries.v1",
];

/// The directory most tests use: partner ACME with a contact per role, GLOBEX's German billing
/// desk, and the company's own people.
pub const DIRECTORY: &str = r#"
[[partners]]
id = "ACME"
name = "ACME Industrial Supply"
[[partners]]
id = "GLOBEX"
name = "Globex Logistik GmbH"
[[partners]]
id = "BARE"
name = "Partner without contacts"
[[partners]]
id = "BADPHONE"
name = "Partner with a broken phone number"

[[contacts]]
id = "acme-order-desk"
name = "Order desk ACME"
phone = "+15550100001"
language = "en_US"
opted_in = true
partner = "ACME"
roles = ["order_desk"]
[[contacts]]
id = "acme-billing"
name = "Billing ACME"
phone = "+15550100002"
language = "en_US"
opted_in = true
partner = "ACME"
roles = ["billing"]
[[contacts]]
id = "acme-dispatch"
name = "Dispatch ACME"
phone = "+15550100003"
opted_in = true
partner = "ACME"
roles = ["dispatch"]
[[contacts]]
id = "acme-onboarding"
name = "Onboarding ACME"
phone = "+15550100004"
opted_in = true
partner = "ACME"
roles = ["onboarding"]
[[contacts]]
id = "acme-support"
name = "Support ACME"
phone = "+15550100005"
opted_in = true
partner = "ACME"
roles = ["support"]
[[contacts]]
id = "acme-not-opted-in"
name = "Order desk ACME (no consent)"
phone = "+15550100009"
opted_in = false
partner = "ACME"
roles = ["order_desk"]
[[contacts]]
id = "globex-billing"
name = "Billing Globex"
phone = "+49151100007"
language = "de_DE"
opted_in = true
partner = "GLOBEX"
roles = ["billing"]
[[contacts]]
id = "badphone-order-desk"
name = "Order desk with a broken number"
phone = "+1 555"
opted_in = true
partner = "BADPHONE"
roles = ["order_desk"]
[[contacts]]
id = "buyer-maria"
name = "Maria Keller"
phone = "+14155550101"
opted_in = true
roles = ["procurement", "approver"]
[[contacts]]
id = "ap-sam"
name = "Sam Ortiz"
phone = "+14155550102"
opted_in = true
roles = ["accounts_payable"]
[[contacts]]
id = "logistics-li"
name = "Li Wei"
phone = "+14155550103"
opted_in = true
roles = ["logistics"]
[[contacts]]
id = "warehouse-jo"
name = "Jo Brandt"
phone = "+14155550104"
opted_in = true
roles = ["warehouse"]
[[contacts]]
id = "edi-priya"
name = "Priya Nair"
phone = "+14155550105"
opted_in = true
roles = ["edi_support"]
[[contacts]]
id = "ops-tom"
name = "Tom Haas"
phone = "+14155550106"
opted_in = true
roles = ["operations"]
"#;

/// The shared broker's bootstrap address; started on first use.
pub fn broker() -> &'static str {
    static BROKER: OnceLock<String> = OnceLock::new();
    BROKER.get_or_init(|| {
        // `GRIDTALK_TEST_LOG=tansu_broker=info` shows the broker's group decisions when a test
        // needs explaining; silent otherwise.
        if let Ok(filter) = std::env::var("GRIDTALK_TEST_LOG") {
            std::env::set_var("RUST_LOG", filter);
            gridtalk_telemetry::init_logging("text");
        }
        std::thread::spawn(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let port = gridtalk_embedded::free_port().expect("free port");
            runtime
                .block_on(gridtalk_embedded::start_broker(port))
                .expect("embedded broker starts")
        })
        .join()
        .expect("broker start thread")
    })
}

/// Starts `gridtalk broker` as a process of its own on `port`, keeping its data in
/// `dir/broker.db` (SQLite), and returns once it accepts connections. Killed and started again on
/// the same port and directory, it comes back with its topics, records, groups and offsets.
pub fn spawn_broker(dir: &std::path::Path, port: u16) -> std::process::Child {
    spawn_broker_with(dir, port, &["--storage", "sqlite://broker.db"])
}

/// Starts `gridtalk broker --port port` with further `args` (e.g. `--sasl`) in `dir`, logging
/// to `dir/broker.log`, and returns once it accepts connections.
pub fn spawn_broker_with(dir: &std::path::Path, port: u16, args: &[&str]) -> std::process::Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("broker.log"))
        .expect("broker log");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_gridtalk"))
        .args(["broker", "--port", &port.to_string()])
        .args(args)
        .current_dir(dir)
        .env("RUST_LOG", "warn")
        .stdout(log.try_clone().expect("broker log"))
        .stderr(log)
        .spawn()
        .expect("broker starts");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "broker on port {port} did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

/// A name unique to this test run.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{}-{}-{}",
        std::process::id(),
        chrono::Utc::now().timestamp_millis() % 1_000_000,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// How one test wants its pipeline.
pub struct Setup {
    pub directory: String,
    pub sandbox: SandboxConfig,
    /// Configuration overrides as environment variables would give them, without the `GRIDTALK__`
    /// prefix: `("SEND__PAIR_BURST", "2")`.
    pub overrides: Vec<(&'static str, String)>,
    /// Partitions of each input topic.
    pub input_partitions: i32,
    /// Serve these writer schemas (id, schema JSON) as a Confluent schema registry.
    pub registry: Vec<(u32, String)>,
    /// Schema references of registry ids: (id, Confluent `references` array).
    pub registry_references: Vec<(u32, Json)>,
    /// Schemas registered under subjects, for references: (subject, version, schema JSON).
    pub registry_subjects: Vec<(String, u32, String)>,
    /// Serve a schema registry even when [`Setup::registry`] is empty (gridtalk registers the
    /// schemas it publishes there).
    pub serve_registry: bool,
    /// Subjects (any whose name contains one of these, as topic names are made per test) that
    /// hold an earlier schema gridtalk's is incompatible with.
    pub registry_incompatible: Vec<String>,
    /// Write the access token to a file the test can rewrite, instead of the configuration.
    pub token_file: bool,
    /// Also run the way back (ingest and converse), with the sandbox posting its webhooks to it.
    pub ingest: bool,
    /// Run the stages in this process (false: the test runs `gridtalk` processes itself, see
    /// [`Pipeline::spawn_gridtalk`]).
    pub in_process: bool,
    /// Bootstrap address of a broker of the test's own (see [`spawn_broker`]) instead of the
    /// shared one. The free helpers (`end_offsets`, `committed_offsets`, …) use the shared one.
    pub broker: Option<String>,
    /// With `in_process`, run only these stages here (e.g. ingest, while the test runs the
    /// others as `gridtalk` processes).
    pub only_stages: Option<Vec<Stage>>,
}

impl Default for Setup {
    fn default() -> Self {
        let config = Config::load(
            None,
            [("GRIDTALK__SEND__ACCESS_TOKEN".to_string(), "x".to_string())],
        )
        .expect("defaults");
        Setup {
            directory: DIRECTORY.to_string(),
            sandbox: SandboxConfig {
                phone_number_ids: vec![PHONE_NUMBER_ID.into()],
                valid_tokens: vec![TOKEN.into()],
                templates: gridtalk_sandbox::templates_from_config(&config.templates),
                business_name: "Northwind Retail".into(),
                people: gridtalk_sandbox::people_from_directory(DIRECTORY, "Northwind Retail")
                    .expect("the test directory"),
                ..SandboxConfig::default()
            },
            overrides: Vec::new(),
            input_partitions: 2,
            registry: Vec::new(),
            registry_references: Vec::new(),
            registry_subjects: Vec::new(),
            serve_registry: false,
            registry_incompatible: Vec::new(),
            token_file: false,
            ingest: false,
            in_process: true,
            broker: None,
            only_stages: None,
        }
    }
}

/// One test's running pipeline and the handles to look at it.
pub struct Pipeline {
    pub config: Arc<Config>,
    pub sandbox: Sandbox,
    pub dir: PathBuf,
    pub namespace: String,
    pub producer: FutureProducer,
    pub registry_requests: Arc<Mutex<u64>>,
    /// Readiness of the current run of the stages.
    pub readiness: Readiness,
    /// The ingest stage's webhook endpoint (served only with `Setup::ingest`).
    pub webhook_url: String,
    stage_list: Vec<Stage>,
    /// The configuration overrides, for `gridtalk` processes.
    overrides: Vec<(&'static str, String)>,
    /// Stops the sandbox and the registry (at drop).
    services: CancellationToken,
    /// Stops the current run of the stages.
    stages_token: CancellationToken,
    stages: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Pipeline {
    pub async fn start(setup: Setup) -> Pipeline {
        // Logs only on request (RUST_LOG=info cargo test … -- --nocapture): the stages log to stdout.
        static LOGGING: std::sync::Once = std::sync::Once::new();
        if std::env::var_os("RUST_LOG").is_some() {
            LOGGING.call_once(|| gridtalk_telemetry::init_logging("text"));
        }
        let namespace = unique("t");
        let dir = std::env::temp_dir().join(format!("gridtalk-{namespace}"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let services = CancellationToken::new();

        let sandbox = Sandbox::start(setup.sandbox, ([127, 0, 0, 1], 0).into(), services.clone())
            .await
            .expect("sandbox starts");
        let registry_requests = Arc::new(Mutex::new(0));
        let registry_url = if setup.registry.is_empty() && !setup.serve_registry {
            None
        } else {
            Some(
                serve_registry(
                    Registered {
                        by_id: setup.registry.into_iter().collect(),
                        references: setup.registry_references.into_iter().collect(),
                        subjects: setup
                            .registry_subjects
                            .into_iter()
                            .map(|(subject, version, schema)| ((subject, version), schema))
                            .collect(),
                        registered: HashMap::new(),
                        incompatible: setup.registry_incompatible,
                    },
                    registry_requests.clone(),
                    services.clone(),
                )
                .await,
            )
        };

        std::fs::write(dir.join("directory.toml"), &setup.directory).expect("directory file");
        let ingest_port = gridtalk_embedded::free_port().expect("ingest port");
        let webhook_url = format!("http://127.0.0.1:{ingest_port}/webhook");
        if setup.ingest {
            sandbox.set_webhook_url(Some(webhook_url.clone()));
        }
        let stages = if let Some(only) = setup.only_stages.clone() {
            only
        } else if setup.ingest {
            vec![Stage::Route, Stage::Send, Stage::Ingest, Stage::Converse]
        } else {
            vec![Stage::Route, Stage::Send]
        };
        let token_line = if setup.token_file {
            std::fs::write(dir.join("token"), TOKEN).expect("token file");
            format!(
                "access_token_file = {:?}",
                dir.join("token").display().to_string()
            )
        } else {
            format!("access_token = {TOKEN:?}")
        };
        let inputs: Vec<String> = INPUTS.iter().map(|t| format!("{namespace}.{t}")).collect();
        let bootstrap = setup.broker.clone().unwrap_or_else(|| broker().to_string());
        let toml = format!(
            r#"
[kafka]
bootstrap_servers = "{bootstrap}"
group_prefix = "{namespace}"
session_timeout_ms = 6000
heartbeat_interval_ms = 1000

[kafka.producer]
# The embedded broker answers a fetch from an offset inside a record batch with the next batch,
# skipping the rest of the one it asked for; one record per batch keeps every offset a batch start.
"batch.num.messages" = "1"

[topics]
inputs = {inputs:?}
outbox = "{namespace}.outbox"
sent = "{namespace}.sent"
dlq = "{namespace}.dlq"
dlq_replays = "{namespace}.dlq-replays"
directory = "{namespace}.directory"
webhook = "{namespace}.webhook"
responses = "{namespace}.responses"
audit = "{namespace}.audit"
send_index = "{namespace}.send-index"
converse_state = "{namespace}.converse-state"
decisions = "{namespace}.decisions"
dedupe_changelog_prefix = "{namespace}.dedupe."
partitions = 2

[contract]
{registry}

[send]
api_base_url = "{api}"
phone_number_id = "{PHONE_NUMBER_ID}"
{token_line}
retry_initial_backoff_ms = 50
retry_max_backoff_ms = 500
halt_probe_interval_ms = 300

[send.coalesce]
# The tests count every message at the sandbox; the coalescing tests turn it on.
window_ms = 0

[directory]
file = {directory:?}

[route]
button_secret = "{BUTTON_SECRET}"
# The sample events occur at the fixed NOW_MS (stable rendered dates), which the real clock
# leaves behind; tests of the age check set it themselves.
max_event_age_secs = 0

[admin]
log_format = "text"

[ingest]
listen = "127.0.0.1:{ingest_port}"
verify_token = "{VERIFY_TOKEN}"
app_secret = "{APP_SECRET}"
max_body_bytes = 65536
"#,
            bootstrap = bootstrap,
            ingest_port = ingest_port,
            registry = registry_url
                .map(|u| format!("schema_registry_url = {u:?}"))
                .unwrap_or_default(),
            api = sandbox.base_url(),
            directory = dir.join("directory.toml").display().to_string(),
        );
        std::fs::write(dir.join("gridtalk.toml"), &toml).expect("config file");
        let config = Config::load(
            Some(&dir.join("gridtalk.toml")),
            setup
                .overrides
                .iter()
                .map(|(k, v)| (format!("GRIDTALK__{k}"), v.clone())),
        )
        .unwrap_or_else(|e| panic!("test configuration: {e}\n{toml}"));
        let config = Arc::new(config);

        let specs: Vec<TopicSpec> = config
            .topics
            .inputs
            .iter()
            .map(|t| TopicSpec {
                name: t.clone(),
                partitions: setup.input_partitions,
                configs: vec![],
            })
            .collect();
        gridtalk_kafka::ensure_topics(&config.kafka, &specs)
            .await
            .expect("input topics");
        gridtalk_kafka::ensure_topics(&config.kafka, &gridtalk::internal_topics(&config))
            .await
            .expect("internal topics");

        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("enable.idempotence", "true")
            .set("batch.num.messages", "1")
            .create()
            .expect("producer");
        let mut pipeline = Pipeline {
            config,
            sandbox,
            dir,
            namespace,
            producer,
            registry_requests,
            readiness: Readiness::default(),
            webhook_url,
            stage_list: stages,
            overrides: setup.overrides.clone(),
            services,
            stages_token: CancellationToken::new(),
            stages: None,
        };
        if setup.in_process {
            pipeline.start_stages();
        }
        pipeline
    }

    /// Starts `gridtalk run` as its own process with this pipeline's configuration, running
    /// `stages` (e.g. "route,send"); its log goes to `<dir>/<name>.log`.
    pub fn spawn_gridtalk(&self, name: &str, stages: &str) -> std::process::Child {
        self.spawn_gridtalk_with(name, stages, &[])
    }

    /// [`Pipeline::spawn_gridtalk`] with extra environment variables (test hooks).
    pub fn spawn_gridtalk_with(
        &self,
        name: &str,
        stages: &str,
        env: &[(&str, String)],
    ) -> std::process::Child {
        let log = std::fs::File::create(self.dir.join(format!("{name}.log"))).expect("log file");
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_gridtalk"));
        command
            .args(["run", "--config"])
            .arg(self.config_file())
            .args(["--stages", stages])
            .env("GRIDTALK__ADMIN__LISTEN", "127.0.0.1:0")
            .env("GRIDTALK__ADMIN__LOG_FORMAT", "text")
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().expect("log file"))
            .stderr(log);
        for (key, value) in &self.overrides {
            command.env(format!("GRIDTALK__{key}"), value);
        }
        for (key, value) in env {
            command.env(key, value);
        }
        command.spawn().expect("gridtalk starts")
    }

    /// The log of the process started as `name`.
    pub fn process_log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// (Re)starts the route and send stages.
    pub fn start_stages(&mut self) {
        assert!(self.stages.is_none(), "stages already running");
        self.stages_token = CancellationToken::new();
        self.readiness = Readiness::default();
        let (config, readiness, token) = (
            self.config.clone(),
            self.readiness.clone(),
            self.stages_token.clone(),
        );
        let stages = self.stage_list.clone();
        self.stages = Some(tokio::spawn(async move {
            run_stages(config, &stages, readiness, token).await
        }));
    }

    /// The configuration file the pipeline runs with (for the CLI).
    pub fn config_file(&self) -> PathBuf {
        self.dir.join("gridtalk.toml")
    }

    /// The full name of input topic `short` (one of [`INPUTS`]).
    pub fn input(&self, short: &str) -> String {
        format!("{}.{short}", self.namespace)
    }

    pub fn route_group(&self) -> String {
        format!("{}-route", self.config.kafka.group_prefix)
    }

    pub fn send_group(&self) -> String {
        format!("{}-send", self.config.kafka.group_prefix)
    }

    /// Publishes raw bytes to input topic `short`, keyed by `key`; returns (partition, offset).
    pub async fn publish_raw(&self, short: &str, key: &str, bytes: &[u8]) -> (i32, i64) {
        let topic = self.input(short);
        self.producer
            .send(
                FutureRecord::to(&topic).key(key).payload(bytes),
                Duration::from_secs(30),
            )
            .await
            .map(|delivery| (delivery.partition, delivery.offset))
            .map_err(|(e, _)| e)
            .expect("publish")
    }

    /// Publishes an event (JSON view of the contract) in single-object encoding on its topic.
    pub async fn publish_event(&self, event: &Json) -> (i32, i64) {
        let event_type = event["event_type"].as_str().expect("event_type");
        let key = event["correlation_id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        self.publish_raw(topic_short(event_type), &key, &single_object(event))
            .await
    }

    /// Waits until `done` holds, failing the test with `what` after `deadline`.
    pub async fn wait_until(
        &self,
        what: &str,
        deadline: Duration,
        mut done: impl FnMut(&Pipeline) -> bool,
    ) {
        let started = Instant::now();
        while !done(self) {
            if started.elapsed() > deadline {
                panic!(
                    "timed out after {deadline:?} waiting for {what}; sandbox stats {:?}; dead letters {:?}",
                    self.sandbox.stats(),
                    self.dead_letters().iter().map(|d| d.reason.clone()).collect::<Vec<_>>()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the sandbox accepted at least `n` messages.
    pub async fn wait_for_messages(&self, n: usize, deadline: Duration) {
        self.wait_until(&format!("{n} messages at the sandbox"), deadline, |p| {
            p.sandbox.messages().len() >= n
        })
        .await;
    }

    /// Waits until `group` has committed every record of `topic` as of now (all partitions).
    pub async fn wait_for_commits(&self, group: &str, topic: &str, deadline: Duration) {
        let ends = end_offsets(topic);
        self.wait_until(
            &format!("group {group} to commit {topic} up to {ends:?}"),
            deadline,
            |_| {
                let committed = committed_offsets(group, topic);
                ends.iter()
                    .all(|(p, end)| *end == 0 || committed.get(p).copied().unwrap_or(-1) >= *end)
            },
        )
        .await;
    }

    /// Every record of the dead-letter topic so far.
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        read_topic(&self.config.topics.dlq)
            .into_iter()
            .map(DeadLetter::from)
            .collect()
    }

    /// Every record on the response topic so far, decoded.
    pub fn responses(&self) -> Vec<gridtalk_contract::WorkflowResponse> {
        let schema = &gridtalk_contract::ContractSchemas::get().workflow_response;
        read_topic(&self.config.topics.responses)
            .iter()
            .map(|m| {
                let bytes = as_single_object(m.payload().unwrap_or_default(), schema);
                gridtalk_contract::WorkflowResponse::from_avro(&bytes)
                    .expect("responses are WorkflowResponse records")
            })
            .collect()
    }

    /// The wamids on the sent log so far: every message WhatsApp accepted and gridtalk recorded.
    pub fn logged_wamids(&self) -> Vec<String> {
        use gridtalk_contract::AvroRecord;
        read_topic(&self.config.topics.sent)
            .iter()
            .map(|m| {
                gridtalk_contract::SentMessage::from_avro(m.payload().unwrap_or_default())
                    .expect("the sent log holds SentMessage records")
                    .wamid
            })
            .collect()
    }

    /// Every record on the audit topic so far, decoded.
    pub fn audits(&self) -> Vec<gridtalk_contract::AuditRecord> {
        use gridtalk_contract::AvroRecord;
        read_topic(&self.config.topics.audit)
            .iter()
            .map(|m| {
                let bytes = as_single_object(
                    m.payload().unwrap_or_default(),
                    &gridtalk_contract::ContractSchemas::get().audit_record,
                );
                gridtalk_contract::AuditRecord::from_avro(&bytes)
                    .expect("audits are AuditRecord records")
            })
            .collect()
    }

    /// Posts a webhook whose `X-Hub-Signature-256` does not verify (as anyone but Meta would);
    /// returns the HTTP status.
    pub async fn post_badly_signed_webhook(&self) -> u16 {
        reqwest::Client::new()
            .post(&self.webhook_url)
            .header("X-Hub-Signature-256", "sha256=00ff")
            .body(
                serde_json::json!({"object": "whatsapp_business_account", "entry": []}).to_string(),
            )
            .send()
            .await
            .expect("answers")
            .status()
            .as_u16()
    }

    /// Posts a WhatsApp webhook carrying `value` (one `messages` change) to the ingest stage,
    /// signed with the app secret as Meta signs; returns the HTTP status.
    pub async fn post_webhook(&self, value: &Json) -> u16 {
        let body = serde_json::json!({
            "object": "whatsapp_business_account",
            "entry": [{"id": "WABA", "changes": [{"field": "messages", "value": value}]}]
        })
        .to_string();
        reqwest::Client::new()
            .post(&self.webhook_url)
            .header("content-type", "application/json")
            .header(
                "X-Hub-Signature-256",
                gridtalk_sandbox::signature(APP_SECRET, body.as_bytes()),
            )
            .body(body)
            .send()
            .await
            .expect("webhook endpoint answers")
            .status()
            .as_u16()
    }

    /// Waits until the way back is serving: the ingest endpoint accepts connections and every
    /// stage reports ready.
    pub async fn wait_for_way_back(&self, deadline: Duration) {
        self.wait_until(
            "the ingest and converse stages to be ready",
            deadline,
            |p| {
                p.readiness.pending().is_empty()
                    && std::net::TcpStream::connect(
                        p.webhook_url
                            .trim_start_matches("http://")
                            .trim_end_matches("/webhook"),
                    )
                    .is_ok()
            },
        )
        .await;
    }

    /// Stops the stages (draining in-flight work) and returns their result.
    pub async fn stop_stages(&mut self) -> anyhow::Result<()> {
        let handle = self.stages.take().expect("stages running");
        self.stages_token.cancel();
        handle.await.expect("stages task")
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.stages_token.cancel();
        self.services.cancel();
        if std::thread::panicking() {
            // Kept for the post-mortem: configuration, directory and process logs.
            eprintln!("test files kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A dead letter with its headers.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub reason: String,
    pub headers: BTreeMap<String, String>,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
}

impl From<OwnedMessage> for DeadLetter {
    fn from(m: OwnedMessage) -> Self {
        let mut headers = BTreeMap::new();
        if let Some(hs) = m.headers() {
            for h in hs.iter() {
                headers.insert(
                    h.key.to_string(),
                    h.value
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                        .unwrap_or_default(),
                );
            }
        }
        DeadLetter {
            reason: headers
                .get("gridtalk.dlq.reason")
                .cloned()
                .unwrap_or_default(),
            headers,
            key: m.key().map(<[u8]>::to_vec),
            value: m.payload().map(<[u8]>::to_vec),
        }
    }
}

/// The input topic (short name) an event type is published on.
pub fn topic_short(event_type: &str) -> &'static str {
    gridtalk_embedded::topic_for(event_type)
}

/// A sample event of `event_type` from `partner` at [`NOW_MS`].
pub fn event(event_type: &str, seq: u64, partner: &str) -> Json {
    sample_event(event_type, seq, partner, NOW_MS).expect("known event type")
}

/// `event` in Avro single-object encoding with the contract's schema.
pub fn single_object(event: &Json) -> Vec<u8> {
    let schema = &ContractSchemas::get().trading_grid_event;
    encode_single_object(
        schema,
        json_to_avro(event, schema).expect("event matches the contract"),
    )
    .expect("encode")
}

/// The end offset of every partition of `topic` (exact, read from fetched data).
pub fn end_offsets(topic: &str) -> HashMap<i32, i64> {
    gridtalk_kafka::end_offsets(&kafka_config(), topic).expect("end offsets")
}

fn kafka_config() -> gridtalk_config::KafkaConfig {
    let mut config = Config::load(
        None,
        [("GRIDTALK__SEND__ACCESS_TOKEN".to_string(), "x".to_string())],
    )
    .expect("defaults")
    .kafka;
    config.bootstrap_servers = broker().to_string();
    config
}

/// Offsets `group` has committed on `topic` (partitions without a commit are absent; a failed
/// query reads as nothing committed, so waiting loops simply ask again).
pub fn committed_offsets(group: &str, topic: &str) -> HashMap<i32, i64> {
    gridtalk_kafka::committed_offsets(&kafka_config(), group, topic).unwrap_or_default()
}

/// Moves `group`'s committed offsets on `topic` back to the start of every partition, as if
/// nothing had been committed (the group must have no running member).
pub fn rewind_group(group: &str, topic: &str) {
    let consumer: rdkafka::consumer::BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker())
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in end_offsets(topic).keys() {
        tpl.add_partition_offset(topic, *p, Offset::Offset(0))
            .expect("partition");
    }
    consumer
        .commit(&tpl, rdkafka::consumer::CommitMode::Sync)
        .expect("offsets rewound");
}

/// Every record of `topic` up to its end as of the call, partition by partition.
pub fn read_topic(topic: &str) -> Vec<OwnedMessage> {
    let ends = end_offsets(topic);
    let wanted: i64 = ends.values().sum();
    if wanted == 0 {
        return Vec::new();
    }
    let consumer = gridtalk_kafka::tail_consumer(&kafka_config()).expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for (p, end) in &ends {
        if *end > 0 {
            tpl.add_partition_offset(topic, *p, Offset::Beginning)
                .expect("partition");
        }
    }
    consumer.assign(&tpl).expect("assign");
    let mut records = Vec::new();
    let started = Instant::now();
    while (records.len() as i64) < wanted {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "could not read {topic} to {ends:?}"
        );
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            if m.offset() < ends[&m.partition()] {
                records.push(m.detach());
            }
        }
    }
    records
}

/// A record gridtalk published, as single-object bytes: a Confluent-framed record (written with
/// the schema gridtalk registered, which is `schema` in this build) gets the single-object header
/// in place of its schema id. The third-party test reads the Confluent framing as it is.
fn as_single_object(bytes: &[u8], schema: &apache_avro::Schema) -> Vec<u8> {
    match bytes {
        [0, _, _, _, _, body @ ..] => {
            let mut framed = vec![0xC3, 0x01];
            framed.extend_from_slice(
                &gridtalk_contract::single_object_fingerprint(schema).to_le_bytes(),
            );
            framed.extend_from_slice(body);
            framed
        }
        _ => bytes.to_vec(),
    }
}

/// Serves `schemas` as a Confluent schema registry (`GET /schemas/ids/{id}`) and returns its URL.
/// Registered in [`Setup::registry`] in place of a schema, the id is answered with 503.
pub const UNAVAILABLE_SCHEMA: &str = "!unavailable";

/// The schema an incompatible subject ([`Setup::registry_incompatible`]) already holds.
const EARLIER_SCHEMA: &str =
    r#"{"type":"record","name":"Earlier","fields":[{"name":"id","type":"long"}]}"#;

/// What the test registry serves.
struct Registered {
    by_id: HashMap<u32, String>,
    references: HashMap<u32, Json>,
    subjects: HashMap<(String, u32), String>,
    /// What was registered (POST), by subject: (id, schema) per version.
    registered: HashMap<String, Vec<(u32, String)>>,
    /// Subjects holding [`EARLIER_SCHEMA`], which nothing is compatible with: any whose name
    /// contains one of these.
    incompatible: Vec<String>,
}

impl Registered {
    fn is_incompatible(&self, subject: &str) -> bool {
        self.incompatible
            .iter()
            .any(|part| subject.contains(part.as_str()))
    }
}

async fn serve_registry(
    registered: Registered,
    requests: Arc<Mutex<u64>>,
    shutdown: CancellationToken,
) -> String {
    use axum::extract::{Path, State};
    use axum::http::StatusCode;
    use axum::routing::{get, post};
    use axum::Json as AxumJson;

    /// The registry's state and the count of schema reads (GETs; registration is not counted).
    type Shared = (Arc<Mutex<Registered>>, Arc<Mutex<u64>>);
    type Answer = Result<AxumJson<Json>, (StatusCode, AxumJson<Json>)>;
    fn error(status: StatusCode, code: u32, message: String) -> (StatusCode, AxumJson<Json>) {
        (
            status,
            AxumJson(serde_json::json!({"error_code": code, "message": message})),
        )
    }
    fn not_found(code: u32, message: String) -> (StatusCode, AxumJson<Json>) {
        error(StatusCode::NOT_FOUND, code, message)
    }
    /// The schema of a POST body, compared as JSON (as the registry compares canonical forms).
    fn posted_schema(body: &Json) -> Result<(String, Json), (StatusCode, AxumJson<Json>)> {
        let text = body["schema"].as_str().unwrap_or_default().to_string();
        let parsed = serde_json::from_str(&text).map_err(|e| {
            error(
                StatusCode::UNPROCESSABLE_ENTITY,
                42201,
                format!("Invalid schema: {e}"),
            )
        })?;
        Ok((text, parsed))
    }
    fn same_schema(a: &str, b: &Json) -> bool {
        serde_json::from_str::<Json>(a).ok().as_ref() == Some(b)
    }
    async fn schema_by_id(
        State((registered, requests)): State<Shared>,
        Path(id): Path<u32>,
    ) -> Answer {
        *requests.lock().expect("counter") += 1;
        let registered = registered.lock().expect("registry");
        match registered.by_id.get(&id) {
            // A registry that cannot serve this id: what a registry behind a failing backend
            // answers (Confluent's 50003 "error in the backend data store").
            Some(schema) if schema == UNAVAILABLE_SCHEMA => Err(error(
                StatusCode::SERVICE_UNAVAILABLE,
                50003,
                "Error in the backend data store".into(),
            )),
            Some(schema) => {
                let mut body = serde_json::json!({ "schema": schema });
                if let Some(references) = registered.references.get(&id) {
                    body["references"] = references.clone();
                }
                Ok(AxumJson(body))
            }
            None => Err(not_found(40403, format!("Schema {id} not found"))),
        }
    }
    async fn subject_version(
        State((registered, requests)): State<Shared>,
        Path((subject, version)): Path<(String, u32)>,
    ) -> Answer {
        *requests.lock().expect("counter") += 1;
        let registered = registered.lock().expect("registry");
        match registered.subjects.get(&(subject.clone(), version)) {
            Some(schema) => Ok(AxumJson(serde_json::json!({
                "subject": subject, "version": version, "id": 1000 + version, "schema": schema
            }))),
            None => Err(not_found(40401, format!("Subject '{subject}' not found."))),
        }
    }
    async fn compatibility(
        State((registered, _)): State<Shared>,
        Path(subject): Path<String>,
        AxumJson(body): AxumJson<Json>,
    ) -> Answer {
        posted_schema(&body)?;
        let registered = registered.lock().expect("registry");
        if registered.is_incompatible(&subject) {
            return Ok(AxumJson(serde_json::json!({
                "is_compatible": false,
                "messages": ["{errorType:'NAME_MISMATCH', description:'The type (path '/') has a name mismatch between the new schema and the old one', additionalInfo:'expected: Earlier'}"]
            })));
        }
        if !registered.registered.contains_key(&subject) {
            return Err(not_found(40401, format!("Subject '{subject}' not found.")));
        }
        Ok(AxumJson(serde_json::json!({"is_compatible": true})))
    }
    async fn register(
        State((registered, _)): State<Shared>,
        Path(subject): Path<String>,
        AxumJson(body): AxumJson<Json>,
    ) -> Answer {
        let (text, parsed) = posted_schema(&body)?;
        let mut registered = registered.lock().expect("registry");
        if let Some((id, _)) = registered
            .registered
            .get(&subject)
            .and_then(|versions| versions.iter().find(|(_, s)| same_schema(s, &parsed)))
        {
            return Ok(AxumJson(serde_json::json!({ "id": id })));
        }
        if registered.is_incompatible(&subject) {
            return Err(error(
                StatusCode::CONFLICT,
                409,
                format!("Schema being registered is incompatible with an earlier schema for subject \"{subject}\""),
            ));
        }
        // As Confluent: a schema already known under another subject keeps its id.
        let id = registered
            .by_id
            .iter()
            .find(|(_, s)| same_schema(s, &parsed))
            .map(|(id, _)| *id)
            .unwrap_or_else(|| {
                registered
                    .by_id
                    .keys()
                    .max()
                    .copied()
                    .unwrap_or(0)
                    .max(10_000)
                    + 1
            });
        registered.by_id.insert(id, text.clone());
        registered
            .registered
            .entry(subject)
            .or_default()
            .push((id, text));
        Ok(AxumJson(serde_json::json!({ "id": id })))
    }
    async fn lookup(
        State((registered, _)): State<Shared>,
        Path(subject): Path<String>,
        AxumJson(body): AxumJson<Json>,
    ) -> Answer {
        let (text, parsed) = posted_schema(&body)?;
        let registered = registered.lock().expect("registry");
        let versions = registered
            .registered
            .get(&subject)
            .ok_or_else(|| not_found(40401, format!("Subject '{subject}' not found.")))?;
        let (version, (id, _)) = versions
            .iter()
            .enumerate()
            .find(|(_, (_, s))| same_schema(s, &parsed))
            .ok_or_else(|| not_found(40403, "Schema not found".into()))?;
        Ok(AxumJson(serde_json::json!({
            "subject": subject, "id": id, "version": version + 1, "schema": text
        })))
    }
    let state: Shared = (Arc::new(Mutex::new(registered)), requests);
    let app = axum::Router::new()
        .route("/schemas/ids/{id}", get(schema_by_id))
        .route(
            "/subjects/{subject}/versions/{version}",
            get(subject_version),
        )
        .route("/subjects/{subject}/versions", post(register))
        .route("/subjects/{subject}", post(lookup))
        .route(
            "/compatibility/subjects/{subject}/versions/latest",
            post(compatibility),
        )
        .with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("registry port");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
    });
    url
}

/// What the sandbox received, reduced to what a recipient sees: (to, template, language, parameters).
pub fn received(p: &Pipeline) -> Vec<(String, String, String, Vec<String>)> {
    p.sandbox
        .messages()
        .into_iter()
        .map(|m| {
            (
                m.to,
                m.template.unwrap_or_default(),
                m.language.unwrap_or_default(),
                m.parameters,
            )
        })
        .collect()
}

/// Waits for a `gridtalk` process to exit (and fails the test past `deadline`).
pub fn wait_for_exit(
    child: &mut std::process::Child,
    deadline: Duration,
) -> std::process::ExitStatus {
    let started = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("child status") {
            return status;
        }
        assert!(
            started.elapsed() < deadline,
            "gridtalk did not exit within {deadline:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGTERM, then the exit status (within 40 s).
pub fn terminate(child: &mut std::process::Child) -> std::process::ExitStatus {
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
    wait_for_exit(child, Duration::from_secs(40))
}

/// What a recipient sees of a message: (to, template, language, parameters).
pub type Seen = (String, String, String, Vec<String>);

/// What the recipient of outbox message `m` sees.
pub fn seen_of(m: &gridtalk_contract::OutboxMessage) -> Seen {
    let request: serde_json::Value = serde_json::from_str(&m.request_json).unwrap();
    let params = request["template"]["components"][0]["parameters"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .map(|p| p["text"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default();
    (
        m.recipient.clone(),
        m.template_name.clone().unwrap_or_default(),
        m.language.clone(),
        params,
    )
}

/// The messages `events` must cause, as a multiset, planned with the pipeline's own rules.
pub fn expected_messages(p: &Pipeline, events: &[serde_json::Value]) -> HashMap<Seen, usize> {
    let directory =
        gridtalk_route::Directory::load(&p.dir.join("directory.toml")).expect("directory");
    let schema = &gridtalk_contract::ContractSchemas::get().trading_grid_event;
    let mut expected = HashMap::new();
    for event in events {
        let value = gridtalk_contract::json_to_avro(event, schema).expect("sample fits");
        let view = gridtalk_contract::EventView::from_resolved(&value, schema);
        let Ok(plan) = gridtalk_route::plan(
            &view,
            &p.config,
            &directory,
            Some(BUTTON_SECRET.as_bytes()),
            NOW_MS,
        ) else {
            continue;
        };
        for m in plan.messages {
            *expected.entry(seen_of(&m)).or_default() += 1;
        }
    }
    expected
}

/// (missing, duplicated) of what the sandbox received against `expected`.
pub fn compare(p: &Pipeline, expected: &HashMap<Seen, usize>) -> (usize, usize) {
    let mut got: HashMap<Seen, usize> = HashMap::new();
    for m in received(p) {
        *got.entry(m).or_default() += 1;
    }
    let missing = expected
        .iter()
        .map(|(k, n)| n.saturating_sub(got.get(k).copied().unwrap_or(0)))
        .sum();
    let duplicated = got
        .iter()
        .map(|(k, n)| n.saturating_sub(expected.get(k).copied().unwrap_or(0)))
        .sum();
    (missing, duplicated)
}

/// The value of one metric series (`name{labels}` exactly as Prometheus text prints it) on the
/// `/metrics` endpoint of the `gridtalk` process whose admin port is `port`; `None` while the
/// endpoint does not answer or the series does not exist yet.
pub async fn metric(port: u16, series: &str) -> Option<i64> {
    let body = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    body.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

/// Whether [`metric`] `series` of the process at admin port `port` reads `value` within
/// `deadline` (polled every 100 ms).
pub async fn metric_reaches(port: u16, series: &str, value: i64, deadline: Duration) -> bool {
    let until = Instant::now() + deadline;
    while metric(port, series).await != Some(value) {
        if Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    true
}

/// Fails when a line of `log` holds a wamid (Meta's carry the number, base64-encoded) or the
/// digits of one of `numbers` in clear.
pub fn assert_no_number_or_wamid_logged(log: &str, numbers: &std::collections::BTreeSet<String>) {
    assert!(!log.is_empty(), "an empty log proves nothing");
    for line in log.lines() {
        assert!(!line.contains("wamid."), "a wamid in clear: {line}");
        for number in numbers {
            let digits: String = number.chars().filter(char::is_ascii_digit).collect();
            assert!(!line.contains(&digits), "number {digits} in clear: {line}");
        }
    }
}

/// The first message the sandbox received with `template` for recipient `to`, waiting up to
/// `deadline` for it.
pub async fn message_to(
    p: &Pipeline,
    deadline: Duration,
    to: &str,
    template: &str,
) -> gridtalk_sandbox::ReceivedMessage {
    p.wait_until(&format!("{template} to {to}"), deadline, |p| {
        p.sandbox
            .messages()
            .iter()
            .any(|m| m.to == to && m.template.as_deref() == Some(template))
    })
    .await;
    p.sandbox
        .messages()
        .into_iter()
        .find(|m| m.to == to && m.template.as_deref() == Some(template))
        .expect("just seen")
}
