//! Clocks on open requests: when the answer to a request is due, the reminders and the
//! escalation that follow it, and which of them have fired. Pure: no Kafka, no wall clock (the
//! caller passes the time, read from a [`TimeSource`]).
//!
//! A clock is opened by a [`ClockCommand::Open`] (the route stage sends one for every event a
//! reminder policy covers), keyed `<kind>:<request id>` like the decision candidates of the same
//! request, so the one owner of that key's partition both settles the request's decision and
//! keeps its clock. What this module guarantees, given the commands of a partition in order and
//! the time:
//!
//! - **Ordered, no scan.** Clocks wait in a queue ordered by their next step's time; finding what
//!   is due costs the number of due steps, not the number of clocks.
//! - **Each step once.** Steps fire in order, each at most once per clock: a step is fired by the
//!   clock reaching it or by an upstream overdue event naming it ([`ClockCommand::Upstream`]),
//!   whichever comes first; the other finds it fired and does nothing. A fire's ids are derived
//!   from the clock and the step, so a fire repeated after a crash (its state change lost) repeats
//!   the same ids, which the send stage's index and the response consumers drop.
//! - **Closed means closed.** A close (the answer, or an upstream event that closes the document)
//!   deletes the clock and remembers the key as closed for [`CLOSED_RETENTION_MS`], so an `Open`
//!   replayed after it does not start the clock again.
//! - **Durable and bounded.** Every change is a changelog entry ([`Clocks::take_changes`]):
//!   `clock:<key>` → the clock's state, `clock-closed:<key>` → when it closed; a clock whose last
//!   step fired and a close delete `clock:<key>` with a tombstone. Restored with the partition
//!   ([`Clocks::restore`]). Each entry expires ([`Change::expires_at_ms`]), so a changelog whose
//!   tombstones were lost still shrinks.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Changelog keys of open clocks.
pub const CLOCK_PREFIX: &str = "clock:";
/// Changelog keys of closed clocks.
pub const CLOSED_PREFIX: &str = "clock-closed:";
/// How long a closed clock's key is remembered: longer than a button stays valid, so an answer
/// or an `Open` replayed within it cannot restart the clock.
pub const CLOSED_RETENTION_MS: i64 = 8 * 24 * 3_600_000;
/// How long a clock's state is kept after its last step is due, should its tombstone be lost.
pub const CLOCK_GRACE_MS: i64 = 24 * 3_600_000;

/// The time gridtalk's clocks run on: the wall clock, or (for tests and the demo) a clock that
/// runs `speed` times faster, starting at `start_ms` at the real instant `anchor_ms`. Processes
/// given the same three values agree on the time, so a restarted process resumes the same
/// timeline.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TimeSource {
    speed: f64,
    anchor_ms: i64,
    start_ms: i64,
}

fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl TimeSource {
    /// The wall clock.
    pub fn wall() -> Self {
        TimeSource {
            speed: 1.0,
            anchor_ms: 0,
            start_ms: 0,
        }
    }

    /// A clock `speed` times faster than the wall clock. `anchor_ms` (0: now) is the real instant
    /// at which it reads `start_ms` (0: the anchor itself).
    pub fn scaled(speed: f64, anchor_ms: i64, start_ms: i64) -> Self {
        let anchor_ms = if anchor_ms == 0 { wall_ms() } else { anchor_ms };
        let start_ms = if start_ms == 0 { anchor_ms } else { start_ms };
        TimeSource {
            speed: if speed.is_finite() && speed > 0.0 {
                speed
            } else {
                1.0
            },
            anchor_ms,
            start_ms,
        }
    }

    pub fn is_wall(&self) -> bool {
        self.speed == 1.0 && self.anchor_ms == self.start_ms
    }

    pub fn now_ms(&self) -> i64 {
        let real = wall_ms();
        if self.is_wall() {
            return real;
        }
        self.start_ms + ((real - self.anchor_ms) as f64 * self.speed) as i64
    }

    /// How long to wait on the wall clock until this clock reads `at_ms`.
    pub fn wait_until(&self, at_ms: i64) -> Duration {
        let ahead = (at_ms - self.now_ms()).max(0) as f64 / self.speed;
        Duration::from_millis(ahead.ceil() as u64)
    }
}

/// What the route stage sends to open a request's clock: the request, its due time, the times
/// of its steps, who was asked, and the event itself (its JSON view) so that a step can be
/// rendered with the templates and parameters of the policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpenClock {
    /// `<kind>:<request id>`, the decisions topic's key.
    pub key: String,
    pub kind: String,
    pub request_id: String,
    /// The reminder policy's name.
    pub policy: String,
    pub correlation_id: String,
    pub event_id: String,
    pub partner_id: String,
    pub due_at_ms: i64,
    /// When each step is due, in order; the escalation, if the policy has one, is the last.
    pub steps_at_ms: Vec<i64>,
    pub escalation_last: bool,
    /// The contact ids the request was sent to: reminders go to them.
    pub recipients: Vec<String>,
    /// The event's JSON view, as text.
    pub view: String,
}

impl OpenClock {
    pub fn steps(&self) -> u32 {
        self.steps_at_ms.len() as u32
    }

    /// Whether step `step` (1-based) is the escalation.
    pub fn is_escalation(&self, step: u32) -> bool {
        self.escalation_last && step == self.steps()
    }
}

/// What the route and decide stages tell a clock's owner, on the decisions topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClockCommand {
    Open(OpenClock),
    /// The request was answered, or an upstream event closed the document.
    Close {
        key: String,
        reason: String,
    },
    /// An upstream overdue event (e.g. `tg.po.ack_overdue`) for the request, routed by route to
    /// `notified` with the message ids of `step` (see [`upstream_step`]): the step counts as
    /// fired, so the clock does not send it again (and if the clock fired it first, the send
    /// stage's index drops route's copies, which carry the same ids).
    Upstream {
        key: String,
        policy: String,
        step: u32,
        notified: Vec<String>,
    },
    /// A message that waits for its recipient's business hours (quiet hours), keyed
    /// `defer:<contact id>` so one contact's waiting messages stay in order.
    Defer(DeferredMessage),
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    clock: ClockCommand,
}

impl ClockCommand {
    pub fn key(&self) -> &str {
        match self {
            ClockCommand::Open(open) => &open.key,
            ClockCommand::Close { key, .. } | ClockCommand::Upstream { key, .. } => key,
            ClockCommand::Defer(deferred) => &deferred.key,
        }
    }

    /// `open`, `close` or `upstream` (a metric label, a header).
    pub fn name(&self) -> &'static str {
        match self {
            ClockCommand::Open(_) => "open",
            ClockCommand::Close { .. } => "close",
            ClockCommand::Upstream { .. } => "upstream",
            ClockCommand::Defer(_) => "defer",
        }
    }

    /// The record value on the decisions topic: `{"clock": …}`, told apart from a candidate.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(&Envelope {
            clock: self.clone(),
        })
        .expect("a clock command serialises")
    }

    /// A clock command, `None` when the record is not one (a candidate), or why it is broken.
    pub fn from_json(bytes: &[u8]) -> Option<Result<Self, String>> {
        let value: serde_json::Value = serde_json::from_slice(bytes).ok()?;
        let clock = value.as_object()?.get("clock")?.clone();
        Some(serde_json::from_value(clock).map_err(|e| format!("not a clock command: {e}")))
    }
}

/// The step an upstream overdue event names, given a policy's step offsets after the due time
/// (the escalation last when `escalation_last`): an escalation level above zero names the
/// escalation; otherwise the last reminder whose offset is at most `hours_overdue` (at least the
/// first). 1-based.
pub fn upstream_step(
    offsets_ms: &[i64],
    escalation_last: bool,
    escalation: bool,
    hours_overdue: i64,
) -> u32 {
    let steps = offsets_ms.len() as u32;
    if escalation && escalation_last {
        return steps.max(1);
    }
    let reminders = steps - u32::from(escalation_last && steps > 0);
    let late_ms = hours_overdue.saturating_mul(3_600_000);
    let named = offsets_ms[..reminders as usize]
        .iter()
        .filter(|o| **o <= late_ms)
        .count() as u32;
    named.max(1).min(reminders.max(1))
}

/// Why a step fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Clock,
    Upstream,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Clock => "CLOCK",
            Trigger::Upstream => "UPSTREAM",
        }
    }
}

/// A step to carry out: render its messages, publish its `wa.request.overdue` record.
#[derive(Debug, Clone, PartialEq)]
pub struct Fire {
    /// The partition whose state the clock belongs to.
    pub partition: i32,
    pub clock: OpenClock,
    /// 1-based.
    pub step: u32,
    pub trigger: Trigger,
    pub at_ms: i64,
}

impl Fire {
    pub fn is_escalation(&self) -> bool {
        self.clock.is_escalation(self.step)
    }

    /// The id every record of this fire derives from: the same on a repeat.
    pub fn fire_id(&self) -> String {
        format!("{}:{}", self.clock.key, self.step)
    }

    /// Whole hours between the due time and the step's time (the fire's own time for an
    /// upstream fire).
    pub fn hours_overdue(&self) -> i64 {
        let at = match self.trigger {
            Trigger::Clock => self
                .clock
                .steps_at_ms
                .get(self.step as usize - 1)
                .copied()
                .unwrap_or(self.at_ms),
            Trigger::Upstream => self.at_ms,
        };
        (at - self.clock.due_at_ms).max(0) / 3_600_000
    }
}

/// A changelog entry: `value` none is a tombstone.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub partition: i32,
    pub key: String,
    pub value: Option<String>,
    pub expires_at_ms: i64,
}

/// What an `Open` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    New,
    /// The request has a clock already (a replayed or repeated event): unchanged.
    AlreadyOpen,
    /// The request was answered or closed: no clock.
    AlreadyClosed,
    /// Every step's time has passed beyond the policy's last step: nothing left to do.
    Expired,
}

/// What an upstream overdue event did.
#[derive(Debug, Clone, PartialEq)]
pub enum UpstreamOutcome {
    /// The step it names fires now.
    Fire(Box<Fire>),
    /// That step (or a later one) fired already.
    AlreadyFired,
    /// The request is closed: nothing to remind.
    Closed,
    /// No clock knows the request: route the event by the rules.
    NoClock,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    clock: OpenClock,
    /// Steps fired so far (the next to fire is `fired + 1`).
    fired: u32,
}

#[derive(Debug)]
struct Held {
    state: State,
    partition: i32,
}

/// The clocks of the partitions this process owns. See the module docs.
#[derive(Debug, Default)]
pub struct Clocks {
    clocks: HashMap<String, Held>,
    /// (time of the next step, key), for every clock with a step left.
    queue: BTreeSet<(i64, String)>,
    /// Closed keys → (partition, closed at).
    closed: HashMap<String, (i32, i64)>,
    changes: Vec<Change>,
}

impl Clocks {
    pub fn new() -> Self {
        Self::default()
    }

    /// Open clocks.
    pub fn len(&self) -> usize {
        self.clocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.clocks.is_empty()
    }

    /// Closed keys remembered.
    pub fn closed_len(&self) -> usize {
        self.closed.len()
    }

    /// The changelog entries of the changes since the last call.
    pub fn take_changes(&mut self) -> Vec<Change> {
        std::mem::take(&mut self.changes)
    }

    /// When the next step is due, if any.
    pub fn next_due_ms(&self) -> Option<i64> {
        self.queue.first().map(|(at, _)| *at)
    }

    fn next_step_at(state: &State) -> Option<i64> {
        state.clock.steps_at_ms.get(state.fired as usize).copied()
    }

    fn write(&mut self, key: &str) {
        let Some(held) = self.clocks.get(key) else {
            return;
        };
        let last = held.state.clock.steps_at_ms.last().copied().unwrap_or(0);
        self.changes.push(Change {
            partition: held.partition,
            key: format!("{CLOCK_PREFIX}{key}"),
            value: Some(serde_json::to_string(&held.state).expect("clock state serialises")),
            expires_at_ms: last.max(held.state.clock.due_at_ms) + CLOCK_GRACE_MS,
        });
    }

    fn delete(&mut self, partition: i32, key: &str) {
        self.changes.push(Change {
            partition,
            key: format!("{CLOCK_PREFIX}{key}"),
            value: None,
            expires_at_ms: 0,
        });
    }

    fn enqueue(&mut self, key: &str) {
        if let Some(at) = self
            .clocks
            .get(key)
            .and_then(|h| Self::next_step_at(&h.state))
        {
            self.queue.insert((at, key.to_string()));
        }
    }

    fn dequeue(&mut self, key: &str) {
        if let Some(at) = self
            .clocks
            .get(key)
            .and_then(|h| Self::next_step_at(&h.state))
        {
            self.queue.remove(&(at, key.to_string()));
        }
    }

    /// Opens a request's clock read from `partition`.
    pub fn open(&mut self, partition: i32, clock: OpenClock, now_ms: i64) -> Opened {
        if self.closed.contains_key(&clock.key) {
            return Opened::AlreadyClosed;
        }
        if self.clocks.contains_key(&clock.key) {
            return Opened::AlreadyOpen;
        }
        let last = clock.steps_at_ms.last().copied().unwrap_or(clock.due_at_ms);
        if clock.steps_at_ms.is_empty() || last + CLOCK_GRACE_MS < now_ms {
            return Opened::Expired;
        }
        let key = clock.key.clone();
        self.clocks.insert(
            key.clone(),
            Held {
                state: State { clock, fired: 0 },
                partition,
            },
        );
        self.enqueue(&key);
        self.write(&key);
        Opened::New
    }

    /// Closes a request's clock (answered, or closed upstream). Returns whether one was open.
    pub fn close(&mut self, partition: i32, key: &str, now_ms: i64) -> bool {
        let was_open = match self.clocks.get(key).map(|h| h.partition) {
            Some(held_partition) => {
                self.dequeue(key);
                self.clocks.remove(key);
                self.delete(held_partition, key);
                true
            }
            None => false,
        };
        if !self.closed.contains_key(key) {
            self.closed.insert(key.to_string(), (partition, now_ms));
            self.changes.push(Change {
                partition,
                key: format!("{CLOSED_PREFIX}{key}"),
                value: Some(now_ms.to_string()),
                expires_at_ms: now_ms + CLOSED_RETENTION_MS,
            });
        }
        was_open
    }

    /// Whether a request's clock is closed.
    pub fn is_closed(&self, key: &str) -> bool {
        self.closed.contains_key(key)
    }

    fn advance(&mut self, key: &str, to_fired: u32, trigger: Trigger, at_ms: i64) -> Option<Fire> {
        self.dequeue(key);
        let held = self.clocks.get_mut(key)?;
        held.state.fired = to_fired;
        let fire = Fire {
            partition: held.partition,
            clock: held.state.clock.clone(),
            step: to_fired,
            trigger,
            at_ms,
        };
        let (partition, done) = (held.partition, to_fired >= held.state.clock.steps());
        if done {
            self.clocks.remove(key);
            self.delete(partition, key);
        } else {
            self.enqueue(key);
            self.write(key);
        }
        Some(fire)
    }

    /// The next step due at `now_ms`, marked fired ([`Clocks::take_changes`] then holds the state
    /// to write once the fire is durable). Steps fire one by one, in time order: after an outage
    /// that spanned several steps of a clock, each still fires (each is a record the workflows
    /// count on), one after the other.
    pub fn take_next_due(&mut self, now_ms: i64) -> Option<Fire> {
        while let Some((at, key)) = self.queue.first().cloned() {
            if at > now_ms {
                return None;
            }
            let Some(fired) = self.clocks.get(&key).map(|h| h.state.fired) else {
                self.queue.remove(&(at, key));
                continue;
            };
            return self.advance(&key, fired + 1, Trigger::Clock, now_ms);
        }
        None
    }

    /// Every step due at `now_ms` (see [`Clocks::take_next_due`]).
    pub fn take_due(&mut self, now_ms: i64) -> Vec<Fire> {
        std::iter::from_fn(|| self.take_next_due(now_ms)).collect()
    }

    /// Step `step` of `key` was sent by route for an upstream overdue event: it counts as fired
    /// (with the steps before it), unless it fired already.
    pub fn upstream(&mut self, key: &str, step: u32, now_ms: i64) -> UpstreamOutcome {
        if self.closed.contains_key(key) {
            return UpstreamOutcome::Closed;
        }
        let Some(held) = self.clocks.get(key) else {
            return UpstreamOutcome::NoClock;
        };
        let step = step.clamp(1, held.state.clock.steps().max(1));
        if step <= held.state.fired {
            return UpstreamOutcome::AlreadyFired;
        }
        match self.advance(key, step, Trigger::Upstream, now_ms) {
            Some(fire) => UpstreamOutcome::Fire(Box::new(fire)),
            None => UpstreamOutcome::NoClock,
        }
    }

    /// Applies the changelog entries of `partition` (values as [`Clocks::take_changes`] wrote
    /// them); unreadable entries are skipped.
    pub fn restore(&mut self, partition: i32, entries: impl IntoIterator<Item = (String, String)>) {
        for (key, value) in entries {
            if let Some(closed) = key.strip_prefix(CLOSED_PREFIX) {
                let at = value.parse().unwrap_or(0);
                self.closed.insert(closed.to_string(), (partition, at));
            } else if let Some(open) = key.strip_prefix(CLOCK_PREFIX) {
                let Ok(state) = serde_json::from_str::<State>(&value) else {
                    continue;
                };
                if state.clock.key != open || state.fired >= state.clock.steps() {
                    continue;
                }
                self.dequeue(open);
                self.clocks
                    .insert(open.to_string(), Held { state, partition });
                self.enqueue(open);
            }
        }
        // A clock restored beside its close (the tombstone was lost) stays closed.
        let closed: Vec<String> = self
            .clocks
            .keys()
            .filter(|k| self.closed.contains_key(*k))
            .cloned()
            .collect();
        for key in closed {
            self.dequeue(&key);
            self.clocks.remove(&key);
        }
    }

    /// Forgets the clocks of `partition` (revoked: its new owner restores them).
    pub fn drop_partition(&mut self, partition: i32) {
        let keys: Vec<String> = self
            .clocks
            .iter()
            .filter(|(_, h)| h.partition == partition)
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            self.dequeue(&key);
            self.clocks.remove(&key);
        }
        self.closed.retain(|_, (p, _)| *p != partition);
    }

    /// Forgets closed keys older than [`CLOSED_RETENTION_MS`] (their changelog entries expire too).
    pub fn evict(&mut self, now_ms: i64) {
        self.closed
            .retain(|_, (_, at)| *at + CLOSED_RETENTION_MS >= now_ms);
    }
}

/// Changelog keys of messages waiting for their recipient's business hours.
pub const DEFERRED_PREFIX: &str = "deferred:";
/// How long a waiting message's entry is kept past its release, should its tombstone be lost.
pub const DEFERRED_GRACE_MS: i64 = 24 * 3_600_000;

/// A message waiting for its recipient's business hours.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeferredMessage {
    /// `defer:<contact id>` (the decisions topic's key).
    pub key: String,
    pub message_id: String,
    pub contact_id: String,
    pub deferred_at_ms: i64,
    pub release_at_ms: i64,
    /// Order among messages released at the same time (their order of arrival).
    #[serde(default)]
    pub sequence: u64,
    /// The outbox message, as JSON.
    pub message: String,
}

/// The messages waiting for business hours on the partitions this process owns, in release
/// order. Like [`Clocks`]: each held message is a changelog entry (`deferred:<message id>`),
/// restored with its partition, tombstoned once released; a message held twice (a replayed
/// command) is held once.
#[derive(Debug, Default)]
pub struct Deferred {
    held: HashMap<String, (DeferredMessage, i32)>,
    queue: BTreeSet<(i64, u64, String)>,
    changes: Vec<Change>,
}

impl Deferred {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    pub fn next_due_ms(&self) -> Option<i64> {
        self.queue.first().map(|(at, _, _)| *at)
    }

    pub fn take_changes(&mut self) -> Vec<Change> {
        std::mem::take(&mut self.changes)
    }

    fn insert(&mut self, partition: i32, message: DeferredMessage) {
        self.queue.insert((
            message.release_at_ms,
            message.sequence,
            message.message_id.clone(),
        ));
        self.held
            .insert(message.message_id.clone(), (message, partition));
    }

    /// Holds `message` (read from `partition`) until its release. False when already held.
    pub fn hold(&mut self, partition: i32, message: DeferredMessage) -> bool {
        if self.held.contains_key(&message.message_id) {
            return false;
        }
        self.changes.push(Change {
            partition,
            key: format!("{DEFERRED_PREFIX}{}", message.message_id),
            value: Some(serde_json::to_string(&message).expect("a deferred message serialises")),
            expires_at_ms: message.release_at_ms + DEFERRED_GRACE_MS,
        });
        self.insert(partition, message);
        true
    }

    /// The next message whose release time has come, with its partition; its tombstone follows
    /// in [`Deferred::take_changes`].
    pub fn take_next_due(&mut self, now_ms: i64) -> Option<(i32, DeferredMessage)> {
        let (at, _, id) = self.queue.first().cloned()?;
        if at > now_ms {
            return None;
        }
        self.queue.pop_first();
        let (message, partition) = self.held.remove(&id)?;
        self.changes.push(Change {
            partition,
            key: format!("{DEFERRED_PREFIX}{id}"),
            value: None,
            expires_at_ms: 0,
        });
        Some((partition, message))
    }

    /// Applies the changelog entries of `partition`; unreadable ones are skipped.
    pub fn restore(&mut self, partition: i32, entries: impl IntoIterator<Item = (String, String)>) {
        for (key, value) in entries {
            let Some(id) = key.strip_prefix(DEFERRED_PREFIX) else {
                continue;
            };
            match serde_json::from_str::<DeferredMessage>(&value) {
                Ok(message) if message.message_id == id && !self.held.contains_key(id) => {
                    self.insert(partition, message)
                }
                _ => {}
            }
        }
    }

    /// Forgets the messages of `partition` (revoked: its new owner restores them).
    pub fn drop_partition(&mut self, partition: i32) {
        let gone: Vec<(i64, u64, String)> = self
            .held
            .values()
            .filter(|(_, p)| *p == partition)
            .map(|(m, _)| (m.release_at_ms, m.sequence, m.message_id.clone()))
            .collect();
        for entry in gone {
            self.queue.remove(&entry);
            self.held.remove(&entry.2);
        }
    }
}

#[cfg(test)]
mod tests;
