//! Summaries gridtalk computes itself (flow h): per audience scope (one partner, or everything
//! for an internal role), tallies over the input events and the response topic, and when a
//! summary is due. Pure: no Kafka, no wall clock (the caller passes the time).
//!
//! What is counted, by [`Measure`]:
//!
//! | Measure | Counted when | Until |
//! |---|---|---|
//! | completed POs | `tg.po.acknowledged` (an 855/ORDRSP upstream) or an accepting `PoAckDecision` | the period ends |
//! | failed acknowledgements | a rejecting `PoAckDecision`, or an escalated `tg.po.ack_overdue` | the period ends |
//! | pending invoices | `tg.invoice.delivered` | `tg.invoice.acknowledged`, `tg.invoice.rejected` |
//! | open exceptions | `tg.shipment.exception` | `tg.delivery.confirmed` for the shipment |
//! | open approvals | `wf.approval.requested` | its `ApprovalDecision` |
//! | overdue requests | `wa.request.overdue`, `tg.po.ack_overdue` | the request's decision, `tg.po.acknowledged` |
//!
//! Guarantees, given the observations of a scope in order:
//! - **Each document once.** A measure counts documents, not records: an id observed twice (a
//!   replayed event, an upstream and a computed overdue for one order) counts once; an open
//!   document closed counts no more, and a close before its open is remembered so the late
//!   open does not count.
//! - **Periods.** The "until the period ends" measures count what happened since the last daily
//!   summary ([`Tally::close_period`]); the open ones are a state and carry over.
//! - **Bounded.** Each set keeps at most [`MAX_IDS`] ids, the oldest out first (the count of
//!   what fell out stays in the figures), so a flood cannot grow a tally without bound.
//! - **Durable as one value.** A [`Tally`] serialises to one JSON value for a changelog entry.

use std::collections::{BTreeMap, VecDeque};

use chrono::{NaiveTime, TimeZone};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use gridtalk_contract::{ResponseBody, WorkflowResponse};

/// Ids a tally keeps per measure at most.
pub const MAX_IDS: usize = 10_000;

/// What a summary reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Measure {
    CompletedPos,
    PendingInvoices,
    FailedAcknowledgements,
    OpenExceptions,
    OpenApprovals,
    OverdueRequests,
}

impl Measure {
    pub const ALL: [Measure; 6] = [
        Measure::CompletedPos,
        Measure::PendingInvoices,
        Measure::FailedAcknowledgements,
        Measure::OpenExceptions,
        Measure::OpenApprovals,
        Measure::OverdueRequests,
    ];

    /// The configuration's and the template parameters' name.
    pub fn name(self) -> &'static str {
        match self {
            Measure::CompletedPos => "completed_pos",
            Measure::PendingInvoices => "pending_invoices",
            Measure::FailedAcknowledgements => "failed_acknowledgements",
            Measure::OpenExceptions => "open_exceptions",
            Measure::OpenApprovals => "open_approvals",
            Measure::OverdueRequests => "overdue_requests",
        }
    }

    pub fn parse(name: &str) -> Option<Measure> {
        Measure::ALL.into_iter().find(|m| m.name() == name)
    }

    /// Whether the measure counts what happened in the period (otherwise: what is open now).
    fn per_period(self) -> bool {
        matches!(
            self,
            Measure::CompletedPos | Measure::FailedAcknowledgements
        )
    }
}

/// What one record tells a scope's tally.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Observation {
    /// `id` happened (counted once in the period).
    Done(Measure, String),
    /// `id` is open from now on.
    Opened(Measure, String),
    /// `id` is no longer open.
    Closed(Measure, String),
}

fn text<'a>(view: &'a Value, pointer: &str) -> Option<&'a str> {
    view.pointer(pointer)
        .and_then(Value::as_str)
        .filter(|s| !s.trim().is_empty())
}

/// What an input event (its JSON view: `/payload/...` flattened) tells the summaries.
pub fn from_event(event_type: &str, view: &Value) -> Vec<Observation> {
    use Measure::*;
    use Observation::*;
    let po = text(view, "/payload/po_number").map(String::from);
    let invoice = text(view, "/payload/invoice_number").map(String::from);
    let shipment = text(view, "/payload/shipment_id").map(String::from);
    let approval = text(view, "/payload/approval_id").map(String::from);
    let escalated = view
        .pointer("/payload/escalation_level")
        .and_then(Value::as_i64)
        .is_some_and(|level| level >= 1);
    let mut out = Vec::new();
    match event_type {
        "tg.po.acknowledged" => {
            if let Some(po) = po {
                out.push(Done(CompletedPos, po.clone()));
                out.push(Closed(OverdueRequests, format!("po:{po}")));
            }
        }
        "tg.po.ack_overdue" => {
            if let Some(po) = po {
                out.push(Opened(OverdueRequests, format!("po:{po}")));
                if escalated {
                    out.push(Done(FailedAcknowledgements, po));
                }
            }
        }
        "tg.invoice.delivered" => out.extend(invoice.map(|i| Opened(PendingInvoices, i))),
        "tg.invoice.acknowledged" | "tg.invoice.rejected" => {
            out.extend(invoice.map(|i| Closed(PendingInvoices, i)))
        }
        "tg.shipment.exception" => out.extend(shipment.map(|s| Opened(OpenExceptions, s))),
        "tg.delivery.confirmed" => out.extend(shipment.map(|s| Closed(OpenExceptions, s))),
        "wf.approval.requested" => out.extend(approval.map(|a| Opened(OpenApprovals, a))),
        _ => {}
    }
    out
}

/// What a record of the response topic tells the summaries.
pub fn from_response(response: &WorkflowResponse) -> Vec<Observation> {
    use Measure::*;
    use Observation::*;
    let mut out = Vec::new();
    match &response.body {
        ResponseBody::PoAckDecision {
            po_number,
            decision,
            ..
        } => {
            if decision == "REJECT" {
                out.push(Done(FailedAcknowledgements, po_number.clone()));
            } else {
                out.push(Done(CompletedPos, po_number.clone()));
            }
            out.push(Closed(OverdueRequests, format!("po:{po_number}")));
        }
        ResponseBody::ApprovalDecision { approval_id, .. } => {
            out.push(Closed(OpenApprovals, approval_id.clone()));
            out.push(Closed(OverdueRequests, format!("approval:{approval_id}")));
        }
        ResponseBody::RequestOverdue { request_kind, .. } => {
            if let Some(id) = &response.request_id {
                out.push(Opened(OverdueRequests, format!("{request_kind}:{id}")));
            }
        }
        _ => {
            // Any other answer to a request (an onboarding acknowledgement, a correction)
            // ends its overdue state.
            if let (Some(id), Some(kind)) = (&response.request_id, answered_kind(&response.body)) {
                out.push(Closed(OverdueRequests, format!("{kind}:{id}")));
            }
        }
    }
    out
}

fn answered_kind(body: &ResponseBody) -> Option<&'static str> {
    match body {
        ResponseBody::OnboardingAcknowledgement { .. } => Some("onboarding"),
        ResponseBody::CorrectionAnswer { .. } => Some("invoice"),
        _ => None,
    }
}

/// A bounded set of ids in arrival order, with when each arrived.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Ids {
    order: VecDeque<(String, i64)>,
    /// Ids that fell out when the set was full (still counted).
    #[serde(default)]
    overflow: u64,
}

impl Ids {
    fn contains(&self, id: &str) -> bool {
        self.order.iter().any(|(i, _)| i == id)
    }

    fn insert(&mut self, id: &str, at_ms: i64) -> bool {
        if self.contains(id) {
            return false;
        }
        if self.order.len() >= MAX_IDS {
            self.order.pop_front();
            self.overflow += 1;
        }
        self.order.push_back((id.to_string(), at_ms));
        true
    }

    fn remove(&mut self, id: &str) -> bool {
        let before = self.order.len();
        self.order.retain(|(i, _)| i != id);
        before != self.order.len()
    }

    fn count(&self) -> u64 {
        self.order.len() as u64 + self.overflow
    }

    fn since(&self, since_ms: i64) -> u64 {
        self.order.iter().filter(|(_, at)| *at >= since_ms).count() as u64
    }
}

/// The figures of a summary, by measure.
pub type Counts = BTreeMap<Measure, u64>;

/// One scope's tally.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Tally {
    /// When the current period began (the last daily summary, or the first observation).
    pub period_start_ms: i64,
    done: BTreeMap<Measure, Ids>,
    open: BTreeMap<Measure, Ids>,
    /// Ids closed before they were seen open (a late open must not count).
    closed: BTreeMap<Measure, Ids>,
    /// When each threshold last fired.
    #[serde(default)]
    pub threshold_fired_ms: BTreeMap<String, i64>,
}

impl Tally {
    pub fn new(period_start_ms: i64) -> Self {
        Tally {
            period_start_ms,
            ..Tally::default()
        }
    }

    /// Applies one observation at `at_ms`; true when a figure changed.
    pub fn observe(&mut self, observation: &Observation, at_ms: i64) -> bool {
        match observation {
            Observation::Done(m, id) => self.done.entry(*m).or_default().insert(id, at_ms),
            Observation::Opened(m, id) => {
                if self.closed.get(m).is_some_and(|c| c.contains(id)) {
                    return false;
                }
                self.open.entry(*m).or_default().insert(id, at_ms)
            }
            Observation::Closed(m, id) => {
                let was_open = self.open.get_mut(m).is_some_and(|o| o.remove(id));
                self.closed.entry(*m).or_default().insert(id, at_ms);
                was_open
            }
        }
    }

    /// The figures now.
    pub fn counts(&self) -> Counts {
        Measure::ALL
            .into_iter()
            .map(|m| {
                let set = if m.per_period() {
                    self.done.get(&m)
                } else {
                    self.open.get(&m)
                };
                (m, set.map_or(0, Ids::count))
            })
            .collect()
    }

    /// How many of `measure` opened (or happened) at or after `since_ms` and are still counted.
    pub fn since(&self, measure: Measure, since_ms: i64) -> u64 {
        let set = if measure.per_period() {
            self.done.get(&measure)
        } else {
            self.open.get(&measure)
        };
        set.map_or(0, |s| s.since(since_ms))
    }

    /// The figures of the period ending at `at_ms`; a new period begins (what is open stays open).
    /// Remembered closes older than a period are forgotten.
    pub fn close_period(&mut self, at_ms: i64) -> Counts {
        let counts = self.counts();
        self.done.clear();
        let keep_from = self.period_start_ms;
        for closed in self.closed.values_mut() {
            closed.order.retain(|(_, at)| *at >= keep_from);
            closed.overflow = 0;
        }
        self.period_start_ms = at_ms;
        counts
    }

    /// The tally as one changelog value.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a tally serialises")
    }

    pub fn from_json(text: &str) -> Result<Tally, String> {
        serde_json::from_str(text).map_err(|e| e.to_string())
    }
}

/// A daily summary at a local time in a time zone.
#[derive(Debug, Clone, PartialEq)]
pub struct Daily {
    at: NaiveTime,
    zone: chrono_tz::Tz,
}

impl Daily {
    /// `at` is `HH:MM`, `zone` an IANA name (`Europe/Berlin`).
    pub fn parse(at: &str, zone: &str) -> Result<Daily, String> {
        let at = NaiveTime::parse_from_str(at, "%H:%M")
            .map_err(|_| format!("{at:?} is not a time of day like 08:00"))?;
        let zone: chrono_tz::Tz = zone
            .parse()
            .map_err(|_| format!("{zone:?} is not an IANA time zone"))?;
        Ok(Daily { at, zone })
    }

    /// The first instant after `after_ms` at which the daily summary is due (the local time on
    /// the next day it occurs; a local time skipped by a daylight-saving change is taken an hour
    /// later, a repeated one the first time).
    pub fn next_after(&self, after_ms: i64) -> i64 {
        let after = self
            .zone
            .timestamp_millis_opt(after_ms)
            .single()
            .expect("an instant has one local time");
        let mut day = after.date_naive();
        for _ in 0..3 {
            let local = day.and_time(self.at);
            let candidate = self
                .zone
                .from_local_datetime(&local)
                .earliest()
                .or_else(|| {
                    self.zone
                        .from_local_datetime(&(local + chrono::Duration::hours(1)))
                        .earliest()
                });
            if let Some(at) = candidate.map(|c| c.timestamp_millis()) {
                if at > after_ms {
                    return at;
                }
            }
            day = day.succ_opt().expect("a next day");
        }
        after_ms + 86_400_000
    }
}

/// An event-based summary: `at_least` of `measure` within `within_ms`, at most once per window.
#[derive(Debug, Clone, PartialEq)]
pub struct Threshold {
    pub name: String,
    pub measure: Measure,
    pub at_least: u64,
    pub within_ms: i64,
}

impl Threshold {
    /// Whether the threshold fires now (and records it): crossed, and not fired within the
    /// window already.
    pub fn fires(&self, tally: &mut Tally, now_ms: i64) -> bool {
        let since = now_ms - self.within_ms;
        let recently = tally
            .threshold_fired_ms
            .get(&self.name)
            .is_some_and(|at| *at > since);
        if recently || tally.since(self.measure, since) < self.at_least {
            return false;
        }
        tally.threshold_fired_ms.insert(self.name.clone(), now_ms);
        true
    }
}

/// Changelog keys of tallies: `summary:<name>:<scope>`, the decisions topic's key too.
pub const TALLY_PREFIX: &str = "summary:";

/// The key of summary `name`'s tally for `scope` (a partner id, or `all`).
pub fn tally_key(name: &str, scope: &str) -> String {
    format!("{TALLY_PREFIX}{name}:{scope}")
}

/// Observations for one summary scope, as the route and decide stages send them on the
/// decisions topic (`{"summary": …}`, keyed [`tally_key`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Observed {
    pub summary: String,
    pub scope: String,
    /// When the sender saw it (for diagnostics; the owner counts it at its own time).
    pub at_ms: i64,
    pub observations: Vec<Observation>,
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    summary: Observed,
}

impl Observed {
    pub fn key(&self) -> String {
        tally_key(&self.summary, &self.scope)
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(&Envelope {
            summary: self.clone(),
        })
        .expect("observations serialise")
    }

    /// Observations, `None` when the record is not one, or why it is broken.
    pub fn from_json(bytes: &[u8]) -> Option<Result<Self, String>> {
        let value: Value = serde_json::from_slice(bytes).ok()?;
        let summary = value.as_object()?.get("summary")?.clone();
        Some(serde_json::from_value(summary).map_err(|e| format!("not summary observations: {e}")))
    }
}

/// When one summary is sent.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub daily: Option<Daily>,
    pub thresholds: Vec<Threshold>,
}

/// A summary to send now.
#[derive(Debug, Clone, PartialEq)]
pub struct SummaryFire {
    pub partition: i32,
    pub summary: String,
    pub scope: String,
    /// `daily`, or `threshold:<measure>`.
    pub kind: String,
    pub counts: Counts,
    /// The due time (daily) or the crossing (threshold): with the key, the fire's id.
    pub at_ms: i64,
}

impl SummaryFire {
    /// Stable across a repeat after a crash: the send stage's index drops the repeat.
    pub fn fire_id(&self) -> String {
        format!(
            "{}:{}:{}",
            tally_key(&self.summary, &self.scope),
            self.kind,
            self.at_ms
        )
    }
}

/// The tallies of the partitions this process owns, with the daily summaries in due order.
/// Like the request clocks: every change is a changelog entry ([`Summaries::take_changes`]),
/// restored with its partition; a fire closes the period and is due again the next day.
#[derive(Debug, Default)]
pub struct Summaries {
    schedules: BTreeMap<String, Schedule>,
    tallies: BTreeMap<String, (i32, Tally)>,
    due: std::collections::BTreeSet<(i64, String)>,
    due_of: BTreeMap<String, i64>,
    changes: Vec<(String, String)>,
}

/// `summary:<name>:<scope>` → (name, scope).
fn split_key(key: &str) -> Option<(&str, &str)> {
    key.strip_prefix(TALLY_PREFIX)?.split_once(':')
}

impl Summaries {
    pub fn new(schedules: BTreeMap<String, Schedule>) -> Self {
        Summaries {
            schedules,
            ..Summaries::default()
        }
    }

    pub fn len(&self) -> usize {
        self.tallies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tallies.is_empty()
    }

    /// The changelog entries (`summary:<name>:<scope>` → the tally) since the last call.
    pub fn take_changes(&mut self) -> Vec<(String, String)> {
        std::mem::take(&mut self.changes)
    }

    pub fn next_due_ms(&self) -> Option<i64> {
        self.due.first().map(|(at, _)| *at)
    }

    fn schedule(&mut self, key: &str, after_ms: i64) {
        if let Some(old) = self.due_of.remove(key) {
            self.due.remove(&(old, key.to_string()));
        }
        let Some((name, _)) = split_key(key) else {
            return;
        };
        if let Some(daily) = self.schedules.get(name).and_then(|s| s.daily.as_ref()) {
            let at = daily.next_after(after_ms);
            self.due.insert((at, key.to_string()));
            self.due_of.insert(key.to_string(), at);
        }
    }

    /// Applies observations on `partition` at `now_ms`; returns the thresholds they crossed.
    /// An unknown summary (removed from the configuration) is ignored.
    pub fn observe(
        &mut self,
        partition: i32,
        observed: &Observed,
        now_ms: i64,
    ) -> Vec<SummaryFire> {
        let Some(schedule) = self.schedules.get(&observed.summary) else {
            return Vec::new();
        };
        let key = observed.key();
        let new = !self.tallies.contains_key(&key);
        let (_, tally) = self
            .tallies
            .entry(key.clone())
            .or_insert_with(|| (partition, Tally::new(now_ms)));
        let mut changed = false;
        // The owner's time, not the sender's: one time base for every window of the scope
        // (the senders' clocks, and Meta's timestamps, may disagree).
        for o in &observed.observations {
            changed |= tally.observe(o, now_ms);
        }
        let mut fires = Vec::new();
        for threshold in &schedule.thresholds {
            if threshold.fires(tally, now_ms) {
                fires.push(SummaryFire {
                    partition,
                    summary: observed.summary.clone(),
                    scope: observed.scope.clone(),
                    kind: format!("threshold:{}", threshold.measure.name()),
                    counts: tally.counts(),
                    at_ms: now_ms,
                });
                changed = true;
            }
        }
        if changed || new {
            self.changes.push((key.clone(), tally.to_json()));
        }
        if new {
            self.schedule(&key, now_ms);
        }
        fires
    }

    /// The next daily summary due at `now_ms`: its period closes, its next day is scheduled.
    pub fn take_next_due(&mut self, now_ms: i64) -> Option<SummaryFire> {
        let (at, key) = self.due.first().cloned()?;
        if at > now_ms {
            return None;
        }
        self.due.remove(&(at, key.clone()));
        self.due_of.remove(&key);
        let (name, scope) = split_key(&key).map(|(n, s)| (n.to_string(), s.to_string()))?;
        let (partition, tally) = self.tallies.get_mut(&key)?;
        let partition = *partition;
        let counts = tally.close_period(at);
        self.changes.push((key.clone(), tally.to_json()));
        self.schedule(&key, at);
        Some(SummaryFire {
            partition,
            summary: name,
            scope,
            kind: "daily".into(),
            counts,
            at_ms: at,
        })
    }

    /// Applies the changelog entries of `partition`; unreadable ones are skipped. A daily
    /// summary missed while nobody owned the partition is due at once (once).
    pub fn restore(&mut self, partition: i32, entries: impl IntoIterator<Item = (String, String)>) {
        for (key, value) in entries {
            if split_key(&key).is_none() {
                continue;
            }
            let Ok(tally) = Tally::from_json(&value) else {
                continue;
            };
            let period_start = tally.period_start_ms;
            self.tallies.insert(key.clone(), (partition, tally));
            self.schedule(&key, period_start);
        }
    }

    /// Forgets the tallies of a partition that moved.
    pub fn drop_partition(&mut self, partition: i32) {
        let gone: Vec<String> = self
            .tallies
            .iter()
            .filter(|(_, (p, _))| *p == partition)
            .map(|(k, _)| k.clone())
            .collect();
        for key in gone {
            self.tallies.remove(&key);
            if let Some(at) = self.due_of.remove(&key) {
                self.due.remove(&(at, key));
            }
        }
    }
}

#[cfg(test)]
mod tests;
