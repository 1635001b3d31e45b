//! Sends whose outcome is in doubt, resolved from Meta's status webhooks instead of repeated.
//!
//! WhatsApp has no idempotency key, but every request carries gridtalk's message id as
//! `biz_opaque_callback_data`, which Meta echoes in each status webhook of the message it
//! accepted. A message whose intent was recorded but whose outcome was not (the process died
//! with the request on the wire, or the request timed out) may or may not have reached WhatsApp:
//! it waits for a status carrying its callback data on the webhook topic, up to
//! `send.in_doubt_wait_ms` after the intent (and at least [`CATCH_UP`] from when the wait
//! begins, for reading what is already there). Found: WhatsApp accepted it, and it is recorded as
//! accepted with the status's wamid, not sent again. Not found by then: it is sent again (the
//! only way left to a duplicate: Meta accepted it but no status reached the webhook topic in
//! time, e.g. with the ingest stage down).
//!
//! One reader per process follows the webhook topic (every partition, outside any group, nothing
//! committed) while some message waits, from shortly before the earliest intent waited for; it
//! stops when nobody has waited for [`IDLE_STOP`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use gridtalk_config::KafkaConfig;
use gridtalk_contract::WebhookItem;
use gridtalk_kafka::changelog::TopicFollower;

/// The least time a wait lasts from when it begins, for the reader to get through what is
/// already on the topic (a restart long after the crash finds the status there).
const CATCH_UP: Duration = Duration::from_secs(5);
/// How far before an intent the reader starts: clocks of different hosts differ a little, and a
/// status can be written by an ingest whose clock is behind the send stage's.
const CLOCK_MARGIN_MS: i64 = 60_000;
/// A reader nobody has waited on for this long stops.
const IDLE_STOP: Duration = Duration::from_secs(30);
/// How often a waiting message checks that its partition is still here.
const OWNERSHIP_CHECK: Duration = Duration::from_secs(1);

/// What a status webhook said about an in-doubt message: WhatsApp accepted it as `wamid`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Resolved {
    pub wamid: String,
    /// The contact the status names (`recipient_id`): the WhatsApp id the sent log is keyed by.
    pub wa_id: String,
}

/// The statuses looked for and seen, and the reader.
#[derive(Default)]
struct State {
    /// Callback data waited for, with the intent time of each wait.
    wanted: HashMap<String, Vec<i64>>,
    /// Every status with callback data the reader has read (a wait that begins after the reader
    /// passed its status finds it here), with the record's time, pruned to what a wait can
    /// still ask for.
    seen: HashMap<String, (Resolved, i64)>,
    reader: Option<Reader>,
    last_wait: Option<Instant>,
}

impl State {
    /// Drops what no wait can ask for any more: seen before the earliest intent waited for and
    /// before the longest wait's horizon.
    fn prune(&mut self, now_ms: i64, horizon_ms: i64) {
        let earliest_wanted = self.wanted.values().flatten().min().copied();
        let keep_from =
            earliest_wanted.unwrap_or(i64::MAX).min(now_ms - horizon_ms) - CLOCK_MARGIN_MS;
        self.seen.retain(|_, (_, at)| *at >= keep_from);
    }
}

/// Seen statuses kept before the oldest are pruned.
const SEEN_PRUNE_AT: usize = 100_000;

struct Reader {
    since_ms: i64,
    stop: Arc<AtomicBool>,
}

pub(crate) struct InDoubt {
    kafka: KafkaConfig,
    webhook_topic: String,
    wait: Duration,
    state: Arc<Mutex<State>>,
    found: Arc<Notify>,
}

impl InDoubt {
    /// `None` when `send.in_doubt_wait_ms` is 0: no intents are recorded and nothing waits (a
    /// message in flight at a crash may then be sent twice).
    pub(crate) fn new(kafka: &KafkaConfig, webhook_topic: &str, wait_ms: u64) -> Option<Self> {
        (wait_ms > 0).then(|| InDoubt {
            kafka: kafka.clone(),
            webhook_topic: webhook_topic.to_string(),
            wait: Duration::from_millis(wait_ms),
            state: Arc::new(Mutex::new(State::default())),
            found: Arc::new(Notify::new()),
        })
    }

    /// Waits for a status carrying `callback` for a message whose intent was recorded at
    /// `intent_ms`, while `owned()` holds; `None` when none came in time (or the partition
    /// moved).
    pub(crate) async fn resolve(
        &self,
        callback: &str,
        intent_ms: i64,
        owned: impl Fn() -> bool,
    ) -> Option<Resolved> {
        let now_ms = chrono::Utc::now().timestamp_millis();
        let left_ms = (intent_ms + self.wait.as_millis() as i64 - now_ms).max(0) as u64;
        let deadline = Instant::now() + Duration::from_millis(left_ms).max(CATCH_UP);
        self.want(callback, intent_ms);
        let resolved = loop {
            let notified = self.found.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some((found, _)) = self.state.lock().expect("in doubt").seen.get(callback) {
                break Some(found.clone());
            }
            let now = Instant::now();
            if now >= deadline || !owned() {
                break None;
            }
            let _ = tokio::time::timeout((deadline - now).min(OWNERSHIP_CHECK), notified).await;
        };
        self.unwant(callback, intent_ms);
        resolved
    }

    /// Starts reading the statuses from before `earliest_intent_ms` ahead of the waits, for
    /// messages known to be in doubt (restored with their partition): by the time their records
    /// come back, their statuses have been read.
    pub(crate) fn expect(&self, earliest_intent_ms: i64) {
        let mut state = self.state.lock().expect("in doubt");
        state.last_wait = Some(Instant::now());
        self.read_from(&mut state, earliest_intent_ms - CLOCK_MARGIN_MS);
    }

    fn want(&self, callback: &str, intent_ms: i64) {
        let mut state = self.state.lock().expect("in doubt");
        state
            .wanted
            .entry(callback.to_string())
            .or_default()
            .push(intent_ms);
        state.last_wait = Some(Instant::now());
        self.read_from(&mut state, intent_ms - CLOCK_MARGIN_MS);
    }

    /// Makes sure a reader runs from `since_ms` or earlier.
    fn read_from(&self, state: &mut State, since_ms: i64) {
        let running_early_enough = state
            .reader
            .as_ref()
            .is_some_and(|r| r.since_ms <= since_ms && !r.stop.load(Ordering::Acquire));
        if running_early_enough {
            return;
        }
        // Started again from the earlier point: statuses between it and the running reader's
        // start would be missed otherwise.
        if let Some(old) = state.reader.take() {
            old.stop.store(true, Ordering::Release);
        }
        let stop = Arc::new(AtomicBool::new(false));
        state.reader = Some(Reader {
            since_ms,
            stop: stop.clone(),
        });
        let follow = Follow {
            kafka: self.kafka.clone(),
            topic: self.webhook_topic.clone(),
            since_ms,
            horizon_ms: self.wait.as_millis() as i64 + CATCH_UP.as_millis() as i64,
            stop,
            state: self.state.clone(),
            found: self.found.clone(),
        };
        std::thread::Builder::new()
            .name("gridtalk-in-doubt".into())
            .spawn(move || follow.run())
            .expect("a thread for the in-doubt reader");
    }

    fn unwant(&self, callback: &str, intent_ms: i64) {
        let mut state = self.state.lock().expect("in doubt");
        if let Some(intents) = state.wanted.get_mut(callback) {
            if let Some(i) = intents.iter().position(|t| *t == intent_ms) {
                intents.swap_remove(i);
            }
            if intents.is_empty() {
                state.wanted.remove(callback);
            }
        }
    }
}

impl Drop for InDoubt {
    fn drop(&mut self) {
        if let Some(reader) = self.state.lock().expect("in doubt").reader.take() {
            reader.stop.store(true, Ordering::Release);
        }
    }
}

/// The reader: follows the webhook topic from `since_ms` and keeps every status that carries
/// callback data, until replaced by an earlier-starting one or idle.
struct Follow {
    kafka: KafkaConfig,
    topic: String,
    since_ms: i64,
    /// How far back a wait beginning now can ask.
    horizon_ms: i64,
    stop: Arc<AtomicBool>,
    state: Arc<Mutex<State>>,
    found: Arc<Notify>,
}

impl Follow {
    fn run(self) {
        let deadline = Duration::from_millis(self.kafka.request_timeout_ms);
        let follower = match TopicFollower::since(&self.kafka, &self.topic, self.since_ms, deadline)
        {
            Ok(f) => f,
            Err(e) => {
                // The waits time out and their messages are sent again, as without resolution.
                tracing::warn!(error = %e, topic = %self.topic, "cannot read the webhook topic for in-doubt sends; they are sent again after their wait");
                self.leave();
                return;
            }
        };
        let mut checked = Instant::now();
        while !self.stop.load(Ordering::Acquire) {
            if checked.elapsed() >= OWNERSHIP_CHECK {
                checked = Instant::now();
                let state = self.state.lock().expect("in doubt");
                let idle = state.wanted.is_empty()
                    && state.last_wait.is_none_or(|at| at.elapsed() >= IDLE_STOP);
                drop(state);
                if idle {
                    self.leave();
                    return;
                }
            }
            let payload = match follower.next(Duration::from_millis(200)) {
                Ok(Some(followed)) => match followed.payload {
                    Some(payload) => payload,
                    None => continue,
                },
                Ok(None) => continue,
                Err(e) => {
                    tracing::debug!(error = %e, "webhook topic read for in-doubt sends");
                    continue;
                }
            };
            let Some((callback, resolved, at_ms)) = status_with_callback(&payload) else {
                continue;
            };
            let mut state = self.state.lock().expect("in doubt");
            let wanted = state.wanted.contains_key(&callback);
            state.seen.insert(callback, (resolved, at_ms));
            if state.seen.len() > SEEN_PRUNE_AT {
                state.prune(chrono::Utc::now().timestamp_millis(), self.horizon_ms);
            }
            drop(state);
            if wanted {
                self.found.notify_waiters();
            }
        }
    }

    /// Gives the reader's place up, unless a newer reader has taken it already.
    fn leave(&self) {
        let mut state = self.state.lock().expect("in doubt");
        if state
            .reader
            .as_ref()
            .is_some_and(|r| Arc::ptr_eq(&r.stop, &self.stop))
        {
            state.reader = None;
            state.seen.clear();
        }
        self.stop.store(true, Ordering::Release);
    }
}

/// The callback data, wamid and receipt time of a status item on the webhook topic.
fn status_with_callback(payload: &[u8]) -> Option<(String, Resolved, i64)> {
    let item = WebhookItem::from_json(payload).ok()?;
    if item.kind != "status" {
        return None;
    }
    let callback = item.item.get("biz_opaque_callback_data")?.as_str()?;
    let wamid = item.item.get("id")?.as_str()?;
    Some((
        callback.to_string(),
        Resolved {
            wamid: wamid.to_string(),
            wa_id: item.contact.clone(),
        },
        item.received_at_ms,
    ))
}

/// `request` (a Cloud API request body, a JSON object) carrying `callback` as its
/// `biz_opaque_callback_data` (Meta allows 512 characters; gridtalk's message ids are far
/// shorter).
pub(crate) fn with_callback(request: &str, callback: &str) -> String {
    match serde_json::from_str::<serde_json::Value>(request) {
        Ok(serde_json::Value::Object(mut fields)) => {
            fields.insert(
                "biz_opaque_callback_data".into(),
                serde_json::Value::String(callback.to_string()),
            );
            serde_json::Value::Object(fields).to_string()
        }
        // Not an object: sent as it is, and WhatsApp says what is wrong with it.
        _ => request.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_carry_the_callback_and_statuses_give_it_back() {
        let request = r#"{"messaging_product":"whatsapp","to":"14155550101","type":"text","text":{"body":"hi"}}"#;
        let sent: serde_json::Value =
            serde_json::from_str(&with_callback(request, "msg-1")).unwrap();
        assert_eq!(sent["biz_opaque_callback_data"], "msg-1");
        assert_eq!(sent["text"]["body"], "hi");
        assert_eq!(with_callback("[1]", "msg-1"), "[1]");

        let item = WebhookItem {
            kind: "status".into(),
            item_id: "wamid.X:sent".into(),
            contact: "14155550101".into(),
            phone_number_id: None,
            profile_name: None,
            received_at_ms: 1,
            item: serde_json::json!({"id": "wamid.X", "status": "sent", "recipient_id": "14155550101",
                                     "biz_opaque_callback_data": "msg-1"}),
        };
        assert_eq!(
            status_with_callback(&item.to_json()),
            Some((
                "msg-1".to_string(),
                Resolved {
                    wamid: "wamid.X".into(),
                    wa_id: "14155550101".into()
                },
                1
            ))
        );
        let mut without = item.clone();
        without.item["biz_opaque_callback_data"] = serde_json::Value::Null;
        assert_eq!(status_with_callback(&without.to_json()), None);
        let mut message = item;
        message.kind = "message".into();
        assert_eq!(status_with_callback(&message.to_json()), None);
    }

    #[test]
    fn seen_statuses_are_kept_while_a_wait_can_ask_for_them() {
        let resolved = |w: &str| Resolved {
            wamid: w.into(),
            wa_id: "1".into(),
        };
        let mut state = State::default();
        let now = 10_000_000;
        state
            .seen
            .insert("old".into(), (resolved("a"), now - 900_000));
        state
            .seen
            .insert("recent".into(), (resolved("b"), now - 10_000));
        state.wanted.insert("x".into(), vec![now - 500_000]);
        state.prune(now, 35_000);
        // A wait for an intent 500 s ago can still ask for what came after it.
        assert!(state.seen.contains_key("recent"));
        assert!(!state.seen.contains_key("old"));
        state.wanted.clear();
        state
            .seen
            .insert("mid".into(), (resolved("c"), now - 300_000));
        state.prune(now, 35_000);
        assert_eq!(state.seen.keys().collect::<Vec<_>>(), vec!["recent"]);
    }
}
