//! Which offset is safe to commit while records finish out of order.

use std::collections::{BTreeSet, HashMap};

/// Tracks, per topic-partition, the offsets that were handed to work and not finished yet.
///
/// The committable position of a partition is the lowest unfinished offset, or one past the
/// highest started offset when nothing is unfinished. A crash can therefore only replay work, never
/// skip it. Not thread-safe by itself: the owning stage keeps it behind its own lock.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: HashMap<(String, i32), PartitionState>,
}

#[derive(Debug, Default)]
struct PartitionState {
    in_flight: BTreeSet<i64>,
    next_after_started: i64,
    last_committable: i64,
}

impl OffsetTracker {
    /// Records that work on `offset` started.
    ///
    /// An offset below the position the tracker last considered committable means the record came
    /// again: the consumer was sent back (the partition was revoked and assigned again, and
    /// consumption resumed from the last commit) or the broker delivered it twice. The tracker then
    /// lowers that position, so the replayed records store their positions again (a commit lost in
    /// the revocation is retried), while everything still in flight keeps holding the commit back.
    pub fn start(&mut self, topic: &str, partition: i32, offset: i64) {
        let state = self
            .partitions
            .entry((topic.to_string(), partition))
            .or_insert_with(|| PartitionState {
                last_committable: offset,
                ..PartitionState::default()
            });
        if offset < state.last_committable {
            state.last_committable = offset;
        }
        state.in_flight.insert(offset);
        state.next_after_started = state.next_after_started.max(offset + 1);
    }

    /// Records that work on `offset` finished (handed off durably). Returns the new committable
    /// position when it advanced.
    pub fn finish(&mut self, topic: &str, partition: i32, offset: i64) -> Option<i64> {
        let state = self.partitions.get_mut(&(topic.to_string(), partition))?;
        if !state.in_flight.remove(&offset) {
            return None;
        }
        let committable = state
            .in_flight
            .first()
            .copied()
            .unwrap_or(state.next_after_started);
        if committable > state.last_committable {
            state.last_committable = committable;
            Some(committable)
        } else {
            None
        }
    }

    /// Unfinished offsets in all partitions.
    pub fn in_flight(&self) -> usize {
        self.partitions.values().map(|s| s.in_flight.len()).sum()
    }

    /// Forgets a partition (revoked): its late completions must not store offsets.
    pub fn forget(&mut self, topic: &str, partition: i32) {
        self.partitions.remove(&(topic.to_string(), partition));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_only_up_to_the_lowest_unfinished_offset() {
        let mut t = OffsetTracker::default();
        for o in 10..15 {
            t.start("in", 0, o);
        }
        assert_eq!(
            t.finish("in", 0, 12),
            None,
            "10 and 11 are still unfinished"
        );
        assert_eq!(t.finish("in", 0, 10), Some(11));
        assert_eq!(t.finish("in", 0, 11), Some(13), "12 was already done");
        assert_eq!(t.finish("in", 0, 14), None);
        assert_eq!(t.finish("in", 0, 13), Some(15));
        assert_eq!(t.in_flight(), 0);
        assert_eq!(t.finish("in", 0, 13), None, "finishing twice is harmless");
    }

    #[test]
    fn a_replay_from_an_earlier_offset_stores_positions_again() {
        let mut t = OffsetTracker::default();
        for o in 0..3 {
            t.start("in", 0, o);
        }
        assert_eq!(t.finish("in", 0, 0), Some(1));
        assert_eq!(t.finish("in", 0, 1), Some(2));
        assert_eq!(t.finish("in", 0, 2), Some(3));
        // The store of 3 never reached the broker (the partition was revoked meanwhile); after the
        // assignment comes back, consumption resumes at the last commit, 1.
        t.start("in", 0, 1);
        t.start("in", 0, 2);
        assert_eq!(t.finish("in", 0, 1), Some(2));
        assert_eq!(t.finish("in", 0, 2), Some(3), "3 is stored again");
    }

    #[test]
    fn a_record_delivered_twice_never_moves_the_commit_past_unfinished_work() {
        let mut t = OffsetTracker::default();
        for o in 20..=30 {
            t.start("in", 0, o);
        }
        for o in 27..=30 {
            assert_eq!(t.finish("in", 0, o), None, "20 to 26 are unfinished");
        }
        // 29 arrives again (finished already) and is handled again.
        t.start("in", 0, 29);
        assert_eq!(
            t.finish("in", 0, 29),
            None,
            "20 to 26 still hold the commit"
        );
        for o in 20..26 {
            assert_eq!(t.finish("in", 0, o), Some(o + 1));
        }
        assert_eq!(t.finish("in", 0, 26), Some(31));
    }

    #[test]
    fn partitions_are_independent_and_forgettable() {
        let mut t = OffsetTracker::default();
        t.start("in", 0, 5);
        t.start("in", 1, 7);
        assert_eq!(t.finish("in", 1, 7), Some(8));
        t.forget("in", 0);
        assert_eq!(t.finish("in", 0, 5), None);
    }
}
