//! A local stand-in for the WhatsApp Business Cloud API, for the demo and the tests. Never part
//! of the production binary.
//!
//! It behaves like Meta where gridtalk can tell: `POST /{version}/{phone-number-id}/messages`
//! with bearer auth; Meta's validation (known templates, exact language codes, parameter counts,
//! interactive limits, phone format) answered with Meta's error bodies and codes; the throughput
//! limit of a number (130429, sliding one-second window) and the pair limit of a recipient
//! (131056, GCRA with Meta's 6 s / burst 45 by default); fault injection (5xx, slow answers,
//! expired token 190); signed status webhooks (`sent`, `delivered`, `read`, or `failed` with 131026
//! for recipients marked undeliverable) posted to a configured URL with `X-Hub-Signature-256`; and
//! the person's side: [`Sandbox::reply`] (or `POST /_sandbox/messages/{wamid}/reply`) taps a
//! quick-reply button or writes a text quoting a message, and posts the inbound-message webhook
//! exactly as Meta would. `GET /_sandbox/messages` and `/_sandbox/stats` show what it received.
//! The Groups endpoints (create, invite link, sending to a group, group statuses) are in
//! [`groups`]; the phones page shows a group as one chat with its members.

// A rejection is the HTTP answer itself (status, Graph error body), built once per refused request.
#![allow(clippy::result_large_err)]

mod groups;
pub use groups::{Group, MAX_PARTICIPANTS};

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hmac::{Hmac, Mac};
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::Sha256;
use tokio_util::sync::CancellationToken;

/// An approved template as Meta knows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApprovedTemplate {
    pub name: String,
    pub languages: Vec<String>,
    pub body_parameters: usize,
    pub quick_replies: usize,
    /// Meta's category (`UTILITY`, `MARKETING`, `AUTHENTICATION`): what a delivered message of
    /// it is priced as.
    #[serde(default = "utility")]
    pub category: String,
    /// Meta's review status: only `APPROVED` templates can be sent (`PAUSED` answers 132015,
    /// `DISABLED` 132016, anything else 132001).
    #[serde(default = "approved")]
    pub status: String,
    /// The buttons' types as the catalogue lists them, when not all quick replies (a `URL`
    /// button, say); empty: `quick_replies` quick-reply buttons.
    #[serde(default)]
    pub button_kinds: Vec<String>,
    /// Body text with `{{n}}` placeholders, for people looking at the sandbox.
    #[serde(default)]
    pub text: String,
    /// Titles of the quick-reply buttons, in order (shown on the phone, sent back on a tap).
    #[serde(default)]
    pub button_titles: Vec<String>,
    /// The text and titles of other languages: a message is rendered in the language it was
    /// sent in, as WhatsApp shows the approved translation.
    #[serde(default)]
    pub translations: std::collections::BTreeMap<String, Translation>,
}

fn utility() -> String {
    "UTILITY".into()
}

fn approved() -> String {
    "APPROVED".into()
}

fn default_business_account() -> String {
    "102290129340398".into()
}

/// One language's approved text and button titles.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Translation {
    pub text: String,
    #[serde(default)]
    pub button_titles: Vec<String>,
}

/// What the person on a phone does in answer to a message they received.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    /// Taps button `index` (0-based) of the message: a template's quick reply or an interactive
    /// reply button.
    Button { index: usize },
    /// Picks the row with `id` of an interactive list message.
    ListRow { id: String },
    /// Writes a text, quoting the message.
    Text { body: String },
}

/// A message a person sent (a tap, a list pick or a text), as the sandbox delivered it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InboundMessage {
    pub wamid: String,
    pub from: String,
    /// What the person's phone shows: the button title, the row title or the text.
    pub shown: String,
    /// The wamid of the message quoted, if any.
    pub context: Option<String>,
    pub sent_at_ms: i64,
    /// Whether gridtalk's webhook endpoint accepted it (2xx).
    pub delivered: bool,
    /// When the business marked it read (`"status": "read"`), and whether it showed the typing
    /// indicator with it.
    #[serde(default)]
    pub read_at_ms: Option<i64>,
    #[serde(default)]
    pub typing_shown: bool,
}

/// Faults to inject, changeable at run time through `POST /_sandbox/faults`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Faults {
    /// Share of requests answered with HTTP 500 before anything is processed (0.0 to 1.0).
    pub server_error_rate: f64,
    /// Share of requests delayed by `slow_ms` (processed after the delay).
    pub slow_rate: f64,
    pub slow_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxConfig {
    pub phone_number_ids: Vec<String>,
    /// Tokens accepted; any other bearer token gets error 190.
    pub valid_tokens: Vec<String>,
    /// App secret that signs webhooks.
    pub app_secret: String,
    /// Where status webhooks go; none means statuses are only recorded.
    pub webhook_url: Option<String>,
    /// Whether accepted messages get their status webhooks (sent, delivered, read) by themselves.
    pub auto_statuses: bool,
    pub templates: Vec<ApprovedTemplate>,
    pub throughput_per_second: u32,
    pub pair_interval_ms: u64,
    pub pair_burst: u32,
    pub faults: Faults,
    /// Recipients (digits) whose messages are accepted but then fail delivery: their status
    /// webhook is `failed` with error 131026, as Meta reports an undeliverable message.
    pub undeliverable: Vec<String>,
    /// Recipients (digits) whose sends Meta refuses with an error code: the answer is Meta's
    /// error body for that code, e.g. 130497 for a country the business may not message,
    /// 131049 for a user at their marketing cap, 131047 (free-form messages only) for Meta
    /// seeing the window closed whatever the webhooks said.
    #[serde(default)]
    pub refusals: std::collections::BTreeMap<String, i64>,
    /// The WhatsApp Business Account id whose template catalogue the sandbox serves.
    #[serde(default = "default_business_account")]
    pub business_account_id: String,
    /// The sending business's display name, shown at the top of every chat as WhatsApp shows it.
    pub business_name: String,
    /// Who holds each phone (digits): shown on the phones page, and their name is the WhatsApp
    /// profile name webhooks carry (`contacts[].profile.name`), as Meta sends it.
    pub people: std::collections::BTreeMap<String, Person>,
}

/// Who holds each phone (by its digits), read from a gridtalk directory file: the contact's name
/// and their partner's, or `business` for the business's own people. Only the names and numbers
/// are read; the rest of the file is gridtalk's business.
pub fn people_from_directory(
    directory_toml: &str,
    business: &str,
) -> Result<std::collections::BTreeMap<String, Person>, String> {
    #[derive(Deserialize)]
    struct File {
        #[serde(default)]
        partners: Vec<Named>,
        #[serde(default)]
        contacts: Vec<Holder>,
    }
    #[derive(Deserialize)]
    struct Named {
        id: String,
        name: String,
    }
    #[derive(Deserialize)]
    struct Holder {
        name: String,
        /// Empty for a group (which is nobody's phone).
        #[serde(default)]
        phone: String,
        partner: Option<String>,
    }
    let file: File = toml::from_str(directory_toml).map_err(|e| e.to_string())?;
    let partner_name = |id: &str| {
        file.partners
            .iter()
            .find(|p| p.id == id)
            .map_or_else(|| id.to_string(), |p| p.name.clone())
    };
    Ok(file
        .contacts
        .iter()
        .filter(|c| !c.phone.trim().is_empty())
        .map(|c| {
            let digits: String = c.phone.chars().filter(char::is_ascii_digit).collect();
            let organisation = c
                .partner
                .as_deref()
                .map_or_else(|| business.to_string(), partner_name);
            (
                digits,
                Person {
                    name: c.name.clone(),
                    organisation: Some(organisation),
                },
            )
        })
        .collect())
}

/// The person holding a phone of the sandbox.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Person {
    pub name: String,
    /// The company they work for (a trading partner's name, or the business's own).
    pub organisation: Option<String>,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            phone_number_ids: vec!["106540352242922".into()],
            valid_tokens: vec!["sandbox-token".into()],
            app_secret: "sandbox-app-secret".into(),
            webhook_url: None,
            auto_statuses: true,
            templates: Vec::new(),
            throughput_per_second: 80,
            pair_interval_ms: 6_000,
            pair_burst: 45,
            faults: Faults::default(),
            undeliverable: Vec::new(),
            refusals: std::collections::BTreeMap::new(),
            business_account_id: default_business_account(),
            business_name: "Sandbox Business".into(),
            people: std::collections::BTreeMap::new(),
        }
    }
}

/// A message the sandbox accepted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReceivedMessage {
    pub wamid: String,
    pub phone_number_id: String,
    pub to: String,
    pub template: Option<String>,
    pub language: Option<String>,
    /// Body parameters in order (templates), or the text body.
    pub parameters: Vec<String>,
    /// The template text with the parameters filled in, as the person would read it.
    pub rendered: String,
    /// Titles of the buttons the phone shows (template quick replies, interactive reply buttons).
    #[serde(default)]
    pub buttons: Vec<String>,
    /// Rows of an interactive list: (id, title, description).
    #[serde(default)]
    pub list_rows: Vec<(String, String, String)>,
    /// The last delivery status the sandbox reported for it (sent, delivered, read, failed).
    #[serde(default)]
    pub status: Option<String>,
    pub request: Value,
    pub received_at_ms: i64,
}

/// Counters of what the sandbox answered.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Stats {
    pub requests: u64,
    pub accepted: u64,
    /// Error answers by Meta code (`"500"` for injected server errors).
    pub errors: HashMap<String, u64>,
    pub webhooks_sent: u64,
    pub webhooks_failed: u64,
    /// Inbound messages marked read (`"status": "read"` requests answered `{"success": true}`).
    #[serde(default)]
    pub read_marks: u64,
}

struct Inner {
    config: SandboxConfig,
    messages: Vec<ReceivedMessage>,
    inbound: Vec<InboundMessage>,
    /// Last time each recipient wrote (ms): free-form messages need it within 24 hours.
    last_inbound_ms: HashMap<String, i64>,
    stats: Stats,
    window: HashMap<String, VecDeque<Instant>>,
    /// GCRA theoretical arrival time per (number, recipient).
    pair_tat: HashMap<(String, String), Instant>,
    /// Tokens that were valid once and no longer are: Meta reports those as expired (subcode
    /// 463), any other token as one it cannot parse.
    expired_tokens: HashSet<String>,
    /// Groups the business created (the Groups API).
    groups: Vec<groups::Group>,
    next_id: u64,
}

/// A running sandbox. Cheap to clone.
#[derive(Clone)]
pub struct Sandbox {
    inner: Arc<Mutex<Inner>>,
    http: reqwest::Client,
    pub addr: SocketAddr,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox").field("addr", &self.addr).finish()
    }
}

fn graph_error(status: StatusCode, code: i64, title: &str, details: &str) -> Response {
    let trace: String = rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(22)
        .map(char::from)
        .collect();
    let body = json!({"error": {
        "message": format!("(#{code}) {title}"),
        "type": "OAuthException",
        "code": code,
        "error_data": {"messaging_product": "whatsapp", "details": details},
        "fbtrace_id": trace,
    }});
    (status, Json(body)).into_response()
}

/// Meta's answer for a refused send with `code`, as its error-code table words it (HTTP 400
/// with the code's title and details; codes not listed get a generic title).
fn documented_refusal(code: i64) -> Rejection {
    let (title, details) = match code {
        130497 => (
            "Business account is restricted from messaging users in this country",
            "Message failed to send because the business account is restricted from messaging users in this country.",
        ),
        131062 => (
            "Business-scoped User ID (BSUID) recipients are not supported for this message",
            "Message failed to send because this message type does not support a business-scoped user ID recipient; send it to the user's phone number.",
        ),
        131049 => (
            "This message was not delivered to maintain healthy ecosystem engagement.",
            "In order to maintain a healthy ecosystem engagement, the message failed to be delivered.",
        ),
        131026 => (
            "Message undeliverable",
            "Message could not be delivered to the recipient.",
        ),
        131057 => (
            "Account in maintenance mode",
            "Business account is in maintenance mode: the phone number's throughput is being upgraded.",
        ),
        131047 => (
            "Re-engagement message",
            "Message failed to send because more than 24 hours have passed since the customer last replied to this number.",
        ),
        _ => ("Message failed to send", "The message could not be sent."),
    };
    reject(StatusCode::BAD_REQUEST, code, title, details)
}

/// Meta's OAuth error body: unlike the WhatsApp errors, no `(#code)` prefix and no `error_data`;
/// an `error_subcode` when Meta gives one (463 expired session).
fn oauth_error(code: i64, subcode: Option<i64>, message: &str) -> Rejection {
    let trace: String = rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(22)
        .map(char::from)
        .collect();
    let mut error = json!({
        "message": message,
        "type": "OAuthException",
        "code": code,
        "fbtrace_id": trace,
    });
    if let Some(subcode) = subcode {
        error["error_subcode"] = json!(subcode);
    }
    (
        code,
        (StatusCode::UNAUTHORIZED, Json(json!({ "error": error }))).into_response(),
    )
}

/// A recipient as Meta reads `to`: digits, optionally written with a leading `+`, spaces,
/// hyphens and parentheses (`+1 (415) 555-0188`). Returns the digits (the `wa_id`).
fn recipient_digits(to: &str) -> Option<String> {
    let mut digits = String::with_capacity(to.len());
    for (i, c) in to.trim().chars().enumerate() {
        match c {
            '0'..='9' => digits.push(c),
            '+' if i == 0 => {}
            ' ' | '-' | '(' | ')' => {}
            _ => return None,
        }
    }
    ((8..=15).contains(&digits.len()) && !digits.starts_with('0')).then_some(digits)
}

/// HMAC-SHA256 signature header value over `body`, as Meta sends it.
pub fn signature(app_secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(app_secret.as_bytes()).expect("any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

impl Sandbox {
    /// Starts the sandbox on `listen` (port 0 picks a free port) until `shutdown`.
    pub async fn start(
        config: SandboxConfig,
        listen: SocketAddr,
        shutdown: CancellationToken,
    ) -> std::io::Result<Sandbox> {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let sandbox = Sandbox {
            inner: Arc::new(Mutex::new(Inner {
                config,
                messages: Vec::new(),
                inbound: Vec::new(),
                last_inbound_ms: HashMap::new(),
                stats: Stats::default(),
                window: HashMap::new(),
                pair_tat: HashMap::new(),
                expired_tokens: HashSet::new(),
                groups: Vec::new(),
                next_id: 1,
            })),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("client"),
            addr,
        };
        let app = Router::new()
            .route("/{version}/{id}/messages", post(send_message))
            .route("/{version}/{id}/groups", post(groups::create_group))
            .route("/{version}/{id}/message_templates", get(message_templates))
            .route("/{version}/{id}/invite_link", post(groups::invite_link))
            .route("/_sandbox/groups", get(groups::list))
            .route("/_sandbox/groups/{group_id}/join", post(groups::join))
            .route(
                "/_sandbox/messages",
                get(list_messages).delete(clear_messages),
            )
            .route("/_sandbox/messages/{wamid}/reply", post(reply_to_message))
            .route("/", get(page))
            .route("/_sandbox/conversations", get(conversations))
            .route("/_sandbox/stats", get(stats))
            .route("/_sandbox/faults", post(set_faults))
            .route("/_sandbox/tokens", post(set_tokens))
            .with_state(sandbox.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { shutdown.cancelled().await })
                .await;
        });
        tracing::info!(%addr, "WhatsApp sandbox listening");
        Ok(sandbox)
    }

    /// The person who received `wamid` answers it (taps a button, picks a list row or writes
    /// quoting it); the sandbox posts the inbound-message webhook, signed, as Meta would. Returns
    /// the new inbound message's wamid.
    pub async fn reply(&self, wamid: &str, reply: Reply) -> Result<String, String> {
        let message = self
            .messages()
            .into_iter()
            .find(|m| m.wamid == wamid)
            .ok_or_else(|| format!("no message {wamid}"))?;
        let context = json!({"from": "15550783881", "id": message.wamid});
        let (inbound, shown) = match &reply {
            Reply::Button { index } => {
                let title = message
                    .buttons
                    .get(*index)
                    .cloned()
                    .ok_or_else(|| format!("message {wamid} has no button {index}"))?;
                if message.template.is_some() {
                    let payload = message
                        .request
                        .pointer("/template/components")
                        .and_then(Value::as_array)
                        .and_then(|components| {
                            components
                                .iter()
                                .filter(|c| c["type"] == "button" && c["sub_type"] == "quick_reply")
                                .nth(*index)
                                .and_then(|c| c.pointer("/parameters/0/payload"))
                                .and_then(Value::as_str)
                                .map(String::from)
                        })
                        .unwrap_or_else(|| title.clone());
                    (
                        json!({"type": "button", "context": context,
                               "button": {"payload": payload, "text": title}}),
                        title,
                    )
                } else {
                    let id = message
                        .request
                        .pointer(&format!("/interactive/action/buttons/{index}/reply/id"))
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string();
                    (
                        json!({"type": "interactive", "context": context, "interactive":
                               {"type": "button_reply", "button_reply": {"id": id, "title": title}}}),
                        title,
                    )
                }
            }
            Reply::ListRow { id } => {
                let (_, title, description) = message
                    .list_rows
                    .iter()
                    .find(|(row, _, _)| row == id)
                    .cloned()
                    .ok_or_else(|| format!("message {wamid} has no list row {id}"))?;
                (
                    json!({"type": "interactive", "context": context, "interactive":
                           {"type": "list_reply", "list_reply": {"id": id, "title": title, "description": description}}}),
                    title,
                )
            }
            Reply::Text { body } => (
                json!({"type": "text", "context": context, "text": {"body": body}}),
                body.clone(),
            ),
        };
        self.deliver_inbound(&message.phone_number_id, &message.to, inbound, shown)
            .await
    }

    /// Delivers a message from `from` to gridtalk as Meta would: `message` is the inbound message
    /// object without `from`, `id` and `timestamp`, which the sandbox fills in; the webhook is
    /// signed with the app secret. Opens the sender's 24-hour window. Returns the new wamid.
    pub async fn deliver_inbound(
        &self,
        phone_number_id: &str,
        from: &str,
        mut message: Value,
        shown: String,
    ) -> Result<String, String> {
        let now = chrono::Utc::now();
        let (url, secret, id, profile_name) = {
            let mut inner = self.inner.lock().expect("sandbox");
            let url = inner
                .config
                .webhook_url
                .clone()
                .ok_or("no webhook URL is configured")?;
            let id = meta_shaped_wamid(from, inner.next_id);
            inner.next_id += 1;
            inner
                .last_inbound_ms
                .insert(from.to_string(), now.timestamp_millis());
            let profile_name = inner
                .config
                .people
                .get(from)
                .map_or_else(|| format!("Contact {from}"), |p| p.name.clone());
            (url, inner.config.app_secret.clone(), id, profile_name)
        };
        message["from"] = json!(from);
        message["id"] = json!(id);
        message["timestamp"] = json!(now.timestamp().to_string());
        let context = message
            .pointer("/context/id")
            .and_then(Value::as_str)
            .map(String::from);
        let value = json!({
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "15550783881", "phone_number_id": phone_number_id},
            "contacts": [{"profile": {"name": profile_name}, "wa_id": from}],
            "messages": [message],
        });
        let delivered = self.post_webhook(&url, &secret, value).await;
        self.inner
            .lock()
            .expect("sandbox")
            .inbound
            .push(InboundMessage {
                wamid: id.clone(),
                from: from.to_string(),
                shown,
                context,
                sent_at_ms: now.timestamp_millis(),
                delivered,
                read_at_ms: None,
                typing_shown: false,
            });
        if delivered {
            Ok(id)
        } else {
            Err(format!("webhook to {url} was not accepted"))
        }
    }

    /// Posts one `messages` change to `url`, signed; records the outcome in the stats.
    async fn post_webhook(&self, url: &str, secret: &str, value: Value) -> bool {
        self.post_webhook_field(url, secret, "messages", value)
            .await
    }

    /// Posts one change of webhook field `field` to `url`, signed; records the outcome.
    pub(crate) async fn post_webhook_field(
        &self,
        url: &str,
        secret: &str,
        field: &str,
        value: Value,
    ) -> bool {
        let payload = json!({
            "object": "whatsapp_business_account",
            "entry": [{"id": "WABA-SANDBOX", "changes": [{"field": field, "value": value}]}]
        });
        let body = payload.to_string();
        let result = self
            .http
            .post(url)
            .header("Content-Type", "application/json")
            .header("X-Hub-Signature-256", signature(secret, body.as_bytes()))
            .body(body)
            .send()
            .await;
        let ok = matches!(&result, Ok(r) if r.status().is_success());
        let mut inner = self.inner.lock().expect("sandbox");
        if ok {
            inner.stats.webhooks_sent += 1
        } else {
            inner.stats.webhooks_failed += 1
        }
        ok
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn messages(&self) -> Vec<ReceivedMessage> {
        self.inner.lock().expect("sandbox").messages.clone()
    }

    /// The business account's templates (the catalogue the sandbox serves and sends against).
    pub fn templates(&self) -> Vec<ApprovedTemplate> {
        self.inner.lock().expect("sandbox").config.templates.clone()
    }

    /// Replaces the business account's templates, as Meta's review (a pause, a rejection, an
    /// edit) would change them.
    pub fn set_templates(&self, templates: Vec<ApprovedTemplate>) {
        self.inner.lock().expect("sandbox").config.templates = templates;
    }

    /// Meta's review changes a template's status (`PAUSED`, `DISABLED`, `APPROVED` again, …) in
    /// every language: sends follow it at once, and a `message_template_status_update` webhook
    /// per language tells gridtalk (Meta's `event` is the new status).
    pub async fn set_template_status(&self, name: &str, status: &str) -> Result<(), String> {
        let (url, secret, languages, id) = {
            let mut inner = self.inner.lock().expect("sandbox");
            let url = inner.config.webhook_url.clone();
            let secret = inner.config.app_secret.clone();
            let position = inner
                .config
                .templates
                .iter()
                .position(|t| t.name == name)
                .ok_or_else(|| format!("no template {name}"))?;
            let template = &mut inner.config.templates[position];
            template.status = status.to_string();
            (
                url,
                secret,
                template.languages.clone(),
                1_000_000_000_000u64 + position as u64 * 100,
            )
        };
        let Some(url) = url else { return Ok(()) };
        for language in languages {
            let value = json!({
                "event": status,
                "message_template_id": id,
                "message_template_name": name,
                "message_template_language": language,
                "reason": if status == "APPROVED" { Value::Null } else { json!("LOW_QUALITY") },
            });
            self.post_webhook_field(&url, &secret, "message_template_status_update", value)
                .await;
        }
        Ok(())
    }

    /// The messages people sent, as delivered to gridtalk (and whether gridtalk marked them read).
    pub fn inbound(&self) -> Vec<InboundMessage> {
        self.inner.lock().expect("sandbox").inbound.clone()
    }

    /// Who holds the phone `digits`, if the sandbox was told.
    pub fn person(&self, digits: &str) -> Option<Person> {
        self.inner
            .lock()
            .expect("sandbox")
            .config
            .people
            .get(digits)
            .cloned()
    }

    /// The messages accepted after the first `skip` (for following along without copying all).
    pub fn messages_since(&self, skip: usize) -> Vec<ReceivedMessage> {
        self.inner
            .lock()
            .expect("sandbox")
            .messages
            .iter()
            .skip(skip)
            .cloned()
            .collect()
    }

    pub fn stats(&self) -> Stats {
        self.inner.lock().expect("sandbox").stats.clone()
    }

    pub fn set_faults(&self, faults: Faults) {
        self.inner.lock().expect("sandbox").config.faults = faults;
    }

    /// Replaces the accepted tokens: an empty list expires every token (error 190).
    pub fn set_valid_tokens(&self, tokens: Vec<String>) {
        let mut inner = self.inner.lock().expect("sandbox");
        let dropped: Vec<String> = inner
            .config
            .valid_tokens
            .iter()
            .filter(|t| !tokens.contains(t))
            .cloned()
            .collect();
        inner.expired_tokens.extend(dropped);
        for token in &tokens {
            inner.expired_tokens.remove(token);
        }
        inner.config.valid_tokens = tokens;
    }

    fn set_status(&self, wamid: &str, status: &str) {
        let mut inner = self.inner.lock().expect("sandbox");
        if let Some(m) = inner.messages.iter_mut().rev().find(|m| m.wamid == wamid) {
            m.status = Some(status.to_string());
        }
    }

    pub fn set_webhook_url(&self, url: Option<String>) {
        self.inner.lock().expect("sandbox").config.webhook_url = url;
    }

    /// Validates and, if allowed, accepts one request. Pure bookkeeping, no I/O.
    fn handle(
        &self,
        version: &str,
        phone_number_id: &str,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<ReceivedMessage, Response> {
        let mut inner = self.inner.lock().expect("sandbox");
        inner.stats.requests += 1;
        let result = validate_and_accept(&mut inner, version, phone_number_id, headers, body);
        match &result {
            Ok(_) => inner.stats.accepted += 1,
            Err((code, _)) => *inner.stats.errors.entry(code.to_string()).or_default() += 1,
        }
        result.map_err(|(_, response)| response)
    }

    fn schedule_statuses(&self, message: &ReceivedMessage) {
        let (url, secret, undeliverable) = {
            let inner = self.inner.lock().expect("sandbox");
            if !inner.config.auto_statuses {
                return;
            }
            (
                inner.config.webhook_url.clone(),
                inner.config.app_secret.clone(),
                inner.config.undeliverable.contains(&message.to),
            )
        };
        let Some(url) = url else { return };
        if let Some(participants) = self.participants_of(&message.to) {
            self.schedule_group_statuses(message, participants, url, secret);
            return;
        }
        let pricing = self.pricing_of(message);
        let sandbox = self.clone();
        let message = message.clone();
        tokio::spawn(async move {
            let statuses: &[(&str, u64)] = if undeliverable {
                &[("failed", 100)]
            } else {
                &[("sent", 50), ("delivered", 150), ("read", 400)]
            };
            for (status, delay_ms) in statuses {
                tokio::time::sleep(Duration::from_millis(*delay_ms)).await;
                sandbox.set_status(&message.wamid, status);
                let mut entry = json!({"id": message.wamid, "status": status,
                                       "timestamp": (chrono::Utc::now().timestamp()).to_string(),
                                       "recipient_id": message.to});
                echo_callback(&mut entry, &message);
                if *status == "failed" {
                    entry["errors"] = json!([{"code": 131026, "title": "Message undeliverable",
                        "message": "Message undeliverable",
                        "error_data": {"details": "Message could not be delivered to the recipient"}}]);
                } else if *status != "read" {
                    // Meta prices a message on `sent` and repeats it on one of delivered/read.
                    entry["pricing"] = pricing.clone();
                }
                let value = json!({
                    "messaging_product": "whatsapp",
                    "metadata": {"display_phone_number": "15550783881", "phone_number_id": message.phone_number_id},
                    "statuses": [entry]
                });
                sandbox.post_webhook(&url, &secret, value).await;
            }
        });
    }
}

impl Sandbox {
    /// The `pricing` of a delivered message, as Meta reports it since October 2026: a template
    /// is priced by its category, anything else (free-form, inside the service window) as
    /// `service`; both are charged (`regular`).
    fn pricing_of(&self, message: &ReceivedMessage) -> Value {
        let category = match &message.template {
            Some(name) => self
                .inner
                .lock()
                .expect("sandbox")
                .config
                .templates
                .iter()
                .find(|t| &t.name == name)
                .map_or_else(
                    || "utility".to_string(),
                    |t| t.category.to_ascii_lowercase(),
                ),
            None => "service".to_string(),
        };
        json!({"billable": true, "pricing_model": "PMP", "category": category, "type": "regular"})
    }

    /// A group message's statuses as Meta reports them: one group-level `sent`, then `delivered`
    /// and `read` for each participant (`recipient_participant_id`), each billed.
    fn schedule_group_statuses(
        &self,
        message: &ReceivedMessage,
        participants: Vec<String>,
        url: String,
        secret: String,
    ) {
        let pricing = self.pricing_of(message);
        let sandbox = self.clone();
        let message = message.clone();
        tokio::spawn(async move {
            let metadata = json!({"display_phone_number": "15550783881", "phone_number_id": message.phone_number_id});
            let status = |status: &str, participant: Option<&str>| {
                let mut entry = json!({"id": message.wamid, "status": status,
                                       "timestamp": chrono::Utc::now().timestamp().to_string(),
                                       "recipient_id": message.to, "recipient_type": "group"});
                echo_callback(&mut entry, &message);
                if let Some(p) = participant {
                    entry["recipient_participant_id"] = json!(p);
                    if status == "delivered" {
                        entry["pricing"] = pricing.clone();
                    }
                }
                json!({"messaging_product": "whatsapp", "metadata": metadata, "statuses": [entry]})
            };
            tokio::time::sleep(Duration::from_millis(50)).await;
            sandbox.set_status(&message.wamid, "sent");
            sandbox
                .post_webhook(&url, &secret, status("sent", None))
                .await;
            for (kind, delay_ms) in [("delivered", 150), ("read", 400)] {
                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                if !participants.is_empty() {
                    sandbox.set_status(&message.wamid, kind);
                }
                for p in &participants {
                    sandbox
                        .post_webhook(&url, &secret, status(kind, Some(p)))
                        .await;
                }
            }
        });
    }
}

/// Meta echoes a send's `biz_opaque_callback_data` in every status of the message.
fn echo_callback(status: &mut Value, message: &ReceivedMessage) {
    if let Some(callback) = message.request.get("biz_opaque_callback_data") {
        status["biz_opaque_callback_data"] = callback.clone();
    }
}

/// Meta's limit on `biz_opaque_callback_data`.
const MAX_CALLBACK_DATA_CHARS: usize = 512;

type Rejection = (i64, Response);

fn reject(status: StatusCode, code: i64, title: &str, details: &str) -> Rejection {
    (code, graph_error(status, code, title, details))
}

fn invalid(details: &str) -> Rejection {
    reject(StatusCode::BAD_REQUEST, 100, "Invalid parameter", details)
}

/// The bearer token is one the sandbox accepts, and the phone-number id is one of its numbers;
/// Meta's OAuth and object errors otherwise.
fn authorize(inner: &Inner, phone_number_id: &str, headers: &HeaderMap) -> Result<(), Rejection> {
    authenticate(inner, headers)?;
    if !inner
        .config
        .phone_number_ids
        .iter()
        .any(|p| p == phone_number_id)
    {
        return Err(invalid(&format!(
            "Unsupported post request. Object with ID '{phone_number_id}' does not exist"
        )));
    }
    Ok(())
}

/// The bearer token is one the sandbox accepts; Meta's OAuth errors otherwise (104 without a
/// token, 190 with subcode 463 for an expired one, 190 for one it cannot parse).
fn authenticate(inner: &Inner, headers: &HeaderMap) -> Result<(), Rejection> {
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            oauth_error(
                104,
                None,
                "An access token is required to request this resource.",
            )
        })?;
    if !inner.config.valid_tokens.iter().any(|t| t == token) {
        return Err(if inner.expired_tokens.contains(token) {
            let now = chrono::Utc::now();
            oauth_error(
                190,
                Some(463),
                &format!(
                    "Error validating access token: Session has expired on {}. The current time is {}.",
                    (now - chrono::Duration::hours(1)).format("%A, %d-%b-%y %H:%M:%S UTC"),
                    now.format("%A, %d-%b-%y %H:%M:%S UTC")
                ),
            )
        } else {
            oauth_error(
                190,
                None,
                "Invalid OAuth access token - Cannot parse access token",
            )
        });
    }
    Ok(())
}

fn validate_and_accept(
    inner: &mut Inner,
    _version: &str,
    phone_number_id: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<ReceivedMessage, Rejection> {
    authorize(inner, phone_number_id, headers)?;
    let request: Value = serde_json::from_slice(body)
        .map_err(|e| invalid(&format!("request body is not JSON: {e}")))?;
    if request.get("messaging_product").and_then(Value::as_str) != Some("whatsapp") {
        return Err(invalid("messaging_product must be \"whatsapp\""));
    }
    let input = request
        .get("to")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("The parameter to is required."))?;
    let to = if request.get("recipient_type").and_then(Value::as_str) == Some("group") {
        groups::check_group_send(inner, phone_number_id, &request)?
    } else {
        recipient_digits(input).ok_or_else(|| {
            invalid(&format!(
                "to: {input:?} is not a valid WhatsApp phone number"
            ))
        })?
    };
    let to = to.as_str();
    if let Some(code) = inner.config.refusals.get(to) {
        // 131047 is about free-form messages only: a template still goes.
        let template = request.get("type").and_then(Value::as_str) == Some("template");
        if !(*code == 131047 && template) {
            return Err(documented_refusal(*code));
        }
    }
    match request.get("biz_opaque_callback_data") {
        None => {}
        Some(Value::String(data)) if data.chars().count() <= MAX_CALLBACK_DATA_CHARS => {}
        Some(Value::String(_)) => {
            return Err(invalid(&format!(
                "biz_opaque_callback_data: at most {MAX_CALLBACK_DATA_CHARS} characters"
            )))
        }
        Some(_) => return Err(invalid("biz_opaque_callback_data must be a string")),
    }
    let kind = request
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("text");
    // Outside the 24-hour customer service window only templates may be sent.
    if kind != "template" {
        let now_ms = chrono::Utc::now().timestamp_millis();
        let open = inner
            .last_inbound_ms
            .get(to)
            .is_some_and(|at| now_ms - at < 24 * 3_600_000);
        if !open {
            return Err(reject(
                StatusCode::BAD_REQUEST,
                131047,
                "Re-engagement message",
                "Message failed to send because more than 24 hours have passed since the customer last replied to this number.",
            ));
        }
    }
    let mut buttons = Vec::new();
    let mut list_rows = Vec::new();
    let (template, language, parameters, rendered) = match kind {
        "template" => {
            let (parts, titles) = validate_template(inner, &request)?;
            buttons = titles;
            parts
        }
        "text" => {
            let text = request
                .pointer("/text/body")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid("text.body is required"))?;
            if text.chars().count() > 4096 {
                return Err(invalid("text.body is longer than 4096 characters"));
            }
            (None, None, vec![text.to_string()], text.to_string())
        }
        "interactive" => {
            let body = request
                .pointer("/interactive/body/text")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid("interactive.body.text is required"))?;
            if body.chars().count() > 1024 {
                return Err(reject(
                    StatusCode::BAD_REQUEST,
                    131009,
                    "Parameter value is not valid",
                    "interactive body is longer than 1024 characters",
                ));
            }
            if let Some(requested) = request
                .pointer("/interactive/action/buttons")
                .and_then(Value::as_array)
            {
                if requested.is_empty() || requested.len() > 3 {
                    return Err(reject(
                        StatusCode::BAD_REQUEST,
                        131009,
                        "Parameter value is not valid",
                        "buttons must have 1 to 3 entries",
                    ));
                }
                let mut titles = std::collections::HashSet::new();
                for b in requested {
                    let title = b
                        .pointer("/reply/title")
                        .and_then(Value::as_str)
                        .unwrap_or("");
                    let id = b.pointer("/reply/id").and_then(Value::as_str).unwrap_or("");
                    if title.is_empty() || title.chars().count() > 20 || !titles.insert(title) {
                        return Err(reject(
                            StatusCode::BAD_REQUEST,
                            131009,
                            "Parameter value is not valid",
                            "button titles must be unique and 1 to 20 characters",
                        ));
                    }
                    if id.is_empty() || id.len() > 256 {
                        return Err(reject(
                            StatusCode::BAD_REQUEST,
                            131009,
                            "Parameter value is not valid",
                            "button ids must be 1 to 256 characters",
                        ));
                    }
                    buttons.push(title.to_string());
                }
            }
            if let Some(sections) = request
                .pointer("/interactive/action/sections")
                .and_then(Value::as_array)
            {
                for row in sections
                    .iter()
                    .filter_map(|s| s.get("rows").and_then(Value::as_array))
                    .flatten()
                {
                    let text = |key: &str| row.get(key).and_then(Value::as_str).unwrap_or("");
                    if text("id").is_empty()
                        || text("id").len() > 200
                        || text("title").is_empty()
                        || text("title").chars().count() > 24
                        || text("description").chars().count() > 72
                    {
                        return Err(reject(
                            StatusCode::BAD_REQUEST,
                            131009,
                            "Parameter value is not valid",
                            "list rows need an id (at most 200), a title (at most 24) and at most 72 characters of description",
                        ));
                    }
                    list_rows.push((
                        text("id").to_string(),
                        text("title").to_string(),
                        text("description").to_string(),
                    ));
                }
                if list_rows.is_empty() || list_rows.len() > 10 {
                    return Err(reject(
                        StatusCode::BAD_REQUEST,
                        131009,
                        "Parameter value is not valid",
                        "a list has 1 to 10 rows",
                    ));
                }
            }
            (None, None, vec![body.to_string()], body.to_string())
        }
        other => {
            return Err(invalid(&format!(
                "message type {other} is not supported by the sandbox"
            )))
        }
    };
    let now = Instant::now();
    // Throughput: at most N accepted messages per number in any one-second window.
    let limit = inner.config.throughput_per_second as usize;
    let window = inner.window.entry(phone_number_id.to_string()).or_default();
    while window
        .front()
        .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
    {
        window.pop_front();
    }
    if window.len() >= limit {
        return Err(reject(StatusCode::BAD_REQUEST, 130429, "Rate limit hit", "Message failed to send because there were too many messages sent from this phone number in a short period of time"));
    }
    // Pair limit: GCRA with emission interval T and burst B.
    let interval = Duration::from_millis(inner.config.pair_interval_ms);
    let tolerance = interval * inner.config.pair_burst.saturating_sub(1);
    let key = (phone_number_id.to_string(), to.to_string());
    let tat = inner.pair_tat.get(&key).copied().unwrap_or(now).max(now);
    if tat.duration_since(now) > tolerance {
        return Err(reject(StatusCode::BAD_REQUEST, 131056, "(Business Account, Consumer Account) pair rate limit hit", "Message failed to send because there were too many messages sent from this phone number to the same phone number in a short period of time"));
    }
    inner.pair_tat.insert(key, tat + interval);
    inner
        .window
        .entry(phone_number_id.to_string())
        .or_default()
        .push_back(now);
    let id = inner.next_id;
    inner.next_id += 1;
    let wamid = meta_shaped_wamid(to, id);
    let message = ReceivedMessage {
        wamid,
        phone_number_id: phone_number_id.to_string(),
        to: to.to_string(),
        template,
        language,
        parameters,
        rendered,
        buttons,
        list_rows,
        status: None,
        request,
        received_at_ms: chrono::Utc::now().timestamp_millis(),
    };
    inner.messages.push(message.clone());
    Ok(message)
}

type TemplateParts = (Option<String>, Option<String>, Vec<String>, String);

/// Validates a template message; returns its parts and the titles of its quick-reply buttons.
fn validate_template(
    inner: &Inner,
    request: &Value,
) -> Result<(TemplateParts, Vec<String>), Rejection> {
    let name = request
        .pointer("/template/name")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("template.name is required"))?;
    let language = request
        .pointer("/template/language/code")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("template.language.code is required"))?;
    let missing = || {
        reject(
            StatusCode::NOT_FOUND,
            132001,
            "Template name does not exist in the translation",
            &format!("template name ({name}) does not exist in {language}"),
        )
    };
    let approved = inner
        .config
        .templates
        .iter()
        .find(|t| t.name == name)
        .ok_or_else(missing)?;
    if !approved.languages.iter().any(|l| l == language) {
        return Err(missing());
    }
    match approved.status.to_ascii_uppercase().as_str() {
        "APPROVED" => {}
        "PAUSED" => {
            return Err(reject(
                StatusCode::BAD_REQUEST,
                132015,
                "Template is Paused",
                &format!("template {name} is paused because of low quality"),
            ))
        }
        "DISABLED" => {
            return Err(reject(
                StatusCode::BAD_REQUEST,
                132016,
                "Template is Disabled",
                &format!("template {name} is disabled because of low quality"),
            ))
        }
        _ => return Err(missing()),
    }
    let components = request
        .pointer("/template/components")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut body_params = Vec::new();
    let mut quick_replies = 0;
    for c in &components {
        // Meta reads component types and sub-types case-insensitively ("BODY", "QUICK_REPLY",
        // as several SDKs send them).
        let lower = |key: &str| {
            c.get(key)
                .and_then(Value::as_str)
                .map(str::to_ascii_lowercase)
        };
        match lower("type").as_deref() {
            Some("body") => {
                for p in c
                    .get("parameters")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default()
                {
                    let text = p.get("text").and_then(Value::as_str).ok_or_else(|| {
                        reject(
                            StatusCode::BAD_REQUEST,
                            132012,
                            "Parameter format does not match format in the created template",
                            "body parameters must be text",
                        )
                    })?;
                    if text.contains('\n') || text.contains('\t') || text.contains("     ") {
                        return Err(reject(StatusCode::BAD_REQUEST, 132008, "Template parameter value is invalid", "Param text cannot have new-line/tab characters or more than 4 consecutive spaces"));
                    }
                    body_params.push(text.to_string());
                }
            }
            Some("button") if lower("sub_type").as_deref() == Some("quick_reply") => {
                let payload = c
                    .pointer("/parameters/0/payload")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                if payload.is_empty() || payload.len() > 256 {
                    return Err(invalid("quick_reply payload must be 1 to 256 characters"));
                }
                quick_replies += 1;
            }
            _ => {}
        }
    }
    if body_params.len() != approved.body_parameters {
        return Err(reject(StatusCode::BAD_REQUEST, 132000, "Number of parameters does not match the expected number of params", &format!("body: number of localizable_params ({}) does not match the expected number of params ({})", body_params.len(), approved.body_parameters)));
    }
    if quick_replies > approved.quick_replies {
        return Err(reject(
            StatusCode::BAD_REQUEST,
            132000,
            "Number of parameters does not match the expected number of params",
            &format!(
                "buttons: {quick_replies} quick replies but the template has {}",
                approved.quick_replies
            ),
        ));
    }
    let translation = approved.translations.get(language);
    let mut rendered = translation.map_or(&approved.text, |t| &t.text).clone();
    for (i, p) in body_params.iter().enumerate() {
        rendered = rendered.replace(&format!("{{{{{}}}}}", i + 1), p);
    }
    let titles = translation
        .map(|t| &t.button_titles)
        .filter(|titles| !titles.is_empty())
        .unwrap_or(&approved.button_titles)
        .iter()
        .take(quick_replies)
        .cloned()
        .collect();
    Ok((
        (
            Some(name.to_string()),
            Some(language.to_string()),
            body_params,
            rendered,
        ),
        titles,
    ))
}

async fn send_message(
    State(sandbox): State<Sandbox>,
    Path((version, phone_number_id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let faults = sandbox.inner.lock().expect("sandbox").config.faults.clone();
    let (fail, slow) = {
        let mut rng = rand::rng();
        (
            rng.random_bool(faults.server_error_rate.clamp(0.0, 1.0)),
            rng.random_bool(faults.slow_rate.clamp(0.0, 1.0)),
        )
    };
    if fail {
        let mut inner = sandbox.inner.lock().expect("sandbox");
        inner.stats.requests += 1;
        *inner.stats.errors.entry("500".into()).or_default() += 1;
        return (StatusCode::INTERNAL_SERVER_ERROR, "upstream unavailable").into_response();
    }
    // Meta goes on with a request whose caller stopped waiting (a client timeout): the work runs
    // in its own task, which the caller's disconnect does not cancel.
    let work = tokio::spawn(async move {
        if slow {
            tokio::time::sleep(Duration::from_millis(faults.slow_ms)).await;
        }
        let read_mark = serde_json::from_slice::<Value>(&body)
            .ok()
            .filter(|r| r.get("status").and_then(Value::as_str) == Some("read"));
        match read_mark {
            Some(request) => mark_read(&sandbox, &phone_number_id, &headers, &request),
            None => accept_message(&sandbox, &version, &phone_number_id, &headers, &body),
        }
    });
    work.await
        .unwrap_or_else(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response())
}

/// `GET /{version}/{waba-id}/message_templates`: the business account's templates as Meta lists
/// them, one entry per language (`name`, `language`, `status`, `category`, `id`, `components`
/// with the `BODY` text and the `BUTTONS`), `limit` per page (default 25) with an `after`
/// cursor and `paging.next`. Only the sandbox's business account id is known (100 otherwise).
async fn message_templates(
    State(sandbox): State<Sandbox>,
    Path((version, waba)): Path<(String, String)>,
    axum::extract::Query(query): axum::extract::Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let inner = sandbox.inner.lock().expect("sandbox");
    if let Err((_, refused)) = authenticate(&inner, &headers) {
        return refused;
    }
    if waba != inner.config.business_account_id {
        return invalid(&format!(
            "Unsupported get request. Object with ID '{waba}' does not exist"
        ))
        .1;
    }
    let mut entries = Vec::new();
    for (n, t) in inner.config.templates.iter().enumerate() {
        for (l, language) in t.languages.iter().enumerate() {
            let text = t
                .translations
                .get(language)
                .map_or(t.text.as_str(), |tr| tr.text.as_str());
            let mut components = vec![json!({"type": "BODY", "text": text})];
            let kinds: Vec<String> = if t.button_kinds.is_empty() {
                vec!["QUICK_REPLY".to_string(); t.quick_replies]
            } else {
                t.button_kinds.clone()
            };
            if !kinds.is_empty() {
                let buttons: Vec<Value> = kinds
                    .iter()
                    .enumerate()
                    .map(|(i, kind)| {
                        let title = t
                            .button_titles
                            .get(i)
                            .cloned()
                            .unwrap_or_else(|| format!("Button {}", i + 1));
                        json!({"type": kind, "text": title})
                    })
                    .collect();
                components.push(json!({"type": "BUTTONS", "buttons": buttons}));
            }
            entries.push(json!({
                "name": t.name, "language": language, "status": t.status, "category": t.category,
                "id": format!("{}", 1_000_000_000_000u64 + (n as u64) * 100 + l as u64),
                "components": components,
            }));
        }
    }
    let limit: usize = query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .unwrap_or(25)
        .clamp(1, 1000);
    let after: usize = query.get("after").and_then(|a| a.parse().ok()).unwrap_or(0);
    let page: Vec<Value> = entries.iter().skip(after).take(limit).cloned().collect();
    let mut paging = json!({"cursors": {"before": after.to_string(), "after": (after + page.len()).to_string()}});
    if after + page.len() < entries.len() {
        paging["next"] = json!(format!(
            "{}/{version}/{waba}/message_templates?limit={limit}&after={}",
            sandbox.base_url(),
            after + page.len()
        ));
    }
    Json(json!({"data": page, "paging": paging})).into_response()
}

/// `"status": "read"` on the messages endpoint: marks an inbound message read (Meta's typing
/// indicator with `typing_indicator: {"type": "text"}`), answered `{"success": true}`. The
/// message must be one a person sent to this number; Meta answers 100 otherwise.
fn mark_read(
    sandbox: &Sandbox,
    phone_number_id: &str,
    headers: &HeaderMap,
    request: &Value,
) -> Response {
    let mut inner = sandbox.inner.lock().expect("sandbox");
    inner.stats.requests += 1;
    let checked = (|| {
        authorize(&inner, phone_number_id, headers)?;
        let id = request
            .get("message_id")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid("The parameter message_id is required."))?;
        let typing = match request.get("typing_indicator") {
            None => false,
            Some(t) if t.get("type").and_then(Value::as_str) == Some("text") => true,
            Some(_) => return Err(invalid("typing_indicator.type must be \"text\"")),
        };
        Ok((id.to_string(), typing))
    })();
    let (id, typing) = match checked {
        Ok(checked) => checked,
        Err((code, response)) => {
            *inner.stats.errors.entry(code.to_string()).or_default() += 1;
            return response;
        }
    };
    let now = chrono::Utc::now().timestamp_millis();
    let Some(message) = inner.inbound.iter_mut().find(|m| m.wamid == id) else {
        *inner.stats.errors.entry("100".into()).or_default() += 1;
        return invalid(&format!(
            "message_id: {id} is not a message this number received"
        ))
        .1;
    };
    message.read_at_ms.get_or_insert(now);
    message.typing_shown |= typing;
    inner.stats.read_marks += 1;
    Json(json!({"success": true})).into_response()
}

/// The answer to one send: accepted (statuses scheduled) or refused with Meta's error body.
fn accept_message(
    sandbox: &Sandbox,
    version: &str,
    phone_number_id: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    match sandbox.handle(version, phone_number_id, headers, body) {
        Ok(message) => {
            sandbox.schedule_statuses(&message);
            if message.request["recipient_type"] == "group" {
                // A group is nobody's WhatsApp id: no `contacts` entry.
                return Json(json!({
                    "messaging_product": "whatsapp",
                    "messages": [{"id": message.wamid, "message_status": "accepted"}],
                }))
                .into_response();
            }
            Json(json!({
                "messaging_product": "whatsapp",
                // `input` echoes `to` as written; `wa_id` is the digits.
                "contacts": [{"input": message.request["to"], "wa_id": message.to}],
                "messages": [{"id": message.wamid, "message_status": "accepted"}],
            }))
            .into_response()
        }
        Err(response) => response,
    }
}

/// `POST /_sandbox/messages/{wamid}/reply` with `{"button": {"index": 0}}` or
/// `{"text": {"body": "…"}}`: the recipient answers, and the signed webhook goes to gridtalk.
async fn reply_to_message(
    State(sandbox): State<Sandbox>,
    axum::extract::Path(wamid): axum::extract::Path<String>,
    Json(reply): Json<Reply>,
) -> Response {
    match sandbox.reply(&wamid, reply).await {
        Ok(id) => Json(json!({"inbound_wamid": id})).into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, Json(json!({"error": e}))).into_response(),
    }
}

/// The phones page: every contact's chat, live.
async fn page() -> axum::response::Html<&'static str> {
    axum::response::Html(include_str!("phones.html"))
}

/// What the phones page shows: messages received from gridtalk and what people sent back.
async fn conversations(State(sandbox): State<Sandbox>) -> Json<Value> {
    let inner = sandbox.inner.lock().expect("sandbox");
    Json(json!({
        "messages": inner.messages,
        "inbound": inner.inbound,
        "business_name": inner.config.business_name,
        "people": inner.config.people,
        "groups": inner.groups,
    }))
}

async fn list_messages(State(sandbox): State<Sandbox>) -> Json<Vec<ReceivedMessage>> {
    Json(sandbox.messages())
}

async fn clear_messages(State(sandbox): State<Sandbox>) -> StatusCode {
    sandbox.inner.lock().expect("sandbox").messages.clear();
    StatusCode::NO_CONTENT
}

async fn stats(State(sandbox): State<Sandbox>) -> Json<Stats> {
    Json(sandbox.stats())
}

async fn set_faults(State(sandbox): State<Sandbox>, Json(faults): Json<Faults>) -> StatusCode {
    sandbox.set_faults(faults);
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
struct Tokens {
    valid: Vec<String>,
}

async fn set_tokens(State(sandbox): State<Sandbox>, Json(tokens): Json<Tokens>) -> StatusCode {
    sandbox.set_valid_tokens(tokens.valid);
    StatusCode::NO_CONTENT
}

/// The approved-template list matching gridtalk's template configuration.
pub fn templates_from_config(
    templates: &[gridtalk_config::TemplateConfig],
) -> Vec<ApprovedTemplate> {
    templates
        .iter()
        .map(|t| ApprovedTemplate {
            name: t.name.clone(),
            languages: t.languages.clone(),
            body_parameters: t.body.len(),
            quick_replies: t.buttons.len(),
            category: t.category.to_ascii_uppercase(),
            status: approved(),
            button_kinds: Vec::new(),
            text: t.text.clone(),
            button_titles: t.buttons.iter().map(|b| b.title.clone()).collect(),
            translations: t
                .translations
                .iter()
                .map(|(language, translation)| {
                    (
                        language.clone(),
                        Translation {
                            text: translation.text.clone(),
                            button_titles: translation.buttons.clone(),
                        },
                    )
                })
                .collect(),
        })
        .collect()
}

/// A message id shaped like Meta's: `wamid.` and the base64 of a structure that holds the other
/// party's phone number (as digits) and a message id, e.g.
/// `wamid.HBgLMTQxNTU1NTAxMDEVAgARGBI…`. Real wamids leak the number this way, so the sandbox's
/// do too, and a test can prove that gridtalk never logs one in clear.
fn meta_shaped_wamid(phone: &str, id: u64) -> String {
    use base64::Engine;
    let digits: String = phone.chars().filter(char::is_ascii_digit).collect();
    let mut bytes = vec![0x1c, 0x18, digits.len() as u8];
    bytes.extend_from_slice(digits.as_bytes());
    bytes.extend_from_slice(&[0x15, 0x02, 0x00, 0x11, 0x18, 0x12]);
    bytes.extend_from_slice(format!("{id:018X}").as_bytes());
    bytes.push(0x00);
    format!(
        "wamid.{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}
