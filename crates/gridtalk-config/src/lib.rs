//! gridtalk's one typed configuration tree.
//!
//! Layers, later wins: the embedded defaults (`default.toml`, which also carry the routing rules
//! and templates of the eight flows), then the file given with `--config`, then environment
//! variables `GRIDTALK__SECTION__KEY=value` (values are read as TOML when they parse, else as
//! strings). Unknown keys are errors. [`Config::load`] reports every problem it finds at once, not
//! just the first. Secrets are [`Secret`]s: their `Debug` prints a mask, and they are never logged.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod layers;
mod secret;
pub use layers::{render, Source, Sources};
pub use secret::Secret;

/// The embedded defaults.
pub const DEFAULT_TOML: &str = include_str!("default.toml");

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub topics: TopicsConfig,
    pub contract: ContractConfig,
    pub route: RouteConfig,
    pub send: SendConfig,
    pub admin: AdminConfig,
    pub ingest: IngestConfig,
    pub converse: ConverseConfig,
    pub directory: DirectoryConfig,
    /// Routing rules: which events go to whom with which template. Evaluated in order; every
    /// matching rule produces messages (a recipient reached by two rules for one event gets one).
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
    /// Approved WhatsApp templates and how to fill them from an event.
    #[serde(default)]
    pub templates: Vec<TemplateConfig>,
    /// Reminder policies: which requests get a clock, when their reminders go out and to whom
    /// they escalate. Merged with the built-in ones by name.
    #[serde(default)]
    pub reminders: Vec<ReminderPolicyConfig>,
    /// Summaries gridtalk computes from the stream (flow h), each to an audience, daily at a
    /// local time and when a threshold is crossed. None by default.
    #[serde(default)]
    pub summaries: Vec<SummaryConfig>,
    /// The time the request clocks run on (tests and the demo run it faster).
    #[serde(default)]
    pub clock: ClockConfig,
    /// A layer's `rules` replace the built-in ones instead of merging with them by name.
    #[serde(default)]
    pub replace_builtin_rules: bool,
    /// A layer's `templates` replace the built-in ones instead of merging with them by name.
    #[serde(default)]
    pub replace_builtin_templates: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Comma-separated host:port list.
    pub bootstrap_servers: String,
    /// Consumer group ids are `<group_prefix>-route` and `<group_prefix>-send`.
    pub group_prefix: String,
    /// Replication factor for the topics gridtalk creates (1 for a single broker).
    pub replication_factor: i32,
    /// How long the group coordinator waits for a heartbeat before it expires a member.
    pub session_timeout_ms: u32,
    /// How often a consumer tells the group coordinator it is alive; well below the session
    /// timeout.
    pub heartbeat_interval_ms: u32,
    /// librdkafka leaves the group when the application has not polled for this long (the member
    /// is then considered stuck). At least the session timeout.
    pub max_poll_interval_ms: u32,
    /// On a rebalance, how long work already on its way for a revoked partition (a send on the
    /// wire, a produce awaiting its ack) may take to finish before the partition is committed and
    /// given up; what is not finished by then is left to the next owner. Below
    /// `max_poll_interval_ms`.
    pub revoke_drain_ms: u64,
    /// How long produce and commit calls may take before they count as failed.
    pub request_timeout_ms: u64,
    /// How long a produced record may take from being enqueued to its acknowledgement, time in
    /// the producer's queue included (librdkafka's `message.timeout.ms`), before the hand-off
    /// counts as failed and the stage stops for a restart. A burst queues many records at once,
    /// so this is longer than one request's timeout. At least `request_timeout_ms`.
    pub delivery_timeout_ms: u64,
    /// Extra librdkafka properties, e.g. `security.protocol = "SASL_SSL"`, `sasl.mechanism`,
    /// `sasl.username`, `sasl.password`, `ssl.ca.location`. Values of keys containing `password`
    /// or `secret` are masked wherever the config is printed.
    #[serde(default)]
    pub client: BTreeMap<String, Secret>,
    /// Extra librdkafka properties for producers only (e.g. `batch.num.messages`), applied after
    /// `client`.
    #[serde(default)]
    pub producer: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TopicsConfig {
    /// Topics carrying Trading Grid events (Avro). They must exist; gridtalk does not create them.
    pub inputs: Vec<String>,
    /// Rendered messages keyed by sending phone-number id.
    pub outbox: String,
    /// One record per message WhatsApp accepted, keyed by recipient contact.
    pub sent: String,
    /// Dead letters: original bytes and headers plus `gridtalk.dlq.*` reason headers.
    pub dlq: String,
    /// Compacted directory overrides: key `partner:<id>` or `contact:<id>`, JSON value, null deletes.
    pub directory: String,
    /// Verified webhook items (one message or status each), keyed by contact like the sent log.
    pub webhook: String,
    /// Typed replies, decisions and delivery statuses for workflow systems (Avro), keyed by
    /// correlation id.
    pub responses: String,
    /// Refused inbounds (bad signature, bad token, unauthorised contact, second decision), Avro.
    pub audit: String,
    /// The replay ledger (compacted, one partition): the dead letters `gridtalk dlq replay`
    /// re-published, so a replay never re-publishes a record twice.
    pub dlq_replays: String,
    /// Deciding taps (JSON), keyed by request: the one owner of a request's partition settles
    /// it, so the first decision wins across converse processes.
    pub decisions: String,
    /// The converse stage's state changelog (compacted, partitioned like the webhook topic):
    /// decisions, applied statuses and answered item ids, so a restart answers nothing twice.
    pub converse_state: String,
    /// Prefix of the route stage's dedupe changelogs: one compacted topic per input topic, named
    /// prefix + input topic, with the input's partition count.
    pub dedupe_changelog_prefix: String,
    /// The send stage's sent index (compacted changelog): message ids WhatsApp accepted, on the
    /// partition number of the outbox partition they came from.
    pub send_index: String,
    /// Partition count used when gridtalk creates its own topics.
    pub partitions: i32,
    /// Create the internal topics (outbox, sent, dlq, directory, webhook, responses, audit) at
    /// start-up if missing.
    pub create: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ContractConfig {
    /// Confluent Schema Registry base URL for records in the Confluent framing.
    pub schema_registry_url: Option<String>,
    pub schema_registry_username: Option<String>,
    pub schema_registry_password: Option<Secret>,
    /// How long an id the registry answered "not found" (or served as unusable Avro) is
    /// remembered, so that records carrying it are dead-lettered without asking again each time.
    pub schema_registry_negative_cache_secs: u64,
    /// Directory of extra `.avsc` writer schemas (older contract versions) for single-object records.
    pub extra_schema_dir: Option<PathBuf>,
    /// Records larger than this go to the dead-letter topic as `oversized`.
    pub max_event_bytes: usize,
    /// How the records gridtalk publishes for others (responses, audit) are framed: `auto`
    /// (the Confluent wire format when a registry is configured, else Avro single-object),
    /// `confluent` or `single_object`.
    pub publish_framing: String,
    /// Register the published schemas under their subjects at start-up (topic-name strategy,
    /// `<topic>-value`). Off where the registry is managed centrally: the schemas must then be
    /// registered already, and gridtalk only looks their ids up.
    pub schema_registry_auto_register: bool,
}

impl ContractConfig {
    /// Whether responses and audit records are written in the Confluent wire format.
    pub fn publishes_confluent(&self) -> bool {
        match self.publish_framing.as_str() {
            "confluent" => true,
            "auto" => self.schema_registry_url.is_some(),
            _ => false,
        }
    }

    /// The registry's basic-auth credentials, when a username is set.
    pub fn schema_registry_auth(&self) -> Option<(String, String)> {
        self.schema_registry_username.clone().map(|user| {
            let password = self
                .schema_registry_password
                .as_ref()
                .map(|p| p.expose().to_string())
                .unwrap_or_default();
            (user, password)
        })
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Events with an id seen within this window are dropped as duplicates.
    pub dedupe_window_secs: u64,
    /// Upper bound of remembered event ids per input partition; the oldest are forgotten first.
    pub dedupe_max_entries: usize,
    /// Outbox produces awaiting acknowledgement at once; the consumer pauses beyond it.
    pub max_in_flight: usize,
    /// How long a record whose schema the registry cannot serve (5xx, timeout) is retried, with
    /// its partition paused, before it is dead-lettered as `registry_unavailable`.
    pub registry_wait_max_secs: u64,
    /// Events that occurred (`occurred_at`) longer ago than this are dead-lettered as `stale`
    /// and never sent: after a long outage, a renamed consumer group or expired offsets, the
    /// input topics' retention must not reach people's phones. 0 turns the check off.
    pub max_event_age_secs: u64,
    /// Where the route group starts on an input partition it has no committed offset for:
    /// `earliest` (everything the topic holds, with old events stopped by `max_event_age_secs`)
    /// or `latest` (only events published from then on).
    pub offset_reset: String,
    /// Language used when a contact has none.
    pub default_language: String,
    /// Secret that signs button tokens (request, action, expiry). Required when a template has
    /// buttons; keep it stable across restarts so that buttons already sent stay valid.
    pub button_secret: Option<Secret>,
    /// A file holding the button secret instead (read at start).
    pub button_secret_file: Option<PathBuf>,
    /// How long a button stays valid after the message is rendered.
    pub button_ttl_hours: u64,
    /// Quiet hours: a message for a contact outside its business hours (see the directory) waits
    /// for the window to open, unless its event's severity or type is urgent.
    pub quiet_hours: bool,
    /// Severities whose messages go at once, whatever the hour.
    pub urgent_severities: Vec<String>,
    /// Event types whose messages go at once, whatever the hour.
    pub urgent_event_types: Vec<String>,
}

/// The send stage's start-up comparison of the configured templates with Meta's catalogue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TemplateCheck {
    Off,
    Warn,
    Fail,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SendConfig {
    /// Cloud API base URL (`https://graph.facebook.com` in production).
    pub api_base_url: String,
    /// Graph API version, e.g. `v25.0`; bump about once a year.
    pub api_version: String,
    /// The sending business phone-number id (the Graph id, not the number).
    pub phone_number_id: String,
    /// System-user access token. Prefer `access_token_file`.
    pub access_token: Option<Secret>,
    /// File holding the access token; re-read when WhatsApp reports the token invalid, so a
    /// rotated token is picked up without a restart.
    pub access_token_file: Option<PathBuf>,
    /// The WhatsApp Business Account id (WABA) the templates belong to: `gridtalk templates
    /// check` and the send stage's start-up check read its catalogue.
    pub business_account_id: Option<String>,
    /// What the send stage does at start when `business_account_id` is set: compare the
    /// configured templates with the account's (`off`, `warn`: log each mismatch, `fail`: refuse
    /// to start on any).
    pub template_check: TemplateCheck,
    /// The number's throughput limit (Meta's default is 80).
    pub max_messages_per_second: u32,
    /// Headroom kept below the limits so network jitter never pushes a send over them.
    pub rate_safety_margin_percent: u32,
    /// Minimum spacing of messages to one recipient (Meta's pair limit: about one per 6 s).
    pub pair_interval_ms: u64,
    /// Messages one recipient may receive back to back before spacing applies.
    pub pair_burst: u32,
    /// Requests on the wire to the Cloud API at once, across all recipients. A message waiting
    /// for its recipient's pair limit, a retry backoff or a halt holds no such place. Size it for
    /// `max_messages_per_second` times the API's latency (64 carries 80/s up to 800 ms); it is
    /// also the most requests a crash can leave in doubt (see `in_doubt_wait_ms`).
    pub max_in_flight: usize,
    /// Outbox messages held in memory waiting for their turn (per recipient, in outbox order);
    /// beyond it the outbox partitions pause until messages leave.
    pub max_queued: usize,
    pub request_timeout_ms: u64,
    pub retry_initial_backoff_ms: u64,
    pub retry_max_backoff_ms: u64,
    /// Attempts for errors Meta calls unknown (131000) before dead-lettering.
    pub max_unknown_error_attempts: u32,
    /// Attempts of one message that got no answer (timeout, refused connection) or an answer
    /// without Meta's error body before the number halts: Meta itself always answers with a
    /// body, so a run of such answers means the way to Meta is broken (a proxy, the base URL).
    pub max_unanswered_attempts: u32,
    /// While the number is halted (token expired, account blocked), how often one message is tried.
    pub halt_probe_interval_ms: u64,
    /// How long after its request a message in doubt (its intent recorded, its outcome not: a
    /// crash or a timeout with the request on the wire) waits for a status webhook carrying its
    /// id (`biz_opaque_callback_data`) before it is sent again. Needs the ingest stage running
    /// somewhere (statuses reach the webhook topic). 0: no intents, no wait (a message in
    /// flight at a crash may then be delivered twice).
    pub in_doubt_wait_ms: u64,
    /// How long the sent index remembers an accepted message, so that a replayed outbox record is
    /// not sent again. Must exceed the longest time an outbox record can wait uncommitted.
    pub index_retention_hours: u64,
    /// Bursts of informational messages to one person merged into digests.
    #[serde(default)]
    pub coalesce: CoalesceConfig,
}

/// Coalescing (`[send.coalesce]`): a recipient gets at most one informational message (one
/// without buttons) per window. The first of a burst goes at once; those that come up within the
/// window after it wait for the window's end and go together as one digest (the `template`, an
/// approved template with two body parameters: how many updates, and their texts). A message
/// that asks for an answer (it has buttons) is never merged: it goes on its own, in order.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoalesceConfig {
    /// The window; 0 turns coalescing off.
    pub window_ms: u64,
    /// Messages in one digest at most; more make another digest.
    pub max_items: usize,
    /// The approved digest template (a configured `[[templates]]` entry with two body
    /// parameters). If WhatsApp refuses it for good, the messages go one by one.
    pub template: String,
}

impl Default for CoalesceConfig {
    fn default() -> Self {
        CoalesceConfig {
            window_ms: 10_000,
            max_items: 10,
            template: "alert_digest".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    pub listen: SocketAddr,
    /// Log format: `json` or `text`.
    pub log_format: String,
    /// On SIGTERM, how long in-flight work may take to finish before the final commit (what is
    /// unfinished then is replayed by the next owner). Keep it below the Kubernetes
    /// `terminationGracePeriodSeconds` (60 in the shipped manifests), with room for the commit.
    pub shutdown_deadline_ms: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    /// Address of the webhook endpoint Meta calls (separate from the admin port).
    pub listen: SocketAddr,
    /// Path of the webhook endpoint.
    pub path: String,
    /// The verify token configured in the Meta app, answered in the GET handshake.
    pub verify_token: Option<Secret>,
    /// The Meta app secret that signs webhook bodies (`X-Hub-Signature-256`).
    pub app_secret: Option<Secret>,
    /// A file holding the app secret instead (read at start).
    pub app_secret_file: Option<PathBuf>,
    /// Larger bodies are refused with 413 before any parsing.
    pub max_body_bytes: usize,
    /// A connection that has not sent a complete request head this long after it opened (or
    /// after its previous request) is closed.
    pub header_read_timeout_ms: u64,
    /// A request whose body has not fully arrived this long after its head is answered 408 and
    /// its connection closed (a client that dribbles a body is cut off).
    pub body_read_timeout_ms: u64,
    /// Connections open at once at most; one more is closed as soon as it is accepted.
    pub max_connections: usize,
    /// Refused (unauthenticated) requests written to the audit topic per minute at most; every
    /// refusal is still counted (`gridtalk_refusals_total`). Anyone who can reach the endpoint can
    /// send wrong signatures, and must not be able to fill the audit topic with them.
    pub max_refusal_audits_per_minute: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConverseConfig {
    /// How long a reply or status waits for the sent-log record of the message it refers to
    /// (the webhook can overtake the sender's own record) before it is judged unknown.
    pub join_wait_ms: u64,
    /// Items waiting for their message's sent-log record at once; an item beyond it is judged at
    /// once (audited as a reply to an unknown message) rather than held.
    pub max_waiting: usize,
    /// Replies to a person are free-form while they wrote within this window (Meta's customer
    /// service window, less a margin); after it, the confirmation template is used.
    pub service_window_minutes: u64,
    /// The approved template that confirms an answer outside the window: two body parameters,
    /// the request id and a sentence.
    pub confirmation_template: String,
    /// Mark a person's message read, with the typing indicator, when it gets a confirmation
    /// (before the confirmation, through the outbox; never in a group, where Meta has neither).
    pub mark_read: bool,
    /// Webhook item ids remembered to drop Meta's redeliveries.
    pub remembered_items: usize,
    /// How far back the response topic is read when converse takes over webhook partitions
    /// (at start, after a crash, on a rebalance): responses published in that time are not
    /// published again when their items are replayed. Covers the gap between a response being
    /// acknowledged and the state entry that records it; longer than any restart delay.
    pub replay_lookback_ms: u64,
}

/// A reminder policy: the clock gridtalk keeps on a request that asks for an answer.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReminderPolicyConfig {
    pub name: String,
    /// The events whose messages ask for the answer (they open the clock).
    pub event_types: Vec<String>,
    /// JSON pointer of the request's id in those events and in the closing ones: the same value
    /// the request template's `document_key` reads (the answer's buttons name it).
    pub request_path: String,
    /// JSON pointer of the due time (timestamp-millis) in the opening event; absent or null:
    /// `default_due_hours` after the event occurred.
    #[serde(default)]
    pub due_path: Option<String>,
    #[serde(default = "default_due_hours")]
    pub default_due_hours: f64,
    /// Reminders to the request's recipients, in hours after the due time (0: at the due time).
    pub reminder_hours: Vec<f64>,
    /// The template of the reminders (it may read `/reminder/…`: step, steps, hours_overdue,
    /// due_at, what, request_id).
    pub reminder_template: String,
    /// The escalation, in hours after the due time (after the last reminder), to
    /// `escalation_audience` with `escalation_template`.
    #[serde(default)]
    pub escalate_after_hours: Option<f64>,
    #[serde(default)]
    pub escalation_audience: Option<AudienceConfig>,
    #[serde(default)]
    pub escalation_template: Option<String>,
    /// Upstream events that close the request (its document was answered outside WhatsApp).
    #[serde(default)]
    pub closed_by: Vec<String>,
    /// Upstream overdue events (e.g. `tg.po.ack_overdue`): each fires the step it names, once,
    /// instead of being routed by the rules while a clock knows the request.
    #[serde(default)]
    pub upstream_overdue: Vec<String>,
}

fn default_due_hours() -> f64 {
    24.0
}

/// A summary gridtalk computes itself (`[[summaries]]`): what the stream says about an audience's
/// documents (completed POs, pending invoices, failed acknowledgements, open exceptions, open
/// approvals, overdue requests), sent daily at a local time and whenever a threshold is crossed.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SummaryConfig {
    pub name: String,
    /// Who receives it. With `per_partner`, one summary per partner, about that partner's
    /// documents, to the audience's contacts of that partner (and the internal roles); else one
    /// about everything.
    pub audience: AudienceConfig,
    #[serde(default)]
    pub per_partner: bool,
    /// The local time of the daily summary (`HH:MM`), in `time_zone`; none: only thresholds.
    #[serde(default)]
    pub daily_at: Option<String>,
    /// IANA time zone of `daily_at`.
    #[serde(default = "utc_zone")]
    pub time_zone: String,
    /// Event-based summaries: sent when one is crossed, at most once per its window.
    #[serde(default)]
    pub thresholds: Vec<SummaryThresholdConfig>,
    /// The template; it reads `/summary/…`: `kind` (daily or threshold), `scope`, and each
    /// measure by name (`completed_pos`, …, `overdue_requests`).
    pub template: String,
}

/// `at_least` of `measure` (e.g. `open_exceptions`) opened within `within_minutes`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SummaryThresholdConfig {
    pub measure: String,
    pub at_least: u64,
    pub within_minutes: u64,
}

fn utc_zone() -> String {
    "UTC".into()
}

impl SummaryConfig {
    /// The scope a record of `partner_id` counts in: the partner's own with `per_partner`, else
    /// `all`.
    pub fn scope<'a>(&self, partner_id: &'a str) -> &'a str {
        if self.per_partner {
            partner_id
        } else {
            "all"
        }
    }
}

/// The time source of the request clocks. `speed` 1 is the wall clock; anything else is for
/// tests and the demo only, and the production binary refuses it.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClockConfig {
    /// How many times faster than the wall clock.
    pub speed: f64,
    /// The real instant (unix ms) at which the clock reads `start_ms`; 0: when the process starts.
    /// Processes given the same values agree on the time.
    pub anchor_ms: i64,
    /// What the clock reads at `anchor_ms`; 0: the anchor itself.
    pub start_ms: i64,
}

impl Default for ClockConfig {
    fn default() -> Self {
        ClockConfig {
            speed: 1.0,
            anchor_ms: 0,
            start_ms: 0,
        }
    }
}

impl ReminderPolicyConfig {
    /// The offsets of the policy's steps after the due time, in ms: the reminders, then the
    /// escalation if it has one.
    pub fn step_offsets_ms(&self) -> Vec<i64> {
        let ms = |hours: f64| (hours * 3_600_000.0).round() as i64;
        let mut steps: Vec<i64> = self.reminder_hours.iter().map(|h| ms(*h)).collect();
        if let Some(h) = self.escalate_after_hours {
            steps.push(ms(h));
        }
        steps
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DirectoryConfig {
    /// Partner and contact directory file (TOML); the directory topic overrides its entries.
    pub file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub name: String,
    /// Event types this rule applies to.
    pub event_types: Vec<String>,
    /// Partner ids; empty means every partner.
    #[serde(default)]
    pub partners: Vec<String>,
    /// INFO, WARNING or CRITICAL: the rule applies at this severity and above.
    #[serde(default)]
    pub min_severity: Option<String>,
    /// JSON pointer of a money amount and the threshold it must reach.
    #[serde(default)]
    pub amount_path: Option<String>,
    #[serde(default)]
    pub min_amount: Option<f64>,
    /// JSON pointer and value the event must have, e.g. `/payload/escalation_level` = `1`.
    #[serde(default)]
    pub when_path: Option<String>,
    #[serde(default)]
    pub when_equals: Option<String>,
    pub audience: AudienceConfig,
    pub template: String,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct AudienceConfig {
    /// Roles of contacts that belong to the event's partner.
    #[serde(default)]
    pub partner_roles: Vec<String>,
    /// Roles of the company's own contacts (no partner).
    #[serde(default)]
    pub internal_roles: Vec<String>,
    /// JSON pointer to an array of contact ids named by the event (e.g. designated approvers).
    #[serde(default)]
    pub contacts_from: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TemplateConfig {
    /// Approved template name in the WhatsApp Business account.
    pub name: String,
    /// Approved translations (exact codes: `en` and `en_US` differ). The first is the fallback.
    pub languages: Vec<String>,
    /// UTILITY for transactional alerts.
    #[serde(default = "utility")]
    pub category: String,
    /// The approved body text with `{{1}}`..`{{n}}` placeholders (shown by the sandbox).
    pub text: String,
    /// JSON pointer of the business document the message is about.
    pub document_key: String,
    /// Body parameters, in placeholder order.
    pub body: Vec<ParamConfig>,
    /// Quick-reply buttons (at most 3 are used by gridtalk's flows).
    #[serde(default)]
    pub buttons: Vec<ButtonConfig>,
    /// The approved text and button titles of the other languages, as the business account holds
    /// them (`[templates.translations.de_DE]`): the same placeholders in the words of that
    /// language. A language without one is shown with `text`. gridtalk sends only the language
    /// code and the parameters; the sandbox renders the text of the language that was sent.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub translations: BTreeMap<String, TranslationConfig>,
}

/// One language's approved wording of a template.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TranslationConfig {
    /// The body text in this language, with the same `{{1}}`..`{{n}}` placeholders.
    pub text: String,
    /// The quick-reply titles in this language, in the order of `buttons`.
    #[serde(default)]
    pub buttons: Vec<String>,
}

/// The problem with a template text (at key path `at`) whose `{{1}}`, `{{2}}`, … placeholders,
/// counted from 1 without a gap, are not exactly its `parameters` body parameters.
fn placeholder_problem(at: &str, text: &str, parameters: usize) -> Option<String> {
    let placeholders = (1..=parameters + 1)
        .take_while(|i| text.contains(&format!("{{{{{i}}}}}")))
        .count();
    (placeholders != parameters).then(|| {
        format!("{at}: text has {placeholders} placeholders but {parameters} body parameters")
    })
}

fn utility() -> String {
    "UTILITY".into()
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ParamConfig {
    /// JSON pointer into the event view, e.g. `/payload/po_number`.
    pub path: String,
    /// text, money, date, datetime, number, list or words (a code such as `ASN_SENT` as a person
    /// reads it: "ASN sent").
    #[serde(default = "text_format")]
    pub format: String,
    /// Used when the event has no value at `path`; without it a missing value is a dead letter.
    #[serde(default)]
    pub default: Option<String>,
}

fn text_format() -> String {
    "text".into()
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ButtonConfig {
    /// The action the tap means (ACCEPT, REJECT, APPROVE ...), carried in the button payload.
    pub action: String,
    /// The button title as approved in the template (at most 20 characters).
    pub title: String,
}

/// Every problem found while loading, each on its own line.
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
pub struct ConfigErrors(pub Vec<String>);

const PARAM_FORMATS: &[&str] = &[
    "text", "money", "date", "datetime", "number", "list", "words",
];
const SEVERITIES: &[&str] = &["INFO", "WARNING", "CRITICAL"];

/// The embedded defaults, parsed once.
fn defaults() -> &'static toml::Table {
    static DEFAULTS: std::sync::OnceLock<toml::Table> = std::sync::OnceLock::new();
    DEFAULTS.get_or_init(|| DEFAULT_TOML.parse().expect("embedded defaults parse"))
}

impl Config {
    /// Loads defaults, then `file`, then `GRIDTALK__*` variables from `env`.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigErrors> {
        match Self::load_file_report(file, env) {
            (Some((config, _)), errors) if errors.is_empty() => Ok(config),
            (_, errors) => Err(ConfigErrors(errors)),
        }
    }

    /// [`Config::load_report`] of the file at `file`: a file that cannot be read is one more
    /// problem, and the defaults and variables are still checked.
    pub fn load_file_report(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> (Option<(Config, Sources)>, Vec<String>) {
        match file.map(|path| (path, std::fs::read_to_string(path))) {
            None => Self::load_report(None, env),
            Some((path, Ok(text))) => {
                Self::load_report(Some((&path.display().to_string(), &text)), env)
            }
            Some((path, Err(e))) => {
                let (_, more) = Self::load_report(None, env);
                let mut errors = vec![format!("{}: {e}", path.display())];
                errors.extend(more);
                (None, errors)
            }
        }
    }

    /// [`Config::load`] with the file's text given (`(name, text)`): defaults, then the text, then
    /// `GRIDTALK__*` variables from `env`. Total: any text and variables give a configuration or
    /// every problem found, never a panic (fuzzed by the `config_loader` target).
    pub fn load_text(
        file: Option<(&str, &str)>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigErrors> {
        Self::load_traced(file, env).map(|(config, _)| config)
    }

    /// [`Config::load`] that also tells where each value came from (see [`Sources`]).
    pub fn load_traced(
        file: Option<(&str, &str)>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(Config, Sources), ConfigErrors> {
        match Self::load_report(file, env) {
            (Some(loaded), errors) if errors.is_empty() => Ok(loaded),
            (_, errors) => Err(ConfigErrors(errors)),
        }
    }

    /// Everything the loader found: the configuration when the layers deserialize (even if it
    /// does not validate, so that further checks can run on it) and every problem.
    pub fn load_report(
        file: Option<(&str, &str)>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> (Option<(Config, Sources)>, Vec<String>) {
        let mut errors = Vec::new();
        let mut sources = Sources::default();
        let mut merged = defaults().clone();
        if let Some((name, text)) = file {
            match text.parse::<toml::Table>() {
                Ok(table) => layers::merge_layer(
                    &mut merged,
                    table,
                    &Source::File(name.into()),
                    &mut sources,
                ),
                Err(e) => errors.push(format!(
                    "{name}: {}",
                    layers::without_quoted_values(e.to_string().trim()).replace('\n', " ")
                )),
            }
        }
        for (key, value) in env {
            let Some(rest) = key.strip_prefix("GRIDTALK__") else {
                continue;
            };
            let path: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
            let mut layer = toml::Table::new();
            if let Err(e) = set_path(&mut layer, &path, value, &merged) {
                errors.push(format!("{key}: {e}"));
                continue;
            }
            layers::merge_layer(&mut merged, layer, &Source::Env(key.clone()), &mut sources);
        }
        let config = match layers::deserialize(&merged) {
            Ok(c) => Some(c),
            Err(whole) => {
                let located = layers::locate_errors(defaults(), &merged);
                if located.is_empty() {
                    errors.push(whole.replace('\n', " "));
                } else {
                    errors.extend(located);
                }
                None
            }
        };
        if let Some(config) = &config {
            errors.extend(config.validate());
        }
        // Point at the file's line where the path names a key the file set.
        if let Some((name, text)) = file {
            for error in &mut errors {
                let path = error.split([':', ' ']).next().unwrap_or("").to_string();
                let parts: Vec<&str> = path.split('.').collect();
                if matches!(sources.of(&path), Source::File(_)) {
                    if let Some(line) = layers::line_of(text, &parts) {
                        error.push_str(&format!(" ({name}:{line})"));
                    }
                }
            }
        }
        (config.map(|c| (c, sources)), errors)
    }

    /// Semantic checks serde cannot make. Returns every problem.
    pub fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if self.topics.inputs.is_empty() {
            errors.push("topics.inputs: at least one input topic is required".into());
        }
        if !matches!(self.route.offset_reset.as_str(), "earliest" | "latest") {
            errors.push(format!(
                "route.offset_reset must be \"earliest\" or \"latest\", not {:?}",
                self.route.offset_reset
            ));
        }
        if self.send.max_messages_per_second == 0 {
            errors.push("send.max_messages_per_second must be at least 1".into());
        }
        if self.send.rate_safety_margin_percent >= 50 {
            errors.push("send.rate_safety_margin_percent must be below 50".into());
        }
        if self.send.pair_burst == 0 {
            errors.push("send.pair_burst must be at least 1".into());
        }
        let coalesce = &self.send.coalesce;
        if coalesce.window_ms > 0 {
            if coalesce.max_items < 2 {
                errors.push("send.coalesce.max_items must be at least 2".into());
            }
            match self.templates.iter().find(|t| t.name == coalesce.template) {
                None => errors.push(format!(
                    "send.coalesce.template {:?} is not a configured template",
                    coalesce.template
                )),
                Some(t) if t.body.len() != 2 || !t.buttons.is_empty() => errors.push(format!(
                    "send.coalesce.template {:?} must have two body parameters (the count and the texts) and no buttons",
                    coalesce.template
                )),
                Some(_) => {}
            }
        }
        let kafka = &self.kafka;
        if kafka.session_timeout_ms == 0 {
            errors.push("kafka.session_timeout_ms must be at least 1".into());
        }
        if kafka.heartbeat_interval_ms == 0
            || kafka.heartbeat_interval_ms >= kafka.session_timeout_ms
        {
            errors.push(format!(
                "kafka.heartbeat_interval_ms ({}) must be at least 1 and below kafka.session_timeout_ms ({}); a third of it or less is usual",
                kafka.heartbeat_interval_ms, kafka.session_timeout_ms
            ));
        }
        if kafka.max_poll_interval_ms < kafka.session_timeout_ms {
            errors.push(format!(
                "kafka.max_poll_interval_ms ({}) must be at least kafka.session_timeout_ms ({})",
                kafka.max_poll_interval_ms, kafka.session_timeout_ms
            ));
        }
        if kafka.delivery_timeout_ms < kafka.request_timeout_ms {
            errors.push(format!(
                "kafka.delivery_timeout_ms ({}) must be at least kafka.request_timeout_ms ({})",
                kafka.delivery_timeout_ms, kafka.request_timeout_ms
            ));
        }
        if kafka.revoke_drain_ms == 0
            || kafka.revoke_drain_ms >= u64::from(kafka.max_poll_interval_ms)
        {
            errors.push(format!(
                "kafka.revoke_drain_ms ({}) must be at least 1 and below kafka.max_poll_interval_ms ({})",
                kafka.revoke_drain_ms, kafka.max_poll_interval_ms
            ));
        }
        if self.converse.max_waiting == 0 {
            errors.push("converse.max_waiting must be at least 1".into());
        }
        if self.send.max_in_flight == 0 || self.send.max_queued == 0 {
            errors.push("send.max_in_flight and send.max_queued must be at least 1".into());
        }
        match self.contract.publish_framing.as_str() {
            "auto" | "single_object" => {}
            "confluent" if self.contract.schema_registry_url.is_none() => errors.push(
                "contract.publish_framing = \"confluent\" needs contract.schema_registry_url"
                    .into(),
            ),
            "confluent" => {}
            other => errors.push(format!(
                "contract.publish_framing must be auto, confluent or single_object, not {other:?}"
            )),
        }
        if self.route.registry_wait_max_secs == 0 {
            errors.push("route.registry_wait_max_secs must be at least 1".into());
        }
        if self.admin.shutdown_deadline_ms == 0 {
            errors.push("admin.shutdown_deadline_ms must be at least 1".into());
        }
        if self.ingest.header_read_timeout_ms == 0 || self.ingest.body_read_timeout_ms == 0 {
            errors.push(
                "ingest.header_read_timeout_ms and ingest.body_read_timeout_ms must be at least 1"
                    .into(),
            );
        }
        if !(1..=1_000_000).contains(&self.ingest.max_connections) {
            errors.push("ingest.max_connections must be between 1 and 1000000".into());
        }
        if !["json", "text"].contains(&self.admin.log_format.as_str()) {
            errors.push(format!(
                "admin.log_format: {} is not json or text",
                self.admin.log_format
            ));
        }
        let mut template_names = std::collections::HashSet::new();
        for t in &self.templates {
            if !template_names.insert(t.name.as_str()) {
                errors.push(format!("templates: {} is defined twice", t.name));
            }
            if t.languages.is_empty() {
                errors.push(format!(
                    "templates.{}: at least one language is required",
                    t.name
                ));
            }
            errors.extend(placeholder_problem(
                &format!("templates.{}", t.name),
                &t.text,
                t.body.len(),
            ));
            for (language, translation) in &t.translations {
                let at = format!("templates.{}.translations.{language}", t.name);
                if !t.languages.contains(language) {
                    errors.push(format!(
                        "{at}: {language} is not one of the template's languages {:?}",
                        t.languages
                    ));
                }
                errors.extend(placeholder_problem(&at, &translation.text, t.body.len()));
                if !translation.buttons.is_empty() && translation.buttons.len() != t.buttons.len() {
                    errors.push(format!(
                        "{at}: {} button titles for {} buttons",
                        translation.buttons.len(),
                        t.buttons.len()
                    ));
                }
            }
            for p in &t.body {
                if !PARAM_FORMATS.contains(&p.format.as_str()) {
                    errors.push(format!(
                        "templates.{}: format {} is not one of {PARAM_FORMATS:?}",
                        t.name, p.format
                    ));
                }
                if !p.path.starts_with('/') {
                    errors.push(format!(
                        "templates.{}: path {} must be a JSON pointer",
                        t.name, p.path
                    ));
                }
            }
            if t.buttons.len() > 3 {
                errors.push(format!(
                    "templates.{}: at most 3 quick-reply buttons",
                    t.name
                ));
            }
            for b in &t.buttons {
                if b.title.is_empty() || b.title.chars().count() > 20 {
                    errors.push(format!(
                        "templates.{}: button title {:?} must have 1 to 20 characters",
                        t.name, b.title
                    ));
                }
            }
        }
        match self
            .templates
            .iter()
            .find(|t| t.name == self.converse.confirmation_template)
        {
            None => errors.push(format!(
                "converse.confirmation_template: template {} is not defined",
                self.converse.confirmation_template
            )),
            Some(t) if t.body.len() != 2 || !t.buttons.is_empty() => errors.push(format!(
                "converse.confirmation_template: template {} needs exactly two body parameters and no buttons",
                t.name
            )),
            Some(_) => {}
        }
        let mut rule_names = std::collections::HashSet::new();
        for r in &self.rules {
            if !rule_names.insert(r.name.as_str()) {
                errors.push(format!("rules: {} is defined twice", r.name));
            }
            if !template_names.contains(r.template.as_str()) {
                errors.push(format!(
                    "rules.{}: template {} is not defined",
                    r.name, r.template
                ));
            }
            if r.event_types.is_empty() {
                errors.push(format!("rules.{}: event_types is empty", r.name));
            }
            if let Some(s) = &r.min_severity {
                if !SEVERITIES.contains(&s.as_str()) {
                    errors.push(format!(
                        "rules.{}: min_severity {s} is not one of {SEVERITIES:?}",
                        r.name
                    ));
                }
            }
            if r.min_amount.is_some() != r.amount_path.is_some() {
                errors.push(format!(
                    "rules.{}: amount_path and min_amount go together",
                    r.name
                ));
            }
            if r.when_path.is_some() != r.when_equals.is_some() {
                errors.push(format!(
                    "rules.{}: when_path and when_equals go together",
                    r.name
                ));
            }
            let a = &r.audience;
            if a.partner_roles.is_empty()
                && a.internal_roles.is_empty()
                && a.contacts_from.is_none()
            {
                errors.push(format!("rules.{}: the audience names nobody", r.name));
            }
        }
        errors.extend(self.reminder_problems(&template_names));
        errors.extend(self.summary_problems(&template_names));
        for s in &self.route.urgent_severities {
            if !SEVERITIES.contains(&s.as_str()) {
                errors.push(format!(
                    "route.urgent_severities: {s} is not one of {SEVERITIES:?}"
                ));
            }
        }
        if !(self.clock.speed.is_finite() && self.clock.speed > 0.0) {
            errors.push(format!(
                "clock.speed must be a positive number, not {}",
                self.clock.speed
            ));
        }
        errors
    }

    fn summary_problems(&self, templates: &std::collections::HashSet<&str>) -> Vec<String> {
        const MEASURES: [&str; 6] = [
            "completed_pos",
            "pending_invoices",
            "failed_acknowledgements",
            "open_exceptions",
            "open_approvals",
            "overdue_requests",
        ];
        let mut errors = Vec::new();
        let mut names = std::collections::HashSet::new();
        for s in &self.summaries {
            let at = format!("summaries.{}", s.name);
            if !names.insert(s.name.as_str()) {
                errors.push(format!("summaries: {} is defined twice", s.name));
            }
            if s.name.is_empty() || s.name.contains(':') {
                errors.push(format!("{at}: the name must be non-empty and without ':'"));
            }
            if !templates.contains(s.template.as_str()) {
                errors.push(format!(
                    "{at}.template: template {} is not defined",
                    s.template
                ));
            } else if let Some(t) = self.templates.iter().find(|t| t.name == s.template) {
                if !t.buttons.is_empty() {
                    errors.push(format!(
                        "{at}.template: a summary asks for no answer; {} has buttons",
                        s.template
                    ));
                }
            }
            if s.time_zone.parse::<chrono_tz::Tz>().is_err() {
                errors.push(format!(
                    "{at}.time_zone: {:?} is not an IANA time zone",
                    s.time_zone
                ));
            }
            if let Some(daily) = &s.daily_at {
                if chrono::NaiveTime::parse_from_str(daily, "%H:%M").is_err() {
                    errors.push(format!(
                        "{at}.daily_at: {daily:?} is not a time of day like 08:00"
                    ));
                }
            }
            if s.daily_at.is_none() && s.thresholds.is_empty() {
                errors.push(format!(
                    "{at}: neither daily_at nor thresholds: it would never be sent"
                ));
            }
            let a = &s.audience;
            if a.partner_roles.is_empty() && a.internal_roles.is_empty() {
                errors.push(format!(
                    "{at}.audience: name partner_roles or internal_roles"
                ));
            }
            if a.contacts_from.is_some() {
                errors.push(format!(
                    "{at}.audience.contacts_from: a summary has no event to read contacts from"
                ));
            }
            if !a.partner_roles.is_empty() && !s.per_partner {
                errors.push(format!(
                    "{at}: partner_roles need per_partner = true (whose partner?)"
                ));
            }
            for (i, t) in s.thresholds.iter().enumerate() {
                if !MEASURES.contains(&t.measure.as_str()) {
                    errors.push(format!(
                        "{at}.thresholds[{i}].measure: {:?} is not one of {MEASURES:?}",
                        t.measure
                    ));
                }
                if t.at_least == 0 || t.within_minutes == 0 {
                    errors.push(format!(
                        "{at}.thresholds[{i}]: at_least and within_minutes must be at least 1"
                    ));
                }
            }
        }
        errors
    }

    fn reminder_problems(&self, templates: &std::collections::HashSet<&str>) -> Vec<String> {
        let mut errors = Vec::new();
        let mut names = std::collections::HashSet::new();
        let mut opened_by: std::collections::HashMap<&str, &str> = Default::default();
        for p in &self.reminders {
            let at = format!("reminders.{}", p.name);
            if !names.insert(p.name.as_str()) {
                errors.push(format!("reminders: {} is defined twice", p.name));
            }
            if p.event_types.is_empty() {
                errors.push(format!("{at}: event_types is empty"));
            }
            for t in &p.event_types {
                if let Some(other) = opened_by.insert(t, &p.name) {
                    errors.push(format!(
                        "{at}: {t} already opens the clocks of reminders.{other}; one policy per event type"
                    ));
                }
            }
            for (what, template) in [
                ("reminder_template", Some(&p.reminder_template)),
                ("escalation_template", p.escalation_template.as_ref()),
            ] {
                if let Some(template) = template {
                    if !templates.contains(template.as_str()) {
                        errors.push(format!("{at}.{what}: template {template} is not defined"));
                    }
                }
            }
            let offsets = p.step_offsets_ms();
            if offsets.is_empty() {
                errors.push(format!(
                    "{at}: no reminder_hours and no escalate_after_hours: the clock would do nothing"
                ));
            }
            if offsets.iter().any(|o| *o < 0) || offsets.windows(2).any(|w| w[0] >= w[1]) {
                errors.push(format!(
                    "{at}: reminder_hours and then escalate_after_hours must be zero or more and increasing, got {:?} then {:?}",
                    p.reminder_hours, p.escalate_after_hours
                ));
            }
            if !(p.default_due_hours.is_finite() && p.default_due_hours >= 0.0) {
                errors.push(format!("{at}.default_due_hours must be zero or more"));
            }
            let escalation = [
                p.escalate_after_hours.is_some(),
                p.escalation_audience.is_some(),
                p.escalation_template.is_some(),
            ];
            if escalation.iter().any(|x| *x) && !escalation.iter().all(|x| *x) {
                errors.push(format!(
                    "{at}: escalate_after_hours, escalation_audience and escalation_template go together"
                ));
            }
            if let Some(a) = &p.escalation_audience {
                if a.partner_roles.is_empty()
                    && a.internal_roles.is_empty()
                    && a.contacts_from.is_none()
                {
                    errors.push(format!("{at}.escalation_audience names nobody"));
                }
            }
        }
        errors
    }

    /// What the given stages (`route`, `send`, `ingest`, `converse`) need beyond a valid
    /// configuration: real ids instead of placeholders, and secrets that are set and readable
    /// (files are read, their content never shown). Every problem at once.
    pub fn problems_for(&self, stages: &[&str]) -> Vec<String> {
        let mut problems = Vec::new();
        if stages.contains(&"send") {
            let id = self.send.phone_number_id.trim();
            if id.is_empty() {
                problems.push(
                    "send.phone_number_id is empty: set the Graph id of the sending number".into(),
                );
            } else if looks_like_placeholder(id) || !id.chars().all(|c| c.is_ascii_digit()) {
                problems.push(format!(
                    "send.phone_number_id {id:?} is not a phone-number id: Meta's ids are digits \
                     (WhatsApp Manager → API setup), not the phone number or a placeholder"
                ));
            }
            match self.read_access_token() {
                Ok(token) if token.expose().trim().is_empty() => problems.push(
                    "send.access_token / send.access_token_file: the access token is empty".into(),
                ),
                Ok(token) if looks_like_placeholder(token.expose()) => {
                    problems.push("send.access_token: the access token is a placeholder".into())
                }
                Ok(_) => {}
                Err(e) if self.send.access_token_file.is_some() => {
                    problems.push(format!("send.access_token_file: cannot read {e}"))
                }
                Err(_) => problems.push("send: set access_token or access_token_file".into()),
            }
        }
        if stages.contains(&"ingest") {
            if let Err(e) = self.ingest_secrets() {
                let key = if e.contains("verify_token") || self.ingest.app_secret_file.is_none() {
                    "ingest"
                } else {
                    "ingest.app_secret_file"
                };
                problems.push(format!("{key}: {e}"));
            }
        }
        if stages.contains(&"route") || stages.contains(&"converse") {
            let with_buttons = self
                .templates
                .iter()
                .filter(|t| !t.buttons.is_empty())
                .count();
            match self.button_secret() {
                Ok(None) if with_buttons > 0 => problems.push(format!(
                    "route.button_secret: {with_buttons} templates have buttons: set route.button_secret or route.button_secret_file"
                )),
                Err(e) => problems.push(format!(
                    "{}: {e}",
                    if self.route.button_secret_file.is_some() { "route.button_secret_file" } else { "route.button_secret" }
                )),
                _ => {}
            }
        }
        if let Some(path) = &self.directory.file {
            if let Err(e) = std::fs::metadata(path) {
                problems.push(format!("directory.file: {}: {e}", path.display()));
            }
        }
        problems
    }

    /// The secret that signs button tokens, if configured.
    pub fn button_secret(&self) -> Result<Option<Secret>, String> {
        match file_or_inline(&self.route.button_secret_file, &self.route.button_secret)? {
            Some(s) if s.expose().len() < 16 => {
                Err("route.button_secret must be at least 16 characters".into())
            }
            other => Ok(other),
        }
    }

    /// The ingest stage's secrets: (verify token, app secret). Both are required to run it.
    pub fn ingest_secrets(&self) -> Result<(Secret, Secret), String> {
        let verify =
            self.ingest.verify_token.clone().ok_or_else(|| {
                "ingest.verify_token is required to run the ingest stage".to_string()
            })?;
        let app_secret = file_or_inline(&self.ingest.app_secret_file, &self.ingest.app_secret)?
            .ok_or(
                "ingest.app_secret or ingest.app_secret_file is required to run the ingest stage",
            )?;
        if app_secret.expose().is_empty() || verify.expose().is_empty() {
            return Err("ingest secrets must not be empty".into());
        }
        Ok((verify, app_secret))
    }

    /// The access token: from the file when one is configured (read fresh each call), else inline.
    pub fn read_access_token(&self) -> Result<Secret, String> {
        file_or_inline(&self.send.access_token_file, &self.send.access_token)?
            .ok_or_else(|| "no access token configured".to_string())
    }
}

/// Whether a value is one of the obvious stand-ins people leave in example files.
fn looks_like_placeholder(value: &str) -> bool {
    let lower = value.to_ascii_lowercase();
    [
        "change-me",
        "changeme",
        "change_me",
        "replace",
        "todo",
        "xxx",
        "your-",
        "your_",
        "<",
        "placeholder",
        "example",
    ]
    .iter()
    .any(|p| lower.contains(p))
}

/// A secret from `file` (trimmed, read now) when one is configured, else the inline value.
fn file_or_inline(
    file: &Option<PathBuf>,
    inline: &Option<Secret>,
) -> Result<Option<Secret>, String> {
    match file {
        Some(path) => std::fs::read_to_string(path)
            .map(|t| Some(Secret::new(t.trim())))
            .map_err(|e| format!("{}: {e}", path.display())),
        None => Ok(inline.clone()),
    }
}

/// Reads an environment value as the type the defaults give the key: a key that is a string by
/// default (or has no default) stays a string unless written as a TOML array, table or quoted
/// string; other keys are parsed as TOML (`80`, `true`, `["a", "b"]`).
fn env_value(existing: Option<&toml::Value>, raw: String) -> toml::Value {
    let parse = |raw: &str| {
        format!("v = {raw}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
    };
    let looks_structured = raw.starts_with('[') || raw.starts_with('{') || raw.starts_with('"');
    match existing {
        Some(toml::Value::String(_)) | None if !looks_structured => toml::Value::String(raw),
        _ => parse(&raw).unwrap_or(toml::Value::String(raw)),
    }
}

/// Puts an environment value at `path` of `layer`, typed like the value `merged` has there.
fn set_path(
    layer: &mut toml::Table,
    path: &[String],
    raw: String,
    merged: &toml::Table,
) -> Result<(), String> {
    match path {
        [] => Err("empty key".into()),
        [last] => {
            let value = env_value(merged.get(last), raw);
            layer.insert(last.clone(), value);
            Ok(())
        }
        [first, rest @ ..] => {
            let empty = toml::Table::new();
            let existing = match merged.get(first) {
                None => &empty,
                Some(toml::Value::Table(t)) => t,
                Some(_) => return Err(format!("{first} is not a section")),
            };
            let mut inner = toml::Table::new();
            set_path(&mut inner, rest, raw, existing)?;
            layer.insert(first.clone(), toml::Value::Table(inner));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_token() -> Vec<(String, String)> {
        vec![("GRIDTALK__SEND__ACCESS_TOKEN".into(), "t0ken".into())]
    }

    #[test]
    fn defaults_are_valid() {
        let config = Config::load(None, with_token()).unwrap();
        assert_eq!(config.send.max_messages_per_second, 80);
        assert!(config.rules.len() >= 10);
        assert_eq!(config.send.access_token.as_ref().unwrap().expose(), "t0ken");
        assert!(!format!("{config:?}").contains("t0ken"));
    }

    /// A confirmation ("your answer … on PO-4500021 is recorded") cites the request's document
    /// key: every built-in request (a template with buttons) shows that key among its
    /// parameters, so the person recognises the id; every translation keeps the placeholders and
    /// has a title per button.
    #[test]
    fn every_request_shows_the_id_its_confirmation_cites_in_every_language() {
        let config = Config::load(None, with_token()).unwrap();
        for t in config.templates.iter().filter(|t| !t.buttons.is_empty()) {
            assert!(
                t.body.iter().any(|p| p.path == t.document_key),
                "{} does not show {}",
                t.name,
                t.document_key
            );
            for language in t.languages.iter().skip(1) {
                let translation = t
                    .translations
                    .get(language)
                    .unwrap_or_else(|| panic!("{} has no {language} text", t.name));
                assert_eq!(
                    translation.buttons.len(),
                    t.buttons.len(),
                    "{} {language}",
                    t.name
                );
            }
        }
        for t in &config.templates {
            for language in t.languages.iter().skip(1) {
                assert!(
                    t.translations.contains_key(language),
                    "{} is approved in {language} but has no text in it",
                    t.name
                );
            }
        }
    }

    #[test]
    fn a_translation_outside_the_languages_or_with_other_placeholders_is_refused() {
        let user = r#"
[[templates]]
name = "po_ack_request"
languages = ["en_US", "de_DE"]
text = "PO {{1}}"
document_key = "/payload/po_number"
body = [{ path = "/payload/po_number" }]
buttons = [{ action = "ACCEPT", title = "Accept" }]

[templates.translations.de_DE]
text = "Bestellung"
buttons = ["Annehmen", "Ablehnen"]

[templates.translations.fr_FR]
text = "Commande {{1}}"
"#;
        let errors = Config::load_text(Some(("user.toml", user)), with_token())
            .unwrap_err()
            .0
            .join("\n");
        for expected in [
            "templates.po_ack_request.translations.de_DE: text has 0 placeholders but 1 body parameters",
            "templates.po_ack_request.translations.de_DE: 2 button titles for 1 buttons",
            "templates.po_ack_request.translations.fr_FR: fr_FR is not one of the template's languages",
        ] {
            assert!(errors.contains(expected), "{expected} missing from {errors}");
        }
    }

    #[test]
    fn env_overrides_and_every_error_is_reported() {
        let env = vec![
            ("GRIDTALK__SEND__MAX_MESSAGES_PER_SECOND".into(), "0".into()),
            ("GRIDTALK__SEND__PAIR_BURST".into(), "0".into()),
            ("GRIDTALK__TOPICS__INPUTS".into(), "[]".into()),
        ];
        let errors = Config::load(None, env).unwrap_err().0;
        let joined = errors.join("\n");
        for needle in ["max_messages_per_second", "pair_burst", "topics.inputs"] {
            assert!(joined.contains(needle), "{needle} missing in {joined}");
        }
    }

    #[test]
    fn group_timings_are_checked_together() {
        let mut env = with_token();
        env.extend([
            ("GRIDTALK__KAFKA__SESSION_TIMEOUT_MS".into(), "6000".into()),
            (
                "GRIDTALK__KAFKA__HEARTBEAT_INTERVAL_MS".into(),
                "6000".into(),
            ),
            (
                "GRIDTALK__KAFKA__MAX_POLL_INTERVAL_MS".into(),
                "5000".into(),
            ),
        ]);
        let joined = Config::load(None, env).unwrap_err().0.join("\n");
        assert!(
            joined.contains("kafka.heartbeat_interval_ms (6000)"),
            "{joined}"
        );
        assert!(
            joined.contains("kafka.max_poll_interval_ms (5000)"),
            "{joined}"
        );
        let mut env = with_token();
        env.push((
            "GRIDTALK__KAFKA__MAX_POLL_INTERVAL_MS".into(),
            "15000".into(),
        ));
        assert_eq!(
            Config::load(None, env).unwrap().kafka.max_poll_interval_ms,
            15000
        );
    }

    #[test]
    fn summaries_are_checked_together() {
        let mut env = with_token();
        env.push((
            "GRIDTALK__SUMMARIES".into(),
            concat!(
                r#"[{name = "a", audience = {partner_roles = ["order_desk"]}, daily_at = "8am", time_zone = "Mars/Olympus", template = "po_ack_request", "#,
                r#"thresholds = [{measure = "happiness", at_least = 0, within_minutes = 60}]}, "#,
                r#"{name = "b", audience = {internal_roles = ["operations"]}, template = "computed_summary"}]"#
            )
            .into(),
        ));
        let joined = Config::load(None, env).unwrap_err().0.join("\n");
        for expected in [
            "summaries.a.template: a summary asks for no answer",
            "summaries.a.time_zone",
            "summaries.a.daily_at",
            "summaries.a: partner_roles need per_partner = true",
            "summaries.a.thresholds[0].measure",
            "summaries.a.thresholds[0]: at_least and within_minutes must be at least 1",
            "summaries.b: neither daily_at nor thresholds",
        ] {
            assert!(joined.contains(expected), "{expected}: {joined}");
        }
        let mut env = with_token();
        env.push((
            "GRIDTALK__SUMMARIES".into(),
            r#"[{name = "ops", audience = {internal_roles = ["operations"]}, daily_at = "08:00", time_zone = "Europe/Berlin", template = "computed_summary"}]"#.into(),
        ));
        let config = Config::load(None, env).expect("a valid summary");
        assert_eq!(config.summaries[0].scope("ACME"), "all");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let dir = std::env::temp_dir().join(format!("gridtalk-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("bad.toml");
        std::fs::write(&file, "[send]\nmax_mesages_per_second = 5\n").unwrap();
        let errors = Config::load(Some(&file), with_token()).unwrap_err().0;
        assert!(
            errors.join(" ").contains("max_mesages_per_second"),
            "{errors:?}"
        );
    }
}
