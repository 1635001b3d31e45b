//! Who owns which partition, what may be committed, and whether the stage is still healthy.
//!
//! The ledger is the one place the driver's consumer thread, the driver loop and a stage's tasks
//! meet. Every record handed to a stage carries a [`Ticket`]; the ticket is how the stage says
//! the record's hand-off is durable ([`Ticket::finish`]), and how it asks to act on the outside
//! world on the partition's behalf ([`Ticket::begin_effect`]).
//!
//! State machine of a partition: *assigned* (a new generation) → *draining* (revoked or stopping:
//! no new effect may begin, effects already begun may still finish and store their offsets) →
//! gone (late finishes are ignored; the new owner replays from the last commit). A ticket belongs
//! to one generation, so a partition that comes back is never confused with its earlier self.
//!
//! Guarantees:
//! - The committable position of a partition is the lowest unfinished offset (the
//!   [`OffsetTracker`]); nothing past an unfinished record is ever stored.
//! - After [`Ledger::begin_drain`] returns, no effect of the drained partitions can begin, and
//!   [`Ledger::wait_effects`] returns once every begun effect has ended (or at the deadline).
//! - A ticket dropped without being finished while its partition is still assigned and the stage
//!   is not stopping is a defect (a task panicked, or a path forgot the record): it fails the
//!   stage instead of silently holding the partition's commits back forever.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::Notify;

use crate::OffsetTracker;

/// A topic and one of its partitions.
pub type TopicPartition = (String, i32);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Assigned,
    Draining,
}

#[derive(Debug)]
struct Held {
    generation: u64,
    phase: Phase,
    /// Effects begun and not ended yet.
    effects: usize,
}

#[derive(Debug, Default)]
struct State {
    partitions: HashMap<TopicPartition, Held>,
    next_generation: u64,
    tracker: OffsetTracker,
    /// Committable positions not handed to the consumer yet.
    to_store: HashMap<TopicPartition, i64>,
    /// Topics whose offsets are never committed (read from the start on every assignment).
    untracked: HashSet<String>,
    stopping: bool,
    failure: Option<String>,
}

/// Shared by the consumer thread, the driver loop and every ticket.
#[derive(Debug, Default)]
pub struct Ledger {
    state: Mutex<State>,
    /// Signalled whenever an effect ends (the consumer thread waits on it while draining).
    effect_ended: Condvar,
    /// Wakes the driver loop when the stage failed.
    failed: Notify,
}

impl Ledger {
    pub(crate) fn new(untracked: impl IntoIterator<Item = String>) -> Arc<Self> {
        let ledger = Ledger::default();
        ledger.lock().untracked = untracked.into_iter().collect();
        Arc::new(ledger)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock is already a stage failure; the data stays usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Partitions were assigned: each starts a new generation.
    pub(crate) fn assigned(&self, partitions: &[TopicPartition]) {
        let mut state = self.lock();
        for tp in partitions {
            state.next_generation += 1;
            let generation = state.next_generation;
            state.tracker.forget(&tp.0, tp.1);
            state.to_store.remove(tp);
            state.partitions.insert(
                tp.clone(),
                Held {
                    generation,
                    phase: Phase::Assigned,
                    effects: 0,
                },
            );
        }
    }

    /// Whether `tp` is assigned (not draining).
    pub(crate) fn is_assigned(&self, tp: &TopicPartition) -> bool {
        self.lock()
            .partitions
            .get(tp)
            .is_some_and(|h| h.phase == Phase::Assigned)
    }

    /// Work on a record of an assigned partition starts: its ticket. `None` when the partition
    /// is no longer assigned (the record belongs to its new owner).
    pub(crate) fn start(self: &Arc<Self>, tp: &TopicPartition, offset: i64) -> Option<Ticket> {
        let mut state = self.lock();
        let held = state.partitions.get(tp)?;
        if held.phase != Phase::Assigned {
            return None;
        }
        let generation = held.generation;
        let tracked = !state.untracked.contains(&tp.0);
        if tracked {
            state.tracker.start(&tp.0, tp.1, offset);
        }
        Some(Ticket {
            ledger: self.clone(),
            partition: tp.clone(),
            offset,
            generation,
            tracked,
            settled: false,
        })
    }

    /// No effect of `partitions` may begin from now on; begun ones may still finish.
    pub(crate) fn begin_drain(&self, partitions: &[TopicPartition]) {
        let mut state = self.lock();
        for tp in partitions {
            if let Some(held) = state.partitions.get_mut(tp) {
                held.phase = Phase::Draining;
            }
        }
    }

    /// The stage is stopping: every partition drains, and tickets dropped from now on are left
    /// for replay rather than reported as defects.
    pub(crate) fn begin_stopping(&self) -> Vec<TopicPartition> {
        let mut state = self.lock();
        state.stopping = true;
        for held in state.partitions.values_mut() {
            held.phase = Phase::Draining;
        }
        state.partitions.keys().cloned().collect()
    }

    /// Waits until no effect of `partitions` is running, or until `deadline`. True when drained.
    pub(crate) fn wait_effects(&self, partitions: &[TopicPartition], deadline: Instant) -> bool {
        let mut state = self.lock();
        loop {
            let running: usize = partitions
                .iter()
                .filter_map(|tp| state.partitions.get(tp))
                .map(|h| h.effects)
                .sum();
            if running == 0 {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = self
                .effect_ended
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// The drained partitions leave: their committable positions (to be committed now) are
    /// returned, and later finishes of their tickets are ignored.
    pub(crate) fn release(&self, partitions: &[TopicPartition]) -> Vec<(TopicPartition, i64)> {
        let mut state = self.lock();
        let mut positions = Vec::new();
        for tp in partitions {
            state.partitions.remove(tp);
            state.tracker.forget(&tp.0, tp.1);
            if let Some(offset) = state.to_store.remove(tp) {
                positions.push((tp.clone(), offset));
            }
        }
        positions
    }

    /// Committable positions found since the last call.
    pub(crate) fn take_positions(&self) -> Vec<(TopicPartition, i64)> {
        self.lock().to_store.drain().collect()
    }

    /// Records that a record's work is left unfinished on purpose (nothing to undo).
    fn settle(&self, ticket: &Ticket, finished: bool) {
        let mut state = self.lock();
        let current = state
            .partitions
            .get(&ticket.partition)
            .filter(|h| h.generation == ticket.generation)
            .map(|h| h.phase);
        if finished {
            if current.is_some() && ticket.tracked {
                let (topic, partition) = &ticket.partition;
                if let Some(next) = state.tracker.finish(topic, *partition, ticket.offset) {
                    state.to_store.insert(ticket.partition.clone(), next);
                }
            }
        } else if ticket.tracked && current == Some(Phase::Assigned) && !state.stopping {
            let detail = format!(
                "record {}/{}@{} was dropped unfinished while its partition is assigned (a task ended early or panicked)",
                ticket.partition.0, ticket.partition.1, ticket.offset
            );
            state.failure.get_or_insert(detail);
            drop(state);
            self.failed.notify_one();
        }
    }

    /// Fails the stage with `detail` (the first failure is kept).
    pub(crate) fn fail(&self, detail: String) {
        self.lock().failure.get_or_insert(detail);
        self.failed.notify_one();
    }

    pub(crate) fn failure(&self) -> Option<String> {
        self.lock().failure.clone()
    }

    /// Resolves once the stage has failed.
    pub(crate) async fn failed(&self) {
        loop {
            let notified = self.failed.notified();
            if self.lock().failure.is_some() {
                return;
            }
            notified.await;
        }
    }

    fn begin_effect(&self, ticket: &Ticket) -> bool {
        let mut state = self.lock();
        match state.partitions.get_mut(&ticket.partition) {
            Some(held) if held.generation == ticket.generation && held.phase == Phase::Assigned => {
                held.effects += 1;
                true
            }
            _ => false,
        }
    }

    fn end_effect(&self, partition: &TopicPartition, generation: u64) {
        let mut state = self.lock();
        if let Some(held) = state.partitions.get_mut(partition) {
            if held.generation == generation {
                held.effects = held.effects.saturating_sub(1);
            }
        }
        drop(state);
        self.effect_ended.notify_all();
    }

    fn owns(&self, partition: &TopicPartition, generation: u64) -> bool {
        self.lock()
            .partitions
            .get(partition)
            .is_some_and(|h| h.generation == generation && h.phase == Phase::Assigned)
    }
}

/// A stage's handle on the stage's health, for tasks that hold no record.
#[derive(Debug, Clone)]
pub struct Supervisor {
    pub(crate) ledger: Arc<Ledger>,
}

impl Supervisor {
    /// Fails the stage: the driver stops, commits what finished and returns `detail`.
    pub fn fail(&self, detail: impl Into<String>) {
        let detail = detail.into();
        tracing::error!(error = %detail, "stage failed");
        self.ledger.fail(detail);
    }

    /// Whether the stage failed.
    pub fn has_failed(&self) -> bool {
        self.ledger.failure().is_some()
    }

    /// Asks to act on the world on behalf of partition `tp` itself rather than of one of its
    /// records (a timer of the partition's state fired). `None` unless `tp` is assigned and not
    /// draining; while the guard lives, a revoke of `tp` waits for it as for a record's effect.
    pub fn begin_effect(&self, tp: &TopicPartition) -> Option<EffectGuard> {
        let mut state = self.ledger.lock();
        let held = state.partitions.get_mut(tp)?;
        if held.phase != Phase::Assigned {
            return None;
        }
        held.effects += 1;
        Some(EffectGuard {
            ledger: self.ledger.clone(),
            partition: tp.clone(),
            generation: held.generation,
        })
    }
}

/// One record's claim on its partition's progress. See the module docs.
#[derive(Debug)]
pub struct Ticket {
    ledger: Arc<Ledger>,
    partition: TopicPartition,
    offset: i64,
    generation: u64,
    tracked: bool,
    settled: bool,
}

impl Ticket {
    /// The record's hand-off is durable: its offset may be committed once every earlier record
    /// of the partition has finished too.
    pub fn finish(mut self) {
        self.settled = true;
        self.ledger.settle(&self, true);
    }

    /// Leaves the record unfinished on purpose, for a replay (the stage is giving the work up).
    /// Only meaningful while draining or stopping; otherwise the stage fails as for a drop.
    pub fn leave(mut self) {
        self.settled = true;
        self.ledger.settle(&self, false);
    }

    /// Fails the stage because this record's hand-off failed.
    pub fn fail(mut self, detail: impl Into<String>) {
        self.settled = true;
        let detail = detail.into();
        tracing::error!(
            topic = %self.partition.0,
            partition = self.partition.1,
            offset = self.offset,
            error = %detail,
            "hand-off failed; stopping the stage so that the record is replayed"
        );
        self.ledger.fail(detail);
    }

    /// Whether the record's partition is still assigned here (not draining, not moved).
    pub fn owned(&self) -> bool {
        self.ledger.owns(&self.partition, self.generation)
    }

    /// Asks to act on the record's behalf (send it, produce what it caused). `None` once the
    /// partition is draining or gone: the work is then left to the partition's next owner. While
    /// the guard lives, a revoke waits (up to its deadline) before the partition is committed
    /// and given up.
    pub fn begin_effect(&self) -> Option<EffectGuard> {
        self.ledger.begin_effect(self).then(|| EffectGuard {
            ledger: self.ledger.clone(),
            partition: self.partition.clone(),
            generation: self.generation,
        })
    }

    pub fn topic(&self) -> &str {
        &self.partition.0
    }

    pub fn partition(&self) -> i32 {
        self.partition.1
    }

    pub fn offset(&self) -> i64 {
        self.offset
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.settled {
            self.ledger.settle(self, false);
        }
    }
}

/// An effect in progress on a partition's behalf (see [`Ticket::begin_effect`]).
#[derive(Debug)]
pub struct EffectGuard {
    ledger: Arc<Ledger>,
    partition: TopicPartition,
    generation: u64,
}

impl Drop for EffectGuard {
    fn drop(&mut self) {
        self.ledger.end_effect(&self.partition, self.generation);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn tp(p: i32) -> TopicPartition {
        ("in".to_string(), p)
    }

    #[test]
    fn finishes_store_only_up_to_the_lowest_unfinished_record() {
        let ledger = Ledger::new([]);
        ledger.assigned(&[tp(0)]);
        let tickets: Vec<Ticket> = (10..13).map(|o| ledger.start(&tp(0), o).unwrap()).collect();
        let mut tickets = tickets.into_iter();
        let (t10, t11, t12) = (
            tickets.next().unwrap(),
            tickets.next().unwrap(),
            tickets.next().unwrap(),
        );
        t12.finish();
        assert!(ledger.take_positions().is_empty(), "10 and 11 unfinished");
        t10.finish();
        assert_eq!(ledger.take_positions(), vec![(tp(0), 11)]);
        t11.finish();
        assert_eq!(ledger.take_positions(), vec![(tp(0), 13)]);
    }

    #[test]
    fn a_dropped_ticket_fails_the_stage_unless_the_partition_is_draining() {
        let ledger = Ledger::new([]);
        ledger.assigned(&[tp(0), tp(1)]);
        ledger.begin_drain(&[tp(1)]);
        drop(ledger.start(&tp(0), 1).unwrap());
        assert!(ledger.failure().unwrap().contains("in/0@1"));

        let ledger = Ledger::new([]);
        ledger.assigned(&[tp(1)]);
        let ticket = ledger.start(&tp(1), 5).unwrap();
        ledger.begin_drain(&[tp(1)]);
        drop(ticket);
        assert_eq!(ledger.failure(), None, "left for the next owner");
    }

    #[test]
    fn untracked_topics_never_store_and_never_fail() {
        let ledger = Ledger::new(["log".to_string()]);
        let log = ("log".to_string(), 0);
        ledger.assigned(std::slice::from_ref(&log));
        ledger.start(&log, 3).unwrap().finish();
        drop(ledger.start(&log, 4).unwrap());
        assert!(ledger.take_positions().is_empty());
        assert_eq!(ledger.failure(), None);
    }

    #[test]
    fn no_effect_begins_after_a_drain_and_the_drain_waits_for_begun_ones() {
        let ledger = Ledger::new([]);
        ledger.assigned(&[tp(0)]);
        let ticket = ledger.start(&tp(0), 7).unwrap();
        let effect = ticket.begin_effect().expect("assigned");
        ledger.begin_drain(&[tp(0)]);
        assert!(ticket.begin_effect().is_none(), "draining");
        assert!(!ticket.owned());
        assert!(
            !ledger.wait_effects(&[tp(0)], Instant::now() + Duration::from_millis(50)),
            "the begun effect still runs"
        );
        let waiter = {
            let ledger = ledger.clone();
            std::thread::spawn(move || {
                ledger.wait_effects(&[tp(0)], Instant::now() + Duration::from_secs(10))
            })
        };
        ticket.finish();
        drop(effect);
        assert!(waiter.join().unwrap(), "drained once the effect ended");
        assert_eq!(ledger.release(&[tp(0)]), vec![(tp(0), 8)]);
    }

    #[test]
    fn a_partition_that_comes_back_is_a_new_generation() {
        let ledger = Ledger::new([]);
        ledger.assigned(&[tp(0)]);
        let old = ledger.start(&tp(0), 1).unwrap();
        ledger.begin_drain(&[tp(0)]);
        ledger.release(&[tp(0)]);
        ledger.assigned(&[tp(0)]);
        assert!(!old.owned());
        assert!(old.begin_effect().is_none());
        old.finish();
        assert!(ledger.take_positions().is_empty(), "the old claim is void");
        let new = ledger.start(&tp(0), 1).unwrap();
        assert!(new.owned());
        new.finish();
        assert_eq!(ledger.take_positions(), vec![(tp(0), 2)]);
    }

    #[test]
    fn a_partitions_own_effect_is_waited_for_like_a_records() {
        let ledger = Ledger::new([]);
        let supervisor = Supervisor {
            ledger: ledger.clone(),
        };
        assert!(supervisor.begin_effect(&tp(0)).is_none(), "not assigned");
        ledger.assigned(&[tp(0)]);
        let effect = supervisor.begin_effect(&tp(0)).expect("assigned");
        ledger.begin_drain(&[tp(0)]);
        assert!(supervisor.begin_effect(&tp(0)).is_none(), "draining");
        assert!(!ledger.wait_effects(&[tp(0)], Instant::now() + Duration::from_millis(50)));
        drop(effect);
        assert!(ledger.wait_effects(&[tp(0)], Instant::now() + Duration::from_millis(50)));
    }
}
