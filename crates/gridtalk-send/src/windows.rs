//! Each recipient's 24-hour customer-service window, as the send stage knows it at send time.
//!
//! A person's message opens (or refreshes) their window for 24 hours; a member's message in a
//! WhatsApp group opens the group's. Outside it WhatsApp takes only approved templates and
//! answers anything else with `131047`. The inbound messages are on the webhook topic (keyed
//! by contact, so no send process owns "its" contacts there), so every send process follows the
//! whole topic from 24 hours back, outside any consumer group, and keeps the last message time
//! of each sender (Meta's timestamp), pruned as windows close. Until it has read what the topic
//! held when it started, it does not know ([`Windows::is_open`] is `None`) and the message goes
//! as it is; `131047` still brings the fallback then.
//!
//! A window is taken to close [`CLOSING_MARGIN_MS`] early: a message sent in its last minutes
//! may reach WhatsApp after it.
//!
//! The same reader keeps the templates Meta paused or disabled (`message_template_status_update`
//! webhooks, seeded from the catalogue at start and from 132015/132016 answers): their messages
//! are dead-lettered as `template_paused` instead of being sent, until Meta approves the
//! template again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gridtalk_config::KafkaConfig;
use gridtalk_contract::WebhookItem;
use gridtalk_kafka::changelog::TopicFollower;
use gridtalk_telemetry::Metrics;

/// How long a person's message keeps their window open.
pub(crate) const WINDOW_MS: i64 = 24 * 3_600_000;
/// A window is taken as closed this much before Meta closes it.
pub(crate) const CLOSING_MARGIN_MS: i64 = 5 * 60_000;
/// How often closed windows are forgotten and the gauge updated.
const PRUNE_EVERY: Duration = Duration::from_secs(30);

#[derive(Default)]
struct State {
    /// Last message time per sender (WhatsApp id, or group id for a group's members).
    last_inbound_ms: HashMap<String, i64>,
    caught_up: bool,
    /// Templates that may not be sent, by (name, language), with Meta's status.
    stopped_templates: HashMap<(String, String), String>,
}

/// Statuses in which Meta refuses a template's messages.
fn stops_sending(status: &str) -> bool {
    matches!(
        status.to_ascii_uppercase().as_str(),
        "PAUSED" | "DISABLED" | "REJECTED" | "PENDING_DELETION" | "DELETED"
    )
}

pub(crate) struct Windows {
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
}

impl Windows {
    /// Starts following `webhook_topic` from 24 hours back.
    pub(crate) fn follow(kafka: &KafkaConfig, webhook_topic: &str) -> Self {
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let reader = Reader {
            kafka: kafka.clone(),
            topic: webhook_topic.to_string(),
            state: state.clone(),
            stop: stop.clone(),
        };
        std::thread::Builder::new()
            .name("gridtalk-windows".into())
            .spawn(move || reader.run())
            .expect("a thread for the window reader");
        Windows { state, stop }
    }

    /// Meta's status of template `name` in `language` when it may not be sent (`PAUSED`, …).
    pub(crate) fn stopped_template(&self, name: &str, language: &str) -> Option<String> {
        self.state
            .lock()
            .expect("windows")
            .stopped_templates
            .get(&(name.to_string(), language.to_string()))
            .cloned()
    }

    /// Records a template's status (from the catalogue, a webhook or Meta's refusal).
    pub(crate) fn template_status(&self, name: &str, language: &str, status: &str) {
        set_template_status(
            &mut self.state.lock().expect("windows"),
            name,
            language,
            status,
        );
    }

    /// Whether `recipient`'s window is open at `now_ms`; `None` until the reader has caught up.
    pub(crate) fn is_open(&self, recipient: &str, now_ms: i64) -> Option<bool> {
        let state = self.state.lock().expect("windows");
        state.caught_up.then(|| {
            state
                .last_inbound_ms
                .get(recipient)
                .is_some_and(|at| open_at(*at, now_ms))
        })
    }
}

impl Drop for Windows {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

fn set_template_status(state: &mut State, name: &str, language: &str, status: &str) {
    let key = (name.to_string(), language.to_string());
    let upper = status.to_ascii_uppercase();
    if stops_sending(&upper) {
        if state.stopped_templates.insert(key, upper.clone()).is_none() {
            tracing::warn!(template = name, language, status = %upper, "WhatsApp stopped a template: its messages are dead-lettered as template_paused until Meta approves it again");
        }
    } else if matches!(upper.as_str(), "APPROVED" | "REINSTATED")
        && state.stopped_templates.remove(&key).is_some()
    {
        tracing::info!(
            template = name,
            language,
            "WhatsApp approved a template again: its messages are sent"
        );
    }
    Metrics::global()
        .state_entries
        .with_label_values(&["stopped_templates"])
        .set(state.stopped_templates.len() as i64);
}

fn open_at(last_inbound_ms: i64, now_ms: i64) -> bool {
    now_ms < last_inbound_ms + WINDOW_MS - CLOSING_MARGIN_MS
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

struct Reader {
    kafka: KafkaConfig,
    topic: String,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
}

impl Reader {
    fn run(self) {
        let deadline = Duration::from_millis(self.kafka.request_timeout_ms);
        // Until the topic can be read (the broker starting, the topic being created).
        let (follower, mut behind) = loop {
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            let started = gridtalk_kafka::end_offsets(&self.kafka, &self.topic).and_then(|ends| {
                let follower =
                    TopicFollower::since(&self.kafka, &self.topic, now_ms() - WINDOW_MS, deadline)?;
                Ok((follower, ends))
            });
            match started {
                Ok((follower, ends)) => {
                    // What is left to read before the windows are known: each partition up
                    // to its end when the reading began.
                    let behind: HashMap<i32, i64> = ends
                        .into_iter()
                        .filter(|(p, end)| {
                            follower
                                .starts()
                                .get(p)
                                .copied()
                                .flatten()
                                .is_some_and(|start| start < *end)
                        })
                        .collect();
                    break (follower, behind);
                }
                Err(e) => {
                    tracing::debug!(error = %e, topic = %self.topic, "webhook topic not readable yet for the service windows");
                    std::thread::sleep(Duration::from_secs(2));
                }
            }
        };
        let mut pruned = Instant::now();
        self.caught_up_if(&behind);
        while !self.stop.load(Ordering::Acquire) {
            match follower.next(Duration::from_millis(200)) {
                Ok(Some(followed)) => {
                    if let Some((name, language, status)) =
                        followed.payload.as_deref().and_then(template_status_update)
                    {
                        let mut state = self.state.lock().expect("windows");
                        set_template_status(&mut state, &name, &language, &status);
                    }
                    if let Some((sender, at_ms)) =
                        followed.payload.as_deref().and_then(inbound_message)
                    {
                        let mut state = self.state.lock().expect("windows");
                        let known = state.last_inbound_ms.len();
                        let last = state.last_inbound_ms.entry(sender).or_insert(at_ms);
                        *last = (*last).max(at_ms);
                        if state.caught_up && state.last_inbound_ms.len() != known {
                            Metrics::global()
                                .state_entries
                                .with_label_values(&["service_windows"])
                                .set(state.last_inbound_ms.len() as i64);
                        }
                    }
                    if behind
                        .get(&followed.partition)
                        .is_some_and(|end| followed.offset + 1 >= *end)
                    {
                        behind.remove(&followed.partition);
                        self.caught_up_if(&behind);
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::debug!(error = %e, "webhook topic read for the service windows"),
            }
            if pruned.elapsed() >= PRUNE_EVERY {
                pruned = Instant::now();
                let now = now_ms();
                let mut state = self.state.lock().expect("windows");
                state.last_inbound_ms.retain(|_, at| open_at(*at, now));
                Metrics::global()
                    .state_entries
                    .with_label_values(&["service_windows"])
                    .set(state.last_inbound_ms.len() as i64);
            }
        }
    }

    fn caught_up_if(&self, behind: &HashMap<i32, i64>) {
        if behind.is_empty() {
            let mut state = self.state.lock().expect("windows");
            if !state.caught_up {
                state.caught_up = true;
                let now = now_ms();
                let open = state
                    .last_inbound_ms
                    .values()
                    .filter(|at| open_at(**at, now))
                    .count();
                Metrics::global()
                    .state_entries
                    .with_label_values(&["service_windows"])
                    .set(open as i64);
                tracing::info!(
                    open_windows = open,
                    "service windows known from the webhook topic"
                );
            }
        }
    }
}

/// The template, language and new status of a `message_template_status_update` webhook item.
fn template_status_update(payload: &[u8]) -> Option<(String, String, String)> {
    let item = WebhookItem::from_json(payload).ok()?;
    if item.kind != "other"
        || item.item.get("field").and_then(|f| f.as_str()) != Some("message_template_status_update")
    {
        return None;
    }
    let value = item.item.get("value")?;
    let text = |key: &str| value.get(key).and_then(|v| v.as_str()).map(String::from);
    Some((
        text("message_template_name")?,
        text("message_template_language")?,
        text("event")?,
    ))
}

/// The sender and time of a person's message on the webhook topic (Meta's `timestamp`, else
/// when it was received): the person's WhatsApp id, or the group's id for a message in a group.
/// System messages (a number changed) are not the person writing.
fn inbound_message(payload: &[u8]) -> Option<(String, i64)> {
    let item = WebhookItem::from_json(payload).ok()?;
    if item.kind != "message" {
        return None;
    }
    let message = &item.item;
    if message.get("type").and_then(|t| t.as_str()) == Some("system") {
        return None;
    }
    let at_ms = message
        .get("timestamp")
        .and_then(|t| t.as_str())
        .and_then(|t| t.parse::<i64>().ok())
        .map_or(item.received_at_ms, |seconds| seconds.saturating_mul(1000));
    let sender = message
        .get("group_id")
        .and_then(|g| g.as_str())
        .map_or_else(|| item.contact.clone(), String::from);
    Some((sender, at_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(kind: &str, message: serde_json::Value) -> Vec<u8> {
        WebhookItem {
            kind: kind.into(),
            item_id: "wamid.A".into(),
            contact: "14155550101".into(),
            phone_number_id: None,
            profile_name: None,
            received_at_ms: 5_000,
            item: message,
        }
        .to_json()
    }

    #[test]
    fn a_persons_message_opens_their_window_and_a_members_opens_the_groups() {
        assert_eq!(
            inbound_message(&item(
                "message",
                serde_json::json!({"type": "text", "timestamp": "1795514400"})
            )),
            Some(("14155550101".into(), 1_795_514_400_000))
        );
        assert_eq!(
            inbound_message(&item(
                "message",
                serde_json::json!({"type": "text", "group_id": "120363012345@g.us"})
            )),
            Some(("120363012345@g.us".into(), 5_000))
        );
        assert_eq!(
            inbound_message(&item("message", serde_json::json!({"type": "system"}))),
            None
        );
        assert_eq!(
            inbound_message(&item("status", serde_json::json!({"status": "read"}))),
            None
        );
    }

    #[test]
    fn a_paused_template_stops_until_meta_approves_it_again() {
        let change = serde_json::json!({"field": "message_template_status_update", "value": {
            "event": "PAUSED", "message_template_id": 1, "message_template_name": "po_ack_request",
            "message_template_language": "en_US", "reason": "LOW_QUALITY"}});
        assert_eq!(
            template_status_update(&item("other", change)),
            Some(("po_ack_request".into(), "en_US".into(), "PAUSED".into()))
        );
        let mut state = State::default();
        set_template_status(&mut state, "po_ack_request", "en_US", "PAUSED");
        set_template_status(&mut state, "po_ack_request", "de_DE", "FLAGGED");
        assert_eq!(state.stopped_templates.len(), 1, "flagged still sends");
        set_template_status(&mut state, "po_ack_request", "en_US", "APPROVED");
        assert!(state.stopped_templates.is_empty());
    }

    #[test]
    fn a_window_is_taken_as_closed_a_little_before_meta_closes_it() {
        let wrote = 1_000_000;
        assert!(open_at(wrote, wrote + 1));
        assert!(open_at(wrote, wrote + WINDOW_MS - CLOSING_MARGIN_MS - 1));
        assert!(!open_at(wrote, wrote + WINDOW_MS - CLOSING_MARGIN_MS));
        assert!(!open_at(wrote, wrote + WINDOW_MS + 1));
    }
}
