//! The sent index: which outbox messages WhatsApp already accepted, per outbox partition, so an
//! outbox record replayed after a crash or a rebalance (its offset not yet committed) is not sent
//! a second time.
//!
//! It is partition-local state backed by the compacted changelog `topics.send_index`: the entry
//! for a message read from outbox partition `p` is written to partition `p` (key: message id,
//! value: the wamid, with its expiry) and acknowledged before the outbox offset may be committed.
//! A partition's entries are restored from the changelog before its first record is handled and
//! dropped when the partition is revoked; expired entries are deleted with tombstones.

use std::collections::HashMap;

use gridtalk_kafka::changelog::StoredEntry;

#[derive(Debug, Default)]
pub struct SentIndex {
    partitions: HashMap<i32, HashMap<String, StoredEntry>>,
}

impl SentIndex {
    pub fn is_restored(&self, partition: i32) -> bool {
        self.partitions.contains_key(&partition)
    }

    pub fn restored(&mut self, partition: i32, entries: HashMap<String, StoredEntry>) {
        self.partitions.insert(partition, entries);
    }

    /// Forgets a revoked partition; it is restored again if it comes back.
    pub fn drop_partition(&mut self, partition: i32) {
        self.partitions.remove(&partition);
    }

    /// The wamid WhatsApp gave `message_id`, if it was accepted.
    pub fn accepted(&self, partition: i32, message_id: &str) -> Option<String> {
        self.partitions
            .get(&partition)?
            .get(message_id)
            .map(|e| String::from_utf8_lossy(&e.value).into_owned())
    }

    pub fn record(&mut self, partition: i32, message_id: &str, wamid: &str, expires_at_ms: i64) {
        if let Some(entries) = self.partitions.get_mut(&partition) {
            entries.insert(
                message_id.to_string(),
                StoredEntry {
                    value: wamid.as_bytes().to_vec(),
                    expires_at_ms,
                },
            );
        }
    }

    /// Removes and returns the entries expired at `now_ms`, for tombstones.
    pub fn expire(&mut self, now_ms: i64) -> Vec<(i32, String)> {
        let mut expired = Vec::new();
        for (partition, entries) in &mut self.partitions {
            entries.retain(|key, entry| {
                let live = entry.expires_at_ms > now_ms;
                if !live {
                    expired.push((*partition, key.clone()));
                }
                live
            });
        }
        expired
    }

    pub fn len(&self) -> usize {
        self.partitions.values().map(HashMap::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_per_partition_and_forgets_on_revoke_and_expiry() {
        let mut index = SentIndex::default();
        assert!(!index.is_restored(0));
        index.restored(0, HashMap::new());
        index.record(0, "m1", "wamid.1", 1_000);
        index.record(1, "m2", "wamid.2", 1_000); // partition 1 is not held: ignored
        assert_eq!(index.accepted(0, "m1").as_deref(), Some("wamid.1"));
        assert_eq!(index.accepted(1, "m2"), None);
        assert_eq!(index.expire(999), vec![]);
        assert_eq!(index.expire(1_000), vec![(0, "m1".to_string())]);
        assert_eq!(index.len(), 0);
        index.record(0, "m3", "wamid.3", 5_000);
        index.drop_partition(0);
        assert_eq!(index.accepted(0, "m3"), None);
        assert!(!index.is_restored(0));
    }
}
