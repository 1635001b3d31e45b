//! The dedupe window of one input partition: event ids seen recently, forgotten after the window
//! or when the bound is reached (oldest first). Events are keyed by their correlation key, so
//! duplicates of one event land on the same partition and therefore the same window. The route
//! stage backs each window with a compacted changelog partition (see the stage), so the window
//! survives restarts and follows the partition to another process; ids the window forgets are
//! handed out by [`DedupeWindow::take_forgotten`] to be deleted there too.

use std::collections::{HashMap, VecDeque};

#[derive(Debug)]
pub struct DedupeWindow {
    window_ms: i64,
    max_entries: usize,
    expiry_by_id: HashMap<String, i64>,
    /// Ids in insertion order with their expiry; stale pairs are skipped when popped.
    order: VecDeque<(i64, String)>,
    /// Ids forgotten since the last [`DedupeWindow::take_forgotten`].
    forgotten: Vec<String>,
}

impl DedupeWindow {
    pub fn new(window_ms: i64, max_entries: usize) -> Self {
        DedupeWindow {
            window_ms,
            max_entries: max_entries.max(1),
            expiry_by_id: HashMap::new(),
            order: VecDeque::new(),
            forgotten: Vec::new(),
        }
    }

    /// Builds a window from restored `(id, expiry)` entries.
    pub fn restored(
        window_ms: i64,
        max_entries: usize,
        mut entries: Vec<(String, i64)>,
        now_ms: i64,
    ) -> Self {
        let mut window = DedupeWindow::new(window_ms, max_entries);
        entries.sort_by_key(|(_, expiry)| *expiry);
        for (id, expiry) in entries {
            if expiry > now_ms {
                window.remember_until(&id, expiry);
            }
        }
        window
    }

    /// Whether `id` was remembered within the window ending at `now_ms`.
    pub fn contains(&mut self, id: &str, now_ms: i64) -> bool {
        self.expire(now_ms);
        self.expiry_by_id.get(id).is_some_and(|&e| e > now_ms)
    }

    /// Remembers `id` until `now_ms + window`; returns that expiry.
    pub fn remember(&mut self, id: &str, now_ms: i64) -> i64 {
        let expiry = now_ms + self.window_ms;
        self.remember_until(id, expiry);
        expiry
    }

    fn remember_until(&mut self, id: &str, expiry: i64) {
        self.expiry_by_id.insert(id.to_string(), expiry);
        self.order.push_back((expiry, id.to_string()));
        while self.expiry_by_id.len() > self.max_entries {
            self.pop_oldest();
        }
    }

    /// Forgets what expired at `now_ms`.
    pub fn expire_now(&mut self, now_ms: i64) {
        self.expire(now_ms);
    }

    /// The ids forgotten (expired or pushed out by the bound) since the last call.
    pub fn take_forgotten(&mut self) -> Vec<String> {
        std::mem::take(&mut self.forgotten)
    }

    pub fn len(&self) -> usize {
        self.expiry_by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.expiry_by_id.is_empty()
    }

    fn expire(&mut self, now_ms: i64) {
        while self.order.front().is_some_and(|(e, _)| *e <= now_ms) {
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) {
        if let Some((expiry, id)) = self.order.pop_front() {
            // Only remove when this queue entry is the id's current expiry (not re-remembered since).
            if self.expiry_by_id.get(&id) == Some(&expiry) {
                self.expiry_by_id.remove(&id);
                self.forgotten.push(id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_remembered_for_the_window_only() {
        let mut d = DedupeWindow::new(1_000, 10);
        d.remember("a", 0);
        assert!(d.contains("a", 999));
        assert!(!d.contains("a", 1_000));
        assert!(d.is_empty());
    }

    #[test]
    fn the_bound_forgets_the_oldest_first() {
        let mut d = DedupeWindow::new(1_000_000, 2);
        d.remember("a", 0);
        d.remember("b", 1);
        d.remember("c", 2);
        assert!(!d.contains("a", 3));
        assert!(d.contains("b", 3) && d.contains("c", 3));
        assert_eq!(d.len(), 2);
        assert_eq!(d.take_forgotten(), ["a"]);
        assert!(d.take_forgotten().is_empty());
    }

    #[test]
    fn a_restored_window_keeps_live_entries_in_expiry_order() {
        let entries = vec![
            ("late".into(), 300),
            ("gone".into(), 50),
            ("early".into(), 200),
        ];
        let mut d = DedupeWindow::restored(1_000, 10, entries, 100);
        assert_eq!(d.len(), 2);
        assert!(d.contains("early", 150) && d.contains("late", 150));
        d.expire_now(250);
        assert_eq!(d.take_forgotten(), ["early"]);
        assert!(d.contains("late", 250));
    }
}
