//! The conversation state of the contacts of the partitions a converse process owns, and the
//! interpretation of what they send back. Pure: no Kafka, no clock (the caller passes `now`), so
//! every rule here is tested directly.
//!
//! What it guarantees, given the items of one contact in order:
//! - a webhook item is answered at most once (redeliveries are dropped by item id);
//! - a delivery status only ever moves a message forward (sent → delivered → read, or failed), so
//!   statuses arriving out of order end in the right state and a stale one publishes nothing;
//! - a button counts only if its token verifies (signature, expiry) and names the request of the
//!   message it quotes, and only from a contact the directory authorises for that request;
//! - a request is decided once: the first valid decision wins, later ones are refused politely;
//! - every refusal yields an audit record, never a response.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};

use serde_json::Value;
use sha2::{Digest, Sha256};

use gridtalk_contract::WebhookItem;
use gridtalk_contract::{AuditRecord, OutboxMessage, ResponseBody, SentMessage, WorkflowResponse};
use gridtalk_directory::{Contact, Directory};
use gridtalk_whatsapp::buttons::{self, TokenError};

use crate::wording::{words, Wording};

/// What kind of request a sent message opened, from the event that caused it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RequestKind {
    PoAcknowledgement,
    Approval,
    Onboarding,
    InvoiceCorrection,
    ShipmentException,
    Case,
    /// A notice (status, alert, summary) or gridtalk's own confirmation: nothing to decide.
    Notice,
}

impl RequestKind {
    pub fn of_event_type(event_type: &str) -> Self {
        match event_type {
            "tg.po.received" | "tg.po.ack_overdue" => RequestKind::PoAcknowledgement,
            "wf.approval.requested" => RequestKind::Approval,
            "tg.onboarding.reminder" => RequestKind::Onboarding,
            "tg.invoice.correction_required" => RequestKind::InvoiceCorrection,
            "tg.shipment.exception" => RequestKind::ShipmentException,
            "wf.case.opened" | "wf.case.updated" => RequestKind::Case,
            _ => RequestKind::Notice,
        }
    }

    fn code(self) -> &'static str {
        match self {
            RequestKind::PoAcknowledgement => "po",
            RequestKind::Approval => "approval",
            RequestKind::Onboarding => "onboarding",
            RequestKind::InvoiceCorrection => "invoice",
            RequestKind::ShipmentException => "shipment",
            RequestKind::Case => "case",
            RequestKind::Notice => "notice",
        }
    }

    pub(crate) fn from_code(code: &str) -> Option<Self> {
        [
            RequestKind::PoAcknowledgement,
            RequestKind::Approval,
            RequestKind::Onboarding,
            RequestKind::InvoiceCorrection,
            RequestKind::ShipmentException,
            RequestKind::Case,
            RequestKind::Notice,
        ]
        .into_iter()
        .find(|k| k.code() == code)
    }

    /// Whether `action` settles the request (first one wins) rather than adding to it. A promise
    /// (`WILL_SUBMIT`, `WILL_RESEND`) or a question adds to it: what follows still answers it.
    fn is_final(self, action: &str) -> bool {
        !matches!(
            action,
            "NEED_INFO" | "NEED_HELP" | "NEW_ETA" | "COMMENT" | "WILL_SUBMIT" | "WILL_RESEND"
        ) && self.decidable()
    }

    /// Whether only a button can answer it: free text about it is a comment
    /// ([`COMMENT_RESPONSE_TYPE`]), never a decision (a text cannot approve or accept anything).
    fn decided_by_buttons_only(self) -> bool {
        matches!(self, RequestKind::PoAcknowledgement | RequestKind::Approval)
    }

    fn decidable(self) -> bool {
        !matches!(self, RequestKind::Case | RequestKind::Notice)
    }

    /// Whether the request is open for free text until decided (cases stay open).
    fn takes_free_text(self) -> bool {
        self != RequestKind::Notice
    }

    pub(crate) fn response_type(self) -> &'static str {
        match self {
            RequestKind::PoAcknowledgement => "wa.po.ack_decision",
            RequestKind::Approval => "wa.approval.decided",
            RequestKind::Onboarding => "wa.onboarding.acknowledged",
            RequestKind::InvoiceCorrection => "wa.invoice.correction_ack",
            RequestKind::ShipmentException => "wa.shipment.exception_response",
            RequestKind::Case | RequestKind::Notice => "wa.case.message_received",
        }
    }
}

/// The response type of free text about a request that text cannot answer: an approval or a
/// purchase order (only their buttons decide them), or any request already decided. Its body is a
/// `CaseMessage` whose `case_id` is the request's id. A workflow that switches on the response type
/// so never takes a text, or anything said after the decision, for a (second) decision.
pub const COMMENT_RESPONSE_TYPE: &str = "wa.request.comment";

/// A request a person can answer: one document or workflow request, whichever messages asked it.
#[derive(Debug, Clone)]
struct Request {
    kind: RequestKind,
    id: String,
    correlation_id: String,
    event_id: String,
    partner_id: String,
    /// WhatsApp id → directory contact id of everyone it was sent to.
    recipients: HashMap<String, String>,
    decided: Option<Decision>,
}

impl Request {
    fn reference(&self) -> RequestRef {
        RequestRef {
            kind: self.kind.code().into(),
            id: self.id.clone(),
            correlation_id: self.correlation_id.clone(),
            event_id: self.event_id.clone(),
            partner_id: self.partner_id.clone(),
        }
    }
}

#[derive(Debug, Clone)]
struct Decision {
    action: String,
    by_contact: String,
}

/// What the sent log says about one message gridtalk sent.
#[derive(Debug, Clone)]
struct Sent {
    request: (RequestKind, String),
    correlation_id: String,
    event_id: String,
    contact_id: String,
    partner_id: String,
    wa_id: String,
    /// The flow of the event it was about, as metric label ([`gridtalk_contract::flow_label_of`]).
    flow: &'static str,
    /// Rank of the last status applied (0 none, 1 sent, 2 delivered, 3 read, 4 failed).
    status_rank: u8,
    /// The sent-log (and webhook) partition it came from: dropped with the partition.
    partition: i32,
    /// When WhatsApp accepted it: evicted `Settings::retention_ms` later.
    accepted_at_ms: i64,
}

/// The pricing category of a status Meta charges for: `pricing.type` `regular` (the free types
/// are `free_customer_service` and `free_entry_point`), or, on older payloads without a type, the
/// deprecated `billable: true`. Categories outside Meta's list are `other` (bounded labels).
fn charged_category(status: &Value) -> Option<String> {
    const CATEGORIES: [&str; 7] = [
        "authentication",
        "authentication-international",
        "marketing",
        "marketing_lite",
        "utility",
        "service",
        "referral_conversion",
    ];
    let pricing = status.get("pricing")?;
    let charged = match pricing.get("type").and_then(Value::as_str) {
        Some(kind) => kind == "regular",
        None => pricing.get("billable").and_then(Value::as_bool) == Some(true),
    };
    if !charged {
        return None;
    }
    let category = pricing.get("category").and_then(Value::as_str)?;
    Some(
        CATEGORIES
            .iter()
            .find(|c| **c == category)
            .map_or("other", |c| c)
            .to_string(),
    )
}

fn status_rank(status: &str) -> Option<u8> {
    match status {
        "sent" => Some(1),
        "delivered" => Some(2),
        "read" => Some(3),
        "failed" => Some(4),
        _ => None,
    }
}

#[derive(Debug)]
struct ContactState {
    /// Time of the person's last message (Meta's timestamp), for the customer service window.
    last_inbound_ms: i64,
    /// Requests sent to them that free text can attach to, oldest first.
    open: BTreeSet<(RequestKind, String)>,
    /// The partition the contact's messages and replies are on.
    partition: i32,
}

impl ContactState {
    fn on(partition: i32) -> Self {
        ContactState {
            last_inbound_ms: 0,
            open: BTreeSet::new(),
            partition,
        }
    }
}

/// Something restored from the changelog before the sent log showed what it belongs to.
#[derive(Debug)]
struct Pending<T> {
    value: T,
    partition: i32,
    restored_at_ms: i64,
}

/// Settings of the interpretation.
#[derive(Debug, Clone)]
pub struct Settings {
    pub button_secret: Vec<u8>,
    pub service_window_ms: i64,
    pub confirmation_template: String,
    pub confirmation_languages: Vec<String>,
    pub phone_number_id: String,
    pub remembered_items: usize,
    /// How long a sent message (and the requests and contacts only it keeps) stays in memory:
    /// at least as long as its buttons stay valid.
    pub retention_ms: i64,
}

/// What handling one item produced, in the order to publish it.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Response(WorkflowResponse),
    Audit(AuditRecord),
    /// A reply to the person, for the outbox.
    Reply(OutboxMessage),
    /// A deciding tap, for the decisions topic: the one owner of its request settles it (see
    /// [`crate::settle`]), so "first decision wins" holds across processes.
    Candidate(Box<Candidate>),
    /// A message for the outbox that is not a reply to an answer (a reminder, an escalation).
    Outbox(Box<OutboxMessage>),
    /// A command for a request's clock, for the decisions topic (see [`crate::overdue`]).
    Clock(Box<gridtalk_clock::ClockCommand>),
    /// Meta charges for the message the status `response_id` reports on: counted once, with
    /// that response (`gridtalk_whatsapp_billable_messages_total`), nothing published.
    Billed {
        response_id: String,
        category: String,
        flow: &'static str,
    },
}

/// What a response or a reply needs to know about the request it answers.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RequestRef {
    /// [`RequestKind`]'s code (`po`, `approval`, …).
    pub kind: String,
    pub id: String,
    pub correlation_id: String,
    pub event_id: String,
    pub partner_id: String,
}

/// A verified, authorised deciding tap, not yet settled: the first candidate of its request on
/// the decisions topic wins. Carries what the settlement needs to answer either way.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Candidate {
    pub request: RequestRef,
    pub action: String,
    /// The button's title as the person saw it.
    pub title: String,
    pub contact_id: String,
    pub contact_language: Option<String>,
    /// The wamid the tap quoted, if any.
    pub context: Option<String>,
    /// Whether the person's customer service window is open (a free-form reply is allowed).
    pub inside_window: bool,
    pub item_id: String,
    /// The person's WhatsApp id.
    pub wa_id: String,
    /// The business number they wrote to.
    pub phone_number_id: Option<String>,
    /// Meta's time of the tap.
    pub at_ms: i64,
}

impl Candidate {
    /// The decisions topic's key, and the settlement's: one per request.
    pub fn request_key(&self) -> String {
        format!("{}:{}", self.request.kind, self.request.id)
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a candidate serialises")
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("not a decision candidate: {e}"))
    }
}

/// The result of offering an item.
#[derive(Debug, Clone, PartialEq)]
pub enum Handled {
    /// Done; `outcomes` may be empty (a redelivery, a stale status, an item of no interest).
    Done {
        outcome: &'static str,
        outcomes: Vec<Outcome>,
    },
    /// The item refers to message `wamid`, which the sent log has not shown yet: offer it again
    /// once it has (or with `give_up` after the join wait).
    Wait { wamid: String },
}

fn done(outcome: &'static str, outcomes: Vec<Outcome>) -> Handled {
    Handled::Done { outcome, outcomes }
}

/// The state of the conversations of the contacts this process owns.
#[derive(Debug)]
pub struct Conversations {
    settings: Settings,
    sent: HashMap<String, Sent>,
    requests: HashMap<(RequestKind, String), Request>,
    /// The request each correlation id opened, for gridtalk's own replies about it.
    by_correlation: HashMap<String, (RequestKind, String)>,
    contacts: HashMap<String, ContactState>,
    seen: HashSet<String>,
    seen_order: VecDeque<String>,
    /// Decisions restored from the changelog for requests the sent log has not shown yet.
    restored_decisions: HashMap<(RequestKind, String), Pending<Decision>>,
    /// Status ranks restored from the changelog for messages the sent log has not shown yet.
    restored_ranks: HashMap<String, Pending<u8>>,
    /// Changes since the last [`Conversations::take_changes`], for the state changelog.
    changes: Vec<(String, String)>,
}

fn short_hash(parts: &[&str]) -> String {
    hex::encode(&Sha256::digest(parts.join("\u{1f}"))[..16])
}

/// WhatsApp's group webhooks: a created group's id and invite link (what the operator puts in
/// the directory), and who joined or left. Logged; nothing is published.
fn log_group_updates(item: &WebhookItem) {
    let field = item.item.get("field").and_then(Value::as_str).unwrap_or("");
    if !field.starts_with("group_") {
        return;
    }
    let groups = item
        .item
        .pointer("/value/groups")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for group in &groups {
        let at = |key: &str| group.get(key).and_then(Value::as_str).unwrap_or("-");
        match field {
            "group_lifecycle_update" => tracing::info!(
                kind = at("type"),
                group_id = at("group_id"),
                subject = at("subject"),
                invite_link = at("invite_link"),
                request_id = at("request_id"),
                "WhatsApp group created or changed: add it to the directory as a contact with this whatsapp_group_id"
            ),
            _ => tracing::info!(
                field,
                kind = at("type"),
                group_id = at("group_id"),
                "WhatsApp group update"
            ),
        }
    }
}

fn str_at<'a>(value: &'a Value, pointer: &str) -> Option<&'a str> {
    value.pointer(pointer).and_then(Value::as_str)
}

/// Meta's `timestamp` (unix seconds as a string) in milliseconds.
pub(crate) fn meta_time_ms(item: &Value) -> Option<i64> {
    str_at(item, "/timestamp")
        .and_then(|t| t.parse::<i64>().ok())
        .map(|s| s * 1000)
}

/// Parses `YYYY-MM-DD` anywhere in a text as midnight UTC, for a new ETA written by a person.
fn date_in(text: &str) -> Option<i64> {
    text.split(|c: char| c.is_whitespace() || c == ',')
        .find_map(|word| chrono::NaiveDate::parse_from_str(word.trim_matches('.'), "%Y-%m-%d").ok())
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc().timestamp_millis())
}

/// How a person answered.
#[derive(Debug, Clone)]
enum Answer {
    /// A quick-reply or interactive button/list row: its id/payload and title.
    Button { token: String, title: String },
    /// Text (or a caption or file name), possibly quoting a message.
    Text { text: String, document: bool },
}

impl Conversations {
    pub fn new(settings: Settings) -> Self {
        Conversations {
            settings,
            sent: HashMap::new(),
            requests: HashMap::new(),
            by_correlation: HashMap::new(),
            contacts: HashMap::new(),
            seen: HashSet::new(),
            seen_order: VecDeque::new(),
            restored_decisions: HashMap::new(),
            restored_ranks: HashMap::new(),
            changes: Vec::new(),
        }
    }

    /// The state changes made since the last call, as changelog entries (key, value): what must
    /// survive a restart so that a replayed webhook item is not answered twice.
    pub fn take_changes(&mut self) -> Vec<(String, String)> {
        std::mem::take(&mut self.changes)
    }

    /// Forgets what is older than `Settings::retention_ms`: sent messages, then every request,
    /// correlation and contact that only they kept, and restored entries the sent log never
    /// claimed. What a person sends about an evicted message is treated as about an unknown one (a
    /// button is audited as `unknown_message`, text opens a case), as after the sent log's own
    /// retention.
    pub fn evict(&mut self, now_ms: i64) {
        let horizon = now_ms.saturating_sub(self.settings.retention_ms);
        self.sent.retain(|_, s| s.accepted_at_ms >= horizon);
        self.restored_decisions
            .retain(|_, d| d.restored_at_ms >= horizon);
        self.restored_ranks
            .retain(|_, r| r.restored_at_ms >= horizon);
        self.prune(now_ms);
    }

    /// Drops everything about the contacts of `partition` (revoked: its new owner rebuilds it
    /// from the sent log and the changelog).
    pub fn drop_partition(&mut self, partition: i32, now_ms: i64) {
        self.sent.retain(|_, s| s.partition != partition);
        self.contacts.retain(|_, c| c.partition != partition);
        self.restored_decisions
            .retain(|_, d| d.partition != partition);
        self.restored_ranks.retain(|_, r| r.partition != partition);
        self.prune(now_ms);
    }

    /// Requests, correlations and contacts no remaining sent message refers to.
    fn prune(&mut self, now_ms: i64) {
        let referenced: HashSet<&(RequestKind, String)> =
            self.sent.values().map(|s| &s.request).collect();
        self.requests.retain(|key, _| referenced.contains(key));
        self.by_correlation
            .retain(|_, key| referenced.contains(key));
        let window_start = now_ms.saturating_sub(self.settings.service_window_ms);
        self.contacts.retain(|_, c| {
            c.open.retain(|key| referenced.contains(key));
            !c.open.is_empty() || c.last_inbound_ms >= window_start
        });
    }

    /// Entries held in memory (sent messages, requests, contacts, restored entries), for the
    /// `gridtalk_state_entries{store="converse_memory"}` gauge.
    pub fn len(&self) -> usize {
        self.sent.len()
            + self.requests.len()
            + self.contacts.len()
            + self.restored_decisions.len()
            + self.restored_ranks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Applies entries read back from the state changelog (see [`Conversations::take_changes`]).
    /// Applies the changelog entries of webhook `partition` restored at `now_ms`.
    pub fn restore(
        &mut self,
        partition: i32,
        entries: impl IntoIterator<Item = (String, String)>,
        now_ms: i64,
    ) {
        for (key, value) in entries {
            let Some((kind, rest)) = key.split_once(':') else {
                continue;
            };
            match kind {
                "seen" => self.remember(rest),
                "status" => {
                    let rank: u8 = value.parse().unwrap_or(0);
                    match self.sent.get_mut(rest) {
                        Some(sent) => sent.status_rank = sent.status_rank.max(rank),
                        None => {
                            let r =
                                self.restored_ranks
                                    .entry(rest.to_string())
                                    .or_insert(Pending {
                                        value: 0,
                                        partition,
                                        restored_at_ms: now_ms,
                                    });
                            r.value = r.value.max(rank);
                        }
                    }
                }
                "decided" => {
                    let Some((kind, request)) = rest.split_once(':') else {
                        continue;
                    };
                    let Some(kind) = RequestKind::from_code(kind) else {
                        continue;
                    };
                    let (action, by_contact) = value.split_once('\u{1f}').unwrap_or((&value, ""));
                    let decision = Decision {
                        action: action.to_string(),
                        by_contact: by_contact.to_string(),
                    };
                    let key = (kind, request.to_string());
                    match self.requests.get_mut(&key) {
                        Some(r) => {
                            r.decided.get_or_insert(decision);
                        }
                        None => {
                            self.restored_decisions.insert(
                                key,
                                Pending {
                                    value: decision,
                                    partition,
                                    restored_at_ms: now_ms,
                                },
                            );
                        }
                    }
                }
                _ => {}
            }
        }
        self.changes.clear();
    }

    /// Applies one sent-log record. Idempotent: the sent log is re-read from its start whenever a
    /// partition is assigned.
    pub fn apply_sent(&mut self, partition: i32, sent: &SentMessage) {
        if self.sent.contains_key(&sent.wamid) {
            return;
        }
        // gridtalk's own replies (confirmations) belong to the request they answered, so a person
        // quoting one continues that request.
        let own_reply = sent.event_type.starts_with("gridtalk.");
        let key = match self.by_correlation.get(&sent.correlation_id) {
            Some(key) if own_reply => key.clone(),
            _ => (
                RequestKind::of_event_type(&sent.event_type),
                sent.document_key.clone(),
            ),
        };
        let kind = key.0;
        if !own_reply && kind != RequestKind::Notice {
            self.by_correlation
                .entry(sent.correlation_id.clone())
                .or_insert_with(|| key.clone());
        }
        let request = self.requests.entry(key.clone()).or_insert_with(|| Request {
            kind,
            id: sent.document_key.clone(),
            correlation_id: sent.correlation_id.clone(),
            event_id: sent.event_id.clone(),
            partner_id: sent.partner_id.clone(),
            recipients: HashMap::new(),
            decided: None,
        });
        if let Some(decision) = self.restored_decisions.remove(&key) {
            request.decided.get_or_insert(decision.value);
        }
        // gridtalk's own replies add no recipient.
        if !own_reply {
            request
                .recipients
                .insert(sent.wa_id.clone(), sent.contact_id.clone());
            if kind.takes_free_text() && request.decided.is_none() {
                self.contacts
                    .entry(sent.wa_id.clone())
                    .or_insert_with(|| ContactState::on(partition))
                    .open
                    .insert(key.clone());
            }
        }
        self.sent.insert(
            sent.wamid.clone(),
            Sent {
                request: key,
                correlation_id: sent.correlation_id.clone(),
                event_id: sent.event_id.clone(),
                contact_id: sent.contact_id.clone(),
                partner_id: sent.partner_id.clone(),
                wa_id: sent.wa_id.clone(),
                flow: gridtalk_contract::flow_label_of(&sent.event_type),
                status_rank: self
                    .restored_ranks
                    .remove(&sent.wamid)
                    .map_or(0, |r| r.value),
                partition,
                accepted_at_ms: sent.accepted_at,
            },
        );
    }

    fn remember(&mut self, item_id: &str) {
        self.changes
            .push((format!("seen:{item_id}"), String::new()));
        if self.seen.insert(item_id.to_string()) {
            self.seen_order.push_back(item_id.to_string());
            while self.seen_order.len() > self.settings.remembered_items.max(1) {
                if let Some(old) = self.seen_order.pop_front() {
                    self.seen.remove(&old);
                }
            }
        }
    }

    /// Offers one webhook item. With `give_up`, an item whose message is still unknown is judged
    /// now (audited as unknown) instead of waiting.
    pub fn handle(
        &mut self,
        partition: i32,
        item: &WebhookItem,
        directory: &Directory,
        now_ms: i64,
        give_up: bool,
    ) -> Handled {
        if self.seen.contains(&item.item_id) {
            return done("redelivery", Vec::new());
        }
        let handled = match item.kind.as_str() {
            "status" => self.status(item, give_up),
            "message" => self.message(partition, item, directory, now_ms, give_up),
            "other" => {
                log_group_updates(item);
                done("ignored", Vec::new())
            }
            _ => done("ignored", Vec::new()),
        };
        if matches!(handled, Handled::Done { .. }) {
            self.remember(&item.item_id);
        }
        handled
    }

    fn status(&mut self, item: &WebhookItem, give_up: bool) -> Handled {
        let v = &item.item;
        let (Some(wamid), Some(status)) = (str_at(v, "/id"), str_at(v, "/status")) else {
            return done("ignored", Vec::new());
        };
        let Some(rank) = status_rank(status) else {
            return done("ignored", Vec::new());
        };
        let Some(sent) = self.sent.get_mut(wamid) else {
            if !give_up {
                return Handled::Wait {
                    wamid: wamid.to_string(),
                };
            }
            let audit = self.audit(
                item,
                "unknown_message",
                format!("status {status} for message {wamid}, which gridtalk did not send"),
                None,
                None,
                None,
            );
            return done("unknown", vec![Outcome::Audit(audit)]);
        };
        // Meta prices a message on `sent` and repeats it on `delivered` or `read`: the first
        // status applied counts it (a `read` that overtook the rest carries it too). A group
        // message is priced per participant, on each participant's own status.
        let per_participant = v.get("recipient_participant_id").is_some();
        let billed = (per_participant || sent.status_rank == 0)
            .then(|| charged_category(v))
            .flatten()
            .map(|category| Outcome::Billed {
                response_id: item.item_id.clone(),
                category,
                flow: sent.flow,
            });
        if rank <= sent.status_rank {
            return done("stale_status", billed.into_iter().collect());
        }
        sent.status_rank = rank;
        self.changes
            .push((format!("status:{wamid}"), rank.to_string()));
        let error = v.pointer("/errors/0");
        let body = ResponseBody::DeliveryStatus {
            status: status.to_ascii_uppercase(),
            error_code: error
                .and_then(|e| e.get("code"))
                .and_then(Value::as_i64)
                .map(|c| c as i32),
            error_title: error
                .and_then(|e| e.get("title").or_else(|| e.get("message")))
                .and_then(Value::as_str)
                .map(String::from),
        };
        let response = WorkflowResponse {
            response_id: item.item_id.clone(),
            response_type: "wa.message.status".into(),
            correlation_id: sent.correlation_id.clone(),
            in_reply_to_event_id: Some(sent.event_id.clone()),
            request_id: Some(sent.request.1.clone()),
            contact_id: Some(sent.contact_id.clone()),
            partner_id: Some(sent.partner_id.clone()),
            wa_message_id: wamid.to_string(),
            wa_context_message_id: None,
            received_at: meta_time_ms(v).unwrap_or(item.received_at_ms),
            body,
        };
        let mut outcomes = vec![Outcome::Response(response)];
        outcomes.extend(billed);
        done("status", outcomes)
    }

    fn answer_of(v: &Value) -> Option<Answer> {
        let kind = str_at(v, "/type")?;
        let button = |id: Option<&str>, title: Option<&str>| {
            id.map(|id| Answer::Button {
                token: id.to_string(),
                title: title.unwrap_or(id).to_string(),
            })
        };
        match kind {
            "button" => button(str_at(v, "/button/payload"), str_at(v, "/button/text")),
            "interactive" => match str_at(v, "/interactive/type")? {
                "button_reply" => button(
                    str_at(v, "/interactive/button_reply/id"),
                    str_at(v, "/interactive/button_reply/title"),
                ),
                "list_reply" => button(
                    str_at(v, "/interactive/list_reply/id"),
                    str_at(v, "/interactive/list_reply/title"),
                ),
                _ => None,
            },
            "text" => Some(Answer::Text {
                text: str_at(v, "/text/body")?.to_string(),
                document: false,
            }),
            "document" | "image" => Some(Answer::Text {
                text: str_at(v, &format!("/{kind}/caption"))
                    .or_else(|| str_at(v, &format!("/{kind}/filename")))
                    .unwrap_or(kind)
                    .to_string(),
                document: true,
            }),
            _ => None,
        }
    }

    fn message(
        &mut self,
        partition: i32,
        item: &WebhookItem,
        directory: &Directory,
        now_ms: i64,
        give_up: bool,
    ) -> Handled {
        let v = &item.item;
        if let Some(group) = str_at(v, "/group_id") {
            // A member writing in a WhatsApp group: groups receive only what asks no answer, so
            // nothing said there answers a request, opens a case or is the member writing to the
            // business one to one (nor does it open their own service window).
            tracing::debug!(
                group,
                "a message in a WhatsApp group; not an answer, ignored"
            );
            return done("group_message", Vec::new());
        }
        let from = item.contact.clone();
        let context = str_at(v, "/context/id").map(String::from);
        if let Some(quoted) = &context {
            if !self.sent.contains_key(quoted) && !give_up {
                return Handled::Wait {
                    wamid: quoted.clone(),
                };
            }
        }
        let at = meta_time_ms(v).unwrap_or(item.received_at_ms);
        {
            let state = self
                .contacts
                .entry(from.clone())
                .or_insert_with(|| ContactState::on(partition));
            state.last_inbound_ms = state.last_inbound_ms.max(at);
        }
        let Some(answer) = Self::answer_of(v) else {
            return done("ignored", Vec::new());
        };
        match answer {
            Answer::Button { token, title } => {
                self.button(item, directory, now_ms, context, &token, &title)
            }
            Answer::Text { text, document } => {
                self.text(item, directory, context, text, document, at)
            }
        }
    }

    /// The contact the directory knows for `wa_id`, preferring the one the request was sent to.
    fn contact_of<'d>(
        directory: &'d Directory,
        request: Option<&Request>,
        wa_id: &str,
    ) -> Option<&'d Contact> {
        request
            .and_then(|r| r.recipients.get(wa_id))
            .and_then(|id| directory.contact(id))
            .or_else(|| directory.contact_by_wa_id(wa_id))
    }

    /// Whether the contact behind `wa_id` may answer `request`: the designated approver (someone it
    /// was sent to) for approvals, the partner's own contacts for its POs and onboarding, and for
    /// the others someone it was sent to or a contact of the partner.
    fn authorise(request: &Request, contact: Option<&Contact>, wa_id: &str) -> Result<(), String> {
        let Some(contact) = contact else {
            return Err(format!(
                "{} is not a contact in the directory",
                gridtalk_telemetry::mask_phone(wa_id)
            ));
        };
        let of_partner = contact.partner.as_deref() == Some(request.partner_id.as_str());
        let addressed = request.recipients.contains_key(wa_id);
        let allowed = match request.kind {
            RequestKind::Approval => addressed,
            RequestKind::PoAcknowledgement | RequestKind::Onboarding => of_partner,
            _ => of_partner || addressed,
        };
        if allowed {
            Ok(())
        } else {
            Err(format!(
                "contact {} is not authorised to answer {} {}",
                contact.id,
                request.kind.response_type(),
                request.id
            ))
        }
    }

    fn button(
        &mut self,
        item: &WebhookItem,
        directory: &Directory,
        now_ms: i64,
        context: Option<String>,
        token_text: &str,
        title: &str,
    ) -> Handled {
        let token = match buttons::verify(&self.settings.button_secret, token_text, now_ms / 1000) {
            Ok(token) => token,
            Err(e) => {
                let reason = match e {
                    TokenError::Expired => "token_expired",
                    TokenError::BadSignature => "token_forged",
                    TokenError::Malformed | TokenError::TooLong => "token_malformed",
                };
                let audit = self.audit(
                    item,
                    reason,
                    format!("button {title:?}: {e}"),
                    None,
                    None,
                    None,
                );
                return done("refused", vec![Outcome::Audit(audit)]);
            }
        };
        // The quoted message names the request; without a quote (some interactive replies) the
        // token's request id is looked up among the requests this contact was asked.
        let key = match context.as_deref().and_then(|c| self.sent.get(c)) {
            Some(sent) => Some(sent.request.clone()),
            None => self
                .requests
                .iter()
                .filter(|(k, r)| k.1 == token.request_id && r.kind.decidable())
                .map(|(k, _)| k.clone())
                .next(),
        };
        let Some(key) = key else {
            let audit = self.audit(
                item,
                "unknown_message",
                format!(
                    "button {} for {} answers no message gridtalk sent",
                    token.action, token.request_id
                ),
                Some(&token.request_id),
                Some(&token.action),
                None,
            );
            return done("unknown", vec![Outcome::Audit(audit)]);
        };
        let request = self
            .requests
            .get(&key)
            .expect("sent messages have requests");
        let correlation = Some(request.correlation_id.clone());
        if token.request_id != request.id || !request.kind.decidable() {
            let audit = self.audit(
                item,
                "token_forged",
                format!(
                    "button token names {} but the quoted message is about {}",
                    token.request_id, request.id
                ),
                Some(&token.request_id),
                Some(&token.action),
                correlation,
            );
            return done("refused", vec![Outcome::Audit(audit)]);
        }
        let contact = Self::contact_of(directory, Some(request), &item.contact);
        if let Err(detail) = Self::authorise(request, contact, &item.contact) {
            let mut audit = self.audit(
                item,
                "unauthorised_contact",
                detail,
                Some(&token.request_id),
                Some(&token.action),
                correlation,
            );
            audit.contact_id = contact.map(|c| c.id.clone());
            return done("refused", vec![Outcome::Audit(audit)]);
        }
        let contact = contact.expect("authorised contacts exist").clone();
        let request = request.clone();
        let is_final = request.kind.is_final(&token.action);
        if is_final {
            // Settled by the one owner of the request (first candidate wins), wherever the other
            // people it was sent to are served. Locally the request counts as decided from now
            // on: what this person writes after it is a comment either way.
            let key = (request.kind, request.id.clone());
            if request.decided.is_none() {
                self.changes.push((
                    format!("decided:{}:{}", key.0.code(), key.1),
                    format!("{}\u{1f}{}", token.action, contact.id),
                ));
                if let Some(r) = self.requests.get_mut(&key) {
                    r.decided = Some(Decision {
                        action: token.action.clone(),
                        by_contact: contact.id.clone(),
                    });
                    for wa_id in r.recipients.keys() {
                        if let Some(state) = self.contacts.get_mut(wa_id) {
                            state.open.remove(&key);
                        }
                    }
                }
            }
            let candidate = Candidate {
                request: request.reference(),
                action: token.action.clone(),
                title: title.to_string(),
                contact_id: contact.id.clone(),
                contact_language: contact.language.clone(),
                context,
                inside_window: self.inside_window(&item.contact, now_ms),
                item_id: item.item_id.clone(),
                wa_id: item.contact.clone(),
                phone_number_id: item.phone_number_id.clone(),
                at_ms: meta_time_ms(&item.item).unwrap_or(item.received_at_ms),
            };
            return done("candidate", vec![Outcome::Candidate(Box::new(candidate))]);
        }
        let body = body_for(request.kind, &request.id, Some(&token.action), None, false);
        let response = self.response(item, &request, &contact, context, body);
        let wording = match token.action.as_str() {
            "NEW_ETA" => Wording::AskForEta { id: &request.id },
            _ => Wording::Noted {
                title,
                id: &request.id,
            },
        };
        let (text, note) = words(contact.language.as_deref(), wording);
        let reply = self.reply(item, &request, &contact, "recorded", text, note, now_ms);
        done(
            "answered",
            vec![Outcome::Response(response), Outcome::Reply(reply)],
        )
    }

    fn text(
        &mut self,
        item: &WebhookItem,
        directory: &Directory,
        context: Option<String>,
        text: String,
        document: bool,
        at: i64,
    ) -> Handled {
        let from = item.contact.as_str();
        // A quoted message names the request; otherwise the contact's single open request does.
        let quoted = context.as_deref().and_then(|c| self.sent.get(c));
        if let Some(sent) = quoted {
            if sent.wa_id != from {
                let audit = self.audit(
                    item,
                    "unauthorised_contact",
                    format!(
                        "{} quotes a message sent to someone else",
                        gridtalk_telemetry::mask_phone(from)
                    ),
                    Some(&sent.request.1),
                    None,
                    Some(sent.correlation_id.clone()),
                );
                return done("refused", vec![Outcome::Audit(audit)]);
            }
        }
        let key = match quoted {
            Some(sent) => Some(sent.request.clone()),
            None => {
                let open = self
                    .contacts
                    .get(from)
                    .map(|c| c.open.iter().cloned().collect::<Vec<_>>())
                    .unwrap_or_default();
                (open.len() == 1).then(|| open[0].clone())
            }
        };
        let request = key.and_then(|k| self.requests.get(&k)).cloned();
        let contact = Self::contact_of(directory, request.as_ref(), from).cloned();
        let Some(request) = request.filter(|r| r.kind != RequestKind::Notice) else {
            // Nothing to attach to: the text opens a case, correlated to the message it quotes
            // if any, else to itself.
            let correlation_id = quoted
                .map(|s| s.correlation_id.clone())
                .unwrap_or_else(|| format!("wa:{}", item.item_id));
            let response = WorkflowResponse {
                response_id: item.item_id.clone(),
                response_type: RequestKind::Case.response_type().into(),
                correlation_id,
                in_reply_to_event_id: quoted.map(|s| s.event_id.clone()),
                request_id: None,
                contact_id: contact.as_ref().map(|c| c.id.clone()),
                partner_id: contact
                    .as_ref()
                    .and_then(|c| c.partner.clone())
                    .or_else(|| quoted.map(|s| s.partner_id.clone())),
                wa_message_id: item.item_id.clone(),
                wa_context_message_id: context,
                received_at: at,
                body: ResponseBody::CaseMessage {
                    case_id: None,
                    text,
                },
            };
            return done("answered", vec![Outcome::Response(response)]);
        };
        let Some(contact) = contact else {
            let audit = self.audit(
                item,
                "unauthorised_contact",
                format!(
                    "{} is not a contact in the directory",
                    gridtalk_telemetry::mask_phone(from)
                ),
                Some(&request.id),
                None,
                Some(request.correlation_id.clone()),
            );
            return done("refused", vec![Outcome::Audit(audit)]);
        };
        if let Some(decided) = &request.decided {
            tracing::debug!(
                request = %request.id,
                decided = %decided.action,
                by = %decided.by_contact,
                "text after a decision: a comment"
            );
        }
        if request.decided.is_some() || request.kind.decided_by_buttons_only() {
            let body = ResponseBody::CaseMessage {
                case_id: Some(request.id.clone()),
                text,
            };
            let mut response = self.response(item, &request, &contact, context, body);
            response.response_type = COMMENT_RESPONSE_TYPE.into();
            return done("comment", vec![Outcome::Response(response)]);
        }
        let body = body_for(request.kind, &request.id, None, Some(text), document);
        let response = self.response(item, &request, &contact, context, body);
        done("answered", vec![Outcome::Response(response)])
    }

    fn response(
        &self,
        item: &WebhookItem,
        request: &Request,
        contact: &Contact,
        context: Option<String>,
        body: ResponseBody,
    ) -> WorkflowResponse {
        WorkflowResponse {
            response_id: item.item_id.clone(),
            response_type: request.kind.response_type().into(),
            correlation_id: request.correlation_id.clone(),
            in_reply_to_event_id: Some(request.event_id.clone()),
            request_id: Some(request.id.clone()),
            contact_id: Some(contact.id.clone()),
            partner_id: Some(request.partner_id.clone()),
            wa_message_id: item.item_id.clone(),
            wa_context_message_id: context,
            received_at: meta_time_ms(&item.item).unwrap_or(item.received_at_ms),
            body,
        }
    }

    fn audit(
        &self,
        item: &WebhookItem,
        reason: &str,
        detail: String,
        request_id: Option<&str>,
        action: Option<&str>,
        correlation_id: Option<String>,
    ) -> AuditRecord {
        AuditRecord {
            audit_id: format!("{}:{reason}", item.item_id),
            reason: reason.into(),
            stage: "converse".into(),
            detail,
            wa_id: Some(item.contact.clone()),
            contact_id: None,
            request_id: request_id.map(String::from),
            action: action.map(String::from),
            correlation_id,
            wa_message_id: Some(item.item_id.clone()),
            at: meta_time_ms(&item.item).unwrap_or(item.received_at_ms),
        }
    }

    /// Whether `wa_id`'s customer service window is open at `now_ms` (their last message is
    /// younger than the window).
    fn inside_window(&self, wa_id: &str, now_ms: i64) -> bool {
        let last_inbound = self.contacts.get(wa_id).map_or(0, |c| c.last_inbound_ms);
        now_ms - last_inbound < self.settings.service_window_ms
    }

    #[allow(clippy::too_many_arguments)]
    fn reply(
        &self,
        item: &WebhookItem,
        request: &Request,
        contact: &Contact,
        kind: &str,
        text: String,
        note: String,
        now_ms: i64,
    ) -> OutboxMessage {
        reply(
            &self.settings,
            &Addressee {
                item_id: &item.item_id,
                wa_id: &item.contact,
                phone_number_id: item.phone_number_id.as_deref(),
                contact_id: &contact.id,
                language: contact.language.as_deref(),
                inside_window: self.inside_window(&item.contact, now_ms),
            },
            &request.reference(),
            kind,
            (text, note),
            now_ms,
        )
    }
}

/// Who a reply goes to, and whether a free-form message may reach them.
pub(crate) struct Addressee<'a> {
    /// The inbound item the reply answers (its message id derives from it).
    pub item_id: &'a str,
    pub wa_id: &'a str,
    pub phone_number_id: Option<&'a str>,
    pub contact_id: &'a str,
    pub language: Option<&'a str>,
    pub inside_window: bool,
}

/// A reply to the person through the outbox: free-form inside their customer service window
/// (opened by the very message it answers, unless that is older than the window by now), else
/// the confirmation template with `note`. Its message id derives from the item and `kind`, so a
/// replayed item queues the same reply, which the send stage sends once.
pub(crate) fn reply(
    settings: &Settings,
    to: &Addressee<'_>,
    request: &RequestRef,
    kind: &str,
    (text, note): (String, String),
    now_ms: i64,
) -> OutboxMessage {
    let language = to
        .language
        .map(String::from)
        .filter(|l| settings.confirmation_languages.contains(l))
        .or_else(|| settings.confirmation_languages.first().cloned())
        .unwrap_or_else(|| "en_US".into());
    let template = &settings.confirmation_template;
    let templated = gridtalk_whatsapp::template_message(
        to.wa_id,
        template,
        &language,
        &[request.id.clone(), note],
        &[],
    );
    // Free-form text carries the template with it: the window may have closed by the time the
    // send stage sends it (or WhatsApp may disagree, 131047), and then the template goes.
    let (template_name, body, fallback) = if to.inside_window {
        (
            None,
            gridtalk_whatsapp::text_message(to.wa_id, &text),
            Some(templated.to_string()),
        )
    } else {
        (Some(template.clone()), templated, None)
    };
    // Answer from the number the person wrote to.
    let phone_number_id = to
        .phone_number_id
        .map(String::from)
        .unwrap_or_else(|| settings.phone_number_id.clone());
    OutboxMessage {
        message_id: short_hash(&[to.item_id, kind]),
        event_id: to.item_id.to_string(),
        event_type: format!("gridtalk.answer.{kind}"),
        correlation_id: request.correlation_id.clone(),
        document_key: request.id.clone(),
        partner_id: request.partner_id.clone(),
        phone_number_id,
        contact_id: to.contact_id.to_string(),
        recipient: to.wa_id.to_string(),
        template_name,
        language,
        request_json: body.to_string(),
        rule: format!("converse-{kind}"),
        created_at: now_ms,
        fallback_request_json: fallback,
    }
}

/// The outbox record that marks the message `reply` answers read, with the typing indicator,
/// from the number the reply goes from. Its message id derives from the reply's, so a replayed
/// item queues the same mark, which the send stage makes once.
pub(crate) fn read_mark(reply: &OutboxMessage) -> OutboxMessage {
    OutboxMessage {
        message_id: short_hash(&[&reply.message_id, "read"]),
        event_type: gridtalk_contract::READ_MARK_EVENT_TYPE.into(),
        template_name: None,
        request_json: gridtalk_whatsapp::mark_read_with_typing(&reply.event_id).to_string(),
        rule: format!("{}-read", reply.rule),
        fallback_request_json: None,
        ..reply.clone()
    }
}

pub(crate) fn title_case(action: &str) -> String {
    let lower = action.replace('_', " ").to_lowercase();
    let mut chars = lower.chars();
    chars
        .next()
        .map(|c| c.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

/// The typed body for an answer to `request`: a button `action`, or a `text` (a comment, a file).
pub(crate) fn body_for(
    kind: RequestKind,
    id: &str,
    action: Option<&str>,
    text: Option<String>,
    document: bool,
) -> ResponseBody {
    let id = id.to_string();
    let symbol = |allowed: &[&str]| {
        action
            .filter(|a| allowed.contains(a))
            .unwrap_or("UNKNOWN")
            .to_string()
    };
    match kind {
        RequestKind::PoAcknowledgement => ResponseBody::PoAckDecision {
            po_number: id,
            decision: symbol(&["ACCEPT", "ACCEPT_WITH_CHANGES", "REJECT"]),
            comment: text,
        },
        RequestKind::Approval => ResponseBody::ApprovalDecision {
            approval_id: id,
            decision: symbol(&["APPROVE", "REJECT", "NEED_INFO"]),
            comment: text,
        },
        RequestKind::Onboarding => ResponseBody::OnboardingAcknowledgement {
            onboarding_id: id,
            action: match (action, document) {
                (Some(_), _) => symbol(&["ACKNOWLEDGED", "WILL_SUBMIT", "SUBMITTED", "NEED_HELP"]),
                (None, true) => "SUBMITTED".into(),
                (None, false) => "ACKNOWLEDGED".into(),
            },
            item_code: None,
            comment: text,
        },
        RequestKind::InvoiceCorrection | RequestKind::ShipmentException => {
            let new_eta = text.as_deref().and_then(date_in);
            let answer = match (action, new_eta) {
                (Some(_), _) => symbol(&[
                    "ACKNOWLEDGED",
                    "WILL_RESEND",
                    "DISPUTE",
                    "NEW_ETA",
                    "COMMENT",
                ]),
                (None, Some(_)) if kind == RequestKind::ShipmentException => "NEW_ETA".into(),
                (None, _) => "COMMENT".into(),
            };
            ResponseBody::CorrectionAnswer {
                document_key: id,
                answer,
                new_eta: new_eta.filter(|_| kind == RequestKind::ShipmentException),
                comment: text,
            }
        }
        RequestKind::Case | RequestKind::Notice => ResponseBody::CaseMessage {
            case_id: Some(id),
            text: text.unwrap_or_else(|| action.unwrap_or_default().to_string()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SECRET: &[u8] = b"unit-test-button-secret";
    const NOW: i64 = 1_795_514_400_000;
    const HOUR: i64 = 3_600_000;

    fn directory() -> Directory {
        Directory::from_file_data(
            toml::from_str(
                r#"
[[partners]]
id = "ACME"
name = "ACME"
[[partners]]
id = "GLOBEX"
name = "Globex"
[[contacts]]
id = "acme-orders"
name = "ACME orders"
phone = "+15550100001"
partner = "ACME"
opted_in = true
[[contacts]]
id = "acme-dispatch"
name = "ACME dispatch"
phone = "+15550100003"
language = "es_MX"
partner = "ACME"
opted_in = true
[[contacts]]
id = "globex-orders"
name = "Globex orders"
phone = "+49151100007"
partner = "GLOBEX"
opted_in = true
[[contacts]]
id = "buyer"
name = "Buyer"
phone = "+14155550101"
opted_in = true
"#,
            )
            .unwrap(),
        )
    }

    fn settings() -> Settings {
        Settings {
            button_secret: SECRET.to_vec(),
            service_window_ms: 23 * HOUR + 30 * 60_000,
            confirmation_template: "answer_status".into(),
            confirmation_languages: vec!["en_US".into(), "es_MX".into()],
            phone_number_id: "1065".into(),
            remembered_items: 100,
            retention_ms: 7 * 24 * HOUR,
        }
    }

    fn conversations() -> Conversations {
        Conversations::new(settings())
    }

    fn sent(wamid: &str, event_type: &str, doc: &str, contact: &str, wa_id: &str) -> SentMessage {
        SentMessage {
            wamid: wamid.into(),
            message_id: format!("m-{wamid}"),
            event_id: format!("e-{doc}"),
            event_type: event_type.into(),
            correlation_id: format!("ACME|{doc}"),
            document_key: doc.into(),
            partner_id: "ACME".into(),
            phone_number_id: "1065".into(),
            contact_id: contact.into(),
            recipient: wa_id.into(),
            wa_id: wa_id.into(),
            template_name: Some("t".into()),
            message_status: "accepted".into(),
            attempts: 1,
            accepted_at: NOW,
        }
    }

    fn inbound(id: &str, from: &str, at_ms: i64, message: Value) -> WebhookItem {
        let mut item = message;
        item["from"] = json!(from);
        item["id"] = json!(id);
        item["timestamp"] = json!((at_ms / 1000).to_string());
        WebhookItem {
            kind: "message".into(),
            item_id: id.into(),
            contact: from.into(),
            phone_number_id: Some("1065".into()),
            profile_name: None,
            received_at_ms: at_ms,
            item,
        }
    }

    fn token(action: &str, request: &str) -> String {
        buttons::sign(SECRET, action, request, NOW / 1000 + 168 * 3600).unwrap()
    }

    /// What handling produced, with each deciding tap settled as the first on its request (the
    /// settlement itself is tested in `settle`).
    fn outcomes(handled: Handled) -> Vec<Outcome> {
        match handled {
            Handled::Done { outcomes, .. } => outcomes
                .into_iter()
                .flat_map(|o| match o {
                    Outcome::Candidate(c) => {
                        crate::settle::Settlements::new(settings()).settle(0, &c, NOW)
                    }
                    other => vec![other],
                })
                .collect(),
            Handled::Wait { wamid } => panic!("unexpected wait for {wamid}"),
        }
    }

    #[test]
    fn state_is_evicted_by_age_and_a_quote_of_an_evicted_message_is_unknown() {
        let mut c = conversations();
        let mut old = sent(
            "w-old",
            "tg.po.received",
            "PO-OLD",
            "acme-orders",
            "15550100001",
        );
        old.accepted_at = NOW - 8 * 24 * HOUR;
        c.apply_sent(0, &old);
        c.apply_sent(
            0,
            &sent(
                "w-new",
                "tg.po.received",
                "PO-NEW",
                "acme-dispatch",
                "15550100003",
            ),
        );
        let before = c.len();
        c.evict(NOW);
        assert!(c.len() < before, "the old message and its request left");
        assert!(c.sent.contains_key("w-new") && !c.sent.contains_key("w-old"));
        assert!(!c.requests.keys().any(|(_, id)| id == "PO-OLD"));
        assert!(
            !c.contacts.contains_key("15550100001"),
            "a contact only the old message kept, and quiet for longer than the window"
        );
        // A reply quoting the evicted message is judged as about an unknown message (after the
        // join wait): text then opens a case instead of joining the evicted request.
        let mut reply = inbound(
            "in-old",
            "15550100001",
            NOW,
            json!({"type": "text", "text": {"body": "ok"}}),
        );
        reply.item["context"] = json!({"id": "w-old"});
        assert_eq!(
            c.handle(0, &reply, &directory(), NOW, false),
            Handled::Wait {
                wamid: "w-old".into()
            }
        );
        let out = outcomes(c.handle(0, &reply, &directory(), NOW, true));
        assert!(
            matches!(&out[..], [Outcome::Response(r)]
                if r.body == ResponseBody::CaseMessage { case_id: None, text: "ok".into() }),
            "{out:?}"
        );
    }

    #[test]
    fn a_message_written_in_a_group_answers_nothing_and_opens_no_case() {
        let mut c = conversations();
        c.apply_sent(
            0,
            &sent("w0", "tg.po.received", "PO-0", "acme-orders", "15550100001"),
        );
        let mut chat = inbound(
            "in-group",
            "15550100001",
            NOW,
            json!({"type": "text", "text": {"body": "who has the ETA?"}}),
        );
        chat.item["group_id"] = json!("Y2FwaV9ncm91cDoxMjM0");
        assert_eq!(
            c.handle(0, &chat, &directory(), NOW, false),
            Handled::Done {
                outcome: "group_message",
                outcomes: Vec::new()
            }
        );
        assert!(
            c.contacts
                .get("15550100001")
                .is_none_or(|s| s.last_inbound_ms < NOW),
            "the member's own window did not open"
        );
    }

    #[test]
    fn a_revoked_partition_leaves_no_state_behind() {
        let mut c = conversations();
        c.apply_sent(
            0,
            &sent("w0", "tg.po.received", "PO-0", "acme-orders", "15550100001"),
        );
        c.apply_sent(
            1,
            &sent(
                "w1",
                "tg.po.received",
                "PO-1",
                "acme-dispatch",
                "15550100003",
            ),
        );
        c.restore(1, [("status:w-later".to_string(), "2".to_string())], NOW);
        c.drop_partition(1, NOW);
        assert!(c.sent.contains_key("w0") && !c.sent.contains_key("w1"));
        assert!(!c.contacts.contains_key("15550100003"));
        assert!(c.restored_ranks.is_empty());
        c.drop_partition(0, NOW);
        assert_eq!(c.len(), 0, "nothing left once every partition is gone");
    }

    #[test]
    fn interactive_replies_without_a_quote_find_their_request_by_token() {
        let mut c = conversations();
        c.apply_sent(
            0,
            &sent("w1", "tg.po.received", "PO-1", "acme-orders", "15550100001"),
        );
        let tap = inbound(
            "in1",
            "15550100001",
            NOW,
            json!({"type": "interactive", "interactive": {"type": "button_reply",
                   "button_reply": {"id": token("REJECT", "PO-1"), "title": "Reject"}}}),
        );
        let out = outcomes(c.handle(0, &tap, &directory(), NOW, false));
        let Outcome::Response(r) = &out[0] else {
            panic!("{out:?}")
        };
        assert_eq!(
            r.body,
            ResponseBody::PoAckDecision {
                po_number: "PO-1".into(),
                decision: "REJECT".into(),
                comment: None
            }
        );
        assert!(matches!(&out[1], Outcome::Reply(o) if o.template_name.is_none()));

        // A list row is read the same way.
        c.apply_sent(
            0,
            &sent(
                "w2",
                "tg.onboarding.reminder",
                "ONB-1",
                "acme-orders",
                "15550100001",
            ),
        );
        let pick = inbound(
            "in2",
            "15550100001",
            NOW,
            json!({"type": "interactive", "context": {"id": "w2"}, "interactive": {"type": "list_reply",
                   "list_reply": {"id": token("NEED_HELP", "ONB-1"), "title": "Need help", "description": ""}}}),
        );
        let out = outcomes(c.handle(0, &pick, &directory(), NOW, false));
        assert!(
            matches!(&out[0], Outcome::Response(r) if r.body == ResponseBody::OnboardingAcknowledgement {
            onboarding_id: "ONB-1".into(), action: "NEED_HELP".into(), item_code: None, comment: None })
        );
    }

    #[test]
    fn a_text_never_decides_and_what_follows_a_decision_is_a_comment() {
        let mut c = conversations();
        c.apply_sent(
            0,
            &sent("w1", "tg.po.received", "PO-1", "acme-orders", "15550100001"),
        );
        let text = |id: &str, quoted: &str, body: &str| {
            inbound(
                id,
                "15550100001",
                NOW,
                json!({"type": "text", "context": {"id": quoted}, "text": {"body": body}}),
            )
        };
        let comment_on = |out: &[Outcome], request: &str, words: &str| {
            assert_eq!(out.len(), 1, "{out:?}");
            let Outcome::Response(r) = &out[0] else {
                panic!("{out:?}")
            };
            assert_eq!(r.response_type, COMMENT_RESPONSE_TYPE);
            assert_eq!(r.request_id.as_deref(), Some(request));
            assert_eq!(
                r.body,
                ResponseBody::CaseMessage {
                    case_id: Some(request.into()),
                    text: words.into()
                }
            );
        };
        // Before any tap: "ok" is not an acceptance.
        let out = outcomes(c.handle(0, &text("t1", "w1", "ok"), &directory(), NOW, false));
        comment_on(&out, "PO-1", "ok");
        assert!(c.requests.values().all(|r| r.decided.is_none()));

        let tap = inbound(
            "t2",
            "15550100001",
            NOW,
            json!({"type": "button", "context": {"id": "w1"},
                   "button": {"payload": token("ACCEPT", "PO-1"), "text": "Accept"}}),
        );
        let out = outcomes(c.handle(0, &tap, &directory(), NOW, false));
        assert!(matches!(&out[0], Outcome::Response(r) if r.response_type == "wa.po.ack_decision"));
        // After it: a comment, not a second decision.
        let out = outcomes(c.handle(
            0,
            &text("t3", "w1", "sorry, I meant reject"),
            &directory(),
            NOW,
            false,
        ));
        comment_on(&out, "PO-1", "sorry, I meant reject");

        // A request text may answer (a shipment exception takes a new ETA from a text) is
        // answered by text until it is settled, then takes only comments.
        c.apply_sent(
            0,
            &sent(
                "w2",
                "tg.shipment.exception",
                "ASN-1",
                "acme-orders",
                "15550100001",
            ),
        );
        let out = outcomes(c.handle(
            0,
            &text("t4", "w2", "arrives 2026-12-03"),
            &directory(),
            NOW,
            false,
        ));
        assert!(matches!(&out[0], Outcome::Response(r)
            if matches!(&r.body, ResponseBody::CorrectionAnswer { answer, .. } if answer == "NEW_ETA")));
        let settle = inbound(
            "t5",
            "15550100001",
            NOW,
            json!({"type": "button", "context": {"id": "w2"},
                   "button": {"payload": token("ACKNOWLEDGED", "ASN-1"), "text": "OK"}}),
        );
        let out = outcomes(c.handle(0, &settle, &directory(), NOW, false));
        assert!(
            matches!(&out[0], Outcome::Response(r) if r.response_type == "wa.shipment.exception_response")
        );
        let out = outcomes(c.handle(
            0,
            &text("t6", "w2", "arrives 2026-12-04"),
            &directory(),
            NOW,
            false,
        ));
        comment_on(&out, "ASN-1", "arrives 2026-12-04");
    }

    #[test]
    fn outside_the_service_window_the_confirmation_is_the_template() {
        let mut c = conversations();
        c.apply_sent(
            0,
            &sent(
                "w1",
                "tg.po.received",
                "PO-2",
                "acme-dispatch",
                "15550100003",
            ),
        );
        // The tap happened 25 hours ago (the webhook was held up), the token is still valid.
        let tap = inbound(
            "in1",
            "15550100003",
            NOW - 25 * HOUR,
            json!({"type": "button", "context": {"id": "w1"},
                   "button": {"payload": token("ACCEPT", "PO-2"), "text": "Accept"}}),
        );
        let out = outcomes(c.handle(0, &tap, &directory(), NOW, false));
        let Some(Outcome::Reply(reply)) = out.get(1) else {
            panic!("{out:?}")
        };
        assert_eq!(reply.template_name.as_deref(), Some("answer_status"));
        assert_eq!(reply.language, "es_MX", "the contact's language");
        let request: Value = serde_json::from_str(&reply.request_json).unwrap();
        assert_eq!(request["type"], "template");
        assert_eq!(
            request["template"]["components"][0]["parameters"][0]["text"],
            "PO-2"
        );
    }

    #[test]
    fn items_about_unknown_messages_wait_then_are_audited() {
        let mut c = conversations();
        let status = WebhookItem {
            kind: "status".into(),
            item_id: "wx:read".into(),
            contact: "15550100001".into(),
            phone_number_id: None,
            profile_name: None,
            received_at_ms: NOW,
            item: json!({"id": "wx", "status": "read", "timestamp": "1795514400", "recipient_id": "15550100001"}),
        };
        assert_eq!(
            c.handle(0, &status, &directory(), NOW, false),
            Handled::Wait { wamid: "wx".into() }
        );
        let out = outcomes(c.handle(0, &status, &directory(), NOW, true));
        assert!(matches!(&out[..], [Outcome::Audit(a)] if a.reason == "unknown_message"));
        // Once judged, a redelivery is dropped.
        assert_eq!(
            c.handle(0, &status, &directory(), NOW, true),
            Handled::Done {
                outcome: "redelivery",
                outcomes: vec![]
            }
        );
    }

    #[test]
    fn statuses_only_move_forward_and_failures_carry_metas_code() {
        let mut c = conversations();
        c.apply_sent(
            0,
            &sent(
                "w1",
                "tg.invoice.delivered",
                "INV-1",
                "acme-orders",
                "15550100001",
            ),
        );
        c.apply_sent(
            0,
            &sent(
                "w2",
                "tg.invoice.delivered",
                "INV-2",
                "acme-orders",
                "15550100001",
            ),
        );
        let status = |wamid: &str, state: &str, errors: Value| WebhookItem {
            kind: "status".into(),
            item_id: format!("{wamid}:{state}"),
            contact: "15550100001".into(),
            phone_number_id: None,
            profile_name: None,
            received_at_ms: NOW,
            item: json!({"id": wamid, "status": state, "timestamp": "1795514400",
                         "recipient_id": "15550100001", "errors": errors}),
        };
        let published = |c: &mut Conversations, item: WebhookItem| -> Vec<String> {
            outcomes(c.handle(0, &item, &directory(), NOW, false))
                .into_iter()
                .map(|o| match o {
                    Outcome::Response(r) => match r.body {
                        ResponseBody::DeliveryStatus { status, .. } => status,
                        other => panic!("{other:?}"),
                    },
                    other => panic!("{other:?}"),
                })
                .collect()
        };
        assert_eq!(
            published(&mut c, status("w1", "delivered", json!([]))),
            ["DELIVERED"]
        );
        assert_eq!(
            published(&mut c, status("w1", "sent", json!([]))),
            Vec::<String>::new()
        );
        assert_eq!(published(&mut c, status("w1", "read", json!([]))), ["READ"]);
        assert_eq!(
            published(&mut c, status("w1", "delivered", json!([]))),
            Vec::<String>::new()
        );

        let failed = status(
            "w2",
            "failed",
            json!([{"code": 131026, "title": "Message undeliverable"}]),
        );
        let out = outcomes(c.handle(0, &failed, &directory(), NOW, false));
        assert!(
            matches!(&out[..], [Outcome::Response(r)] if r.correlation_id == "ACME|INV-2"
            && r.body == ResponseBody::DeliveryStatus { status: "FAILED".into(),
                error_code: Some(131026), error_title: Some("Message undeliverable".into()) })
        );
    }

    #[test]
    fn each_charged_message_is_counted_once_by_category_and_flow_and_each_group_participant_too() {
        let mut c = conversations();
        for (wamid, event_type) in [
            ("w1", "tg.invoice.delivered"),
            ("w2", "tg.po.received"),
            ("w3", "tg.asn.sent"),
            ("g1", "ops.summary.published"),
        ] {
            c.apply_sent(
                0,
                &sent(wamid, event_type, wamid, "acme-orders", "15550100001"),
            );
        }
        let status = |wamid: &str, state: &str, extra: Value| {
            let mut v = json!({"id": wamid, "status": state, "timestamp": "1795514400",
                               "recipient_id": "15550100001"});
            let participant = extra
                .get("recipient_participant_id")
                .and_then(Value::as_str)
                .map(String::from);
            v.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            WebhookItem {
                kind: "status".into(),
                item_id: match participant {
                    Some(p) => format!("{wamid}:{state}:{p}"),
                    None => format!("{wamid}:{state}"),
                },
                contact: "15550100001".into(),
                phone_number_id: None,
                profile_name: None,
                received_at_ms: NOW,
                item: v,
            }
        };
        let billed = |c: &mut Conversations, item: WebhookItem| -> Vec<(String, &'static str)> {
            outcomes(c.handle(0, &item, &directory(), NOW, false))
                .into_iter()
                .filter_map(|o| match o {
                    Outcome::Billed { category, flow, .. } => Some((category, flow)),
                    _ => None,
                })
                .collect()
        };
        let utility =
            json!({"pricing": {"pricing_model": "PMP", "category": "utility", "type": "regular"}});
        // Priced on `sent`, repeated on `delivered`: counted once.
        assert_eq!(
            billed(&mut c, status("w1", "sent", utility.clone())),
            [("utility".to_string(), "b")]
        );
        assert!(billed(&mut c, status("w1", "delivered", utility.clone())).is_empty());
        assert!(billed(&mut c, status("w1", "read", json!({}))).is_empty());
        // A free customer-service message is not charged; an old payload says `billable`.
        let free = json!({"pricing": {"category": "service", "type": "free_customer_service"}});
        assert!(billed(&mut c, status("w2", "delivered", free)).is_empty());
        let old =
            json!({"pricing": {"billable": true, "pricing_model": "CBP", "category": "marketing"}});
        assert_eq!(
            billed(&mut c, status("w3", "read", old)),
            [("marketing".to_string(), "c")]
        );
        // A group message: each participant's priced status counts, a redelivery does not.
        assert!(billed(&mut c, status("g1", "sent", json!({}))).is_empty());
        for participant in ["15550100002", "15550100003"] {
            let mut priced = utility.clone();
            priced["recipient_participant_id"] = json!(participant);
            let item = status("g1", "delivered", priced);
            assert_eq!(billed(&mut c, item.clone()), [("utility".to_string(), "h")]);
            assert!(billed(&mut c, item).is_empty(), "a redelivery");
        }
    }

    #[test]
    fn only_the_partners_own_contacts_decide_its_purchase_orders() {
        let mut c = conversations();
        c.apply_sent(
            0,
            &sent(
                "w1",
                "tg.po.ack_overdue",
                "PO-3",
                "acme-orders",
                "15550100001",
            ),
        );
        // The escalation went to the buyer (internal) with the same buttons.
        c.apply_sent(
            0,
            &sent("w2", "tg.po.ack_overdue", "PO-3", "buyer", "14155550101"),
        );
        for (id, from, wamid) in [("in1", "14155550101", "w2"), ("in2", "49151100007", "w1")] {
            let tap = inbound(
                id,
                from,
                NOW,
                json!({"type": "button", "context": {"id": wamid},
                       "button": {"payload": token("ACCEPT", "PO-3"), "text": "Accept"}}),
            );
            let out = outcomes(c.handle(0, &tap, &directory(), NOW, false));
            assert!(
                matches!(&out[..], [Outcome::Audit(a)] if a.reason == "unauthorised_contact"),
                "{from}: {out:?}"
            );
        }
        // A token for another request on this message is refused as forged.
        let swapped = inbound(
            "in3",
            "15550100001",
            NOW,
            json!({"type": "button", "context": {"id": "w1"},
                   "button": {"payload": token("ACCEPT", "PO-999"), "text": "Accept"}}),
        );
        let out = outcomes(c.handle(0, &swapped, &directory(), NOW, false));
        assert!(matches!(&out[..], [Outcome::Audit(a)] if a.reason == "token_forged"));
    }

    #[test]
    fn a_new_eta_is_asked_for_and_read_from_the_next_text() {
        let mut c = conversations();
        c.apply_sent(
            0,
            &sent(
                "w1",
                "tg.shipment.exception",
                "SH-1",
                "acme-dispatch",
                "15550100003",
            ),
        );
        let tap = inbound(
            "in1",
            "15550100003",
            NOW,
            json!({"type": "button", "context": {"id": "w1"},
                   "button": {"payload": token("NEW_ETA", "SH-1"), "text": "Send new ETA"}}),
        );
        let out = outcomes(c.handle(0, &tap, &directory(), NOW, false));
        let Some(Outcome::Reply(prompt)) = out.get(1) else {
            panic!("{out:?}")
        };
        // In the contact's language (es_MX), citing the shipment.
        assert!(
            prompt
                .request_json
                .contains("nueva fecha estimada de llegada de SH-1 (AAAA-MM-DD)"),
            "{}",
            prompt.request_json
        );
        // The prompt itself comes back through the sent log; quoting it continues the exception.
        let mut confirmation = sent(
            "w2",
            "gridtalk.answer.recorded",
            "SH-1",
            "acme-dispatch",
            "15550100003",
        );
        confirmation.correlation_id = "ACME|SH-1".into();
        c.apply_sent(0, &confirmation);
        let text = inbound(
            "in2",
            "15550100003",
            NOW,
            json!({"type": "text", "context": {"id": "w2"}, "text": {"body": "New ETA 2026-12-01, sorry"}}),
        );
        let out = outcomes(c.handle(0, &text, &directory(), NOW, false));
        assert!(
            matches!(&out[..], [Outcome::Response(r)] if r.body == ResponseBody::CorrectionAnswer {
            document_key: "SH-1".into(), answer: "NEW_ETA".into(), new_eta: Some(1_796_083_200_000),
            comment: Some("New ETA 2026-12-01, sorry".into()) }),
            "{out:?}"
        );
    }
}
