//! The dedupe window: event ids seen recently, forgotten after the window or when the bound is
//! reached (oldest first). Local to the process; events are keyed by their correlation key, so
//! duplicates of one event land on the same partition and therefore the same process.

use std::collections::{HashMap, VecDeque};

#[derive(Debug)]
pub struct DedupeWindow {
    window_ms: i64,
    max_entries: usize,
    expiry_by_id: HashMap<String, i64>,
    /// Ids in insertion order with their expiry; stale pairs are skipped when popped.
    order: VecDeque<(i64, String)>,
}

impl DedupeWindow {
    pub fn new(window_ms: i64, max_entries: usize) -> Self {
        DedupeWindow {
            window_ms,
            max_entries: max_entries.max(1),
            expiry_by_id: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Whether `id` was remembered within the window ending at `now_ms`.
    pub fn contains(&mut self, id: &str, now_ms: i64) -> bool {
        self.expire(now_ms);
        self.expiry_by_id.get(id).is_some_and(|&e| e > now_ms)
    }

    /// Remembers `id` until `now_ms + window`.
    pub fn remember(&mut self, id: &str, now_ms: i64) {
        let expiry = now_ms + self.window_ms;
        self.expiry_by_id.insert(id.to_string(), expiry);
        self.order.push_back((expiry, id.to_string()));
        while self.expiry_by_id.len() > self.max_entries {
            self.pop_oldest();
        }
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
    }
}
