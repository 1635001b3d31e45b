//! The sent index: which outbox messages WhatsApp already accepted, per outbox partition, so an
//! outbox record replayed after a crash or a rebalance (its offset not yet committed) is not sent
//! a second time.
//!
//! It is partition-local state backed by the compacted changelog `topics.send_index`: the entry
//! for a message read from outbox partition `p` is written to partition `p` (key: message id,
//! value: the wamid, the recipient and the send time, with its expiry) and acknowledged before the
//! outbox offset may be committed. The recipients and times let a new owner of the partition
//! charge the previous owner's recent sends to its pair limiter.
//! A partition's entries are restored from the changelog before its first record is handled and
//! dropped when the partition is revoked; expired entries are deleted with tombstones.
//!
//! Before a request goes out, the message's *intent* is written to the same key (no wamid yet,
//! the request's `biz_opaque_callback_data` instead) and acknowledged: a message whose entry is
//! still an intent when its record comes back is *in doubt* — the request may or may not have
//! reached WhatsApp — and is resolved from the status webhooks before it may be sent again (see
//! `crate::in_doubt`).

use std::collections::HashMap;

use gridtalk_kafka::changelog::StoredEntry;

#[derive(Debug, Default)]
pub struct SentIndex {
    partitions: HashMap<i32, HashMap<String, StoredEntry>>,
}

impl SentIndex {
    #[cfg(test)]
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
            .map(|e| IndexedSend::decode(&e.value))
            .filter(|send| !send.is_intent())
            .map(|send| send.wamid)
    }

    /// The intent of `message_id` when it has no outcome: its request may have reached WhatsApp.
    pub fn in_doubt(&self, partition: i32, message_id: &str) -> Option<IndexedSend> {
        self.partitions
            .get(&partition)?
            .get(message_id)
            .map(|e| IndexedSend::decode(&e.value))
            .filter(IndexedSend::is_intent)
    }

    /// Every message of `partition` in doubt.
    pub fn in_doubt_of(&self, partition: i32) -> Vec<IndexedSend> {
        self.partitions
            .get(&partition)
            .into_iter()
            .flat_map(HashMap::values)
            .map(|e| IndexedSend::decode(&e.value))
            .filter(IndexedSend::is_intent)
            .collect()
    }

    pub fn record(
        &mut self,
        partition: i32,
        message_id: &str,
        send: &IndexedSend,
        expires_at_ms: i64,
    ) {
        if let Some(entries) = self.partitions.get_mut(&partition) {
            entries.insert(
                message_id.to_string(),
                StoredEntry {
                    value: send.encode(),
                    expires_at_ms,
                },
            );
        }
    }

    /// (recipient, send time) of every send held for `partition` since `since_ms`.
    pub fn sends_since(&self, partition: i32, since_ms: i64) -> Vec<(String, i64)> {
        self.partitions
            .get(&partition)
            .into_iter()
            .flat_map(HashMap::values)
            .map(|e| IndexedSend::decode(&e.value))
            .filter(|send| send.sent_at_ms >= since_ms && !send.recipient.is_empty())
            .map(|send| (send.recipient, send.sent_at_ms))
            .collect()
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

/// One send as the changelog holds it: `wamid`, recipient, send time and the request's
/// `biz_opaque_callback_data`, tab-separated. An intent (the request about to go out) has no
/// wamid yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexedSend {
    /// Empty for an intent.
    pub wamid: String,
    pub recipient: String,
    /// Wall-clock milliseconds when the request went (or was about to go) to WhatsApp.
    pub sent_at_ms: i64,
    /// The `biz_opaque_callback_data` the request carried (empty in entries written before
    /// requests carried one).
    pub callback: String,
}

impl IndexedSend {
    pub fn is_intent(&self) -> bool {
        self.wamid.is_empty()
    }

    pub fn encode(&self) -> Vec<u8> {
        format!(
            "{}\t{}\t{}\t{}",
            self.wamid, self.recipient, self.sent_at_ms, self.callback
        )
        .into_bytes()
    }

    /// Decodes an entry; a value of only a wamid (written before recipients and times were
    /// kept) decodes with no recipient, which no limiter is charged for, and one without a
    /// callback (written before intents were) with an empty one.
    pub fn decode(value: &[u8]) -> IndexedSend {
        let text = String::from_utf8_lossy(value);
        let mut fields = text.splitn(4, '\t');
        IndexedSend {
            wamid: fields.next().unwrap_or_default().to_string(),
            recipient: fields.next().unwrap_or_default().to_string(),
            sent_at_ms: fields.next().and_then(|t| t.parse().ok()).unwrap_or(0),
            callback: fields.next().unwrap_or_default().to_string(),
        }
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
        index.record(0, "m1", &send("wamid.1", 10), 1_000);
        index.record(1, "m2", &send("wamid.2", 10), 1_000); // partition 1 is not held: ignored
        assert_eq!(index.accepted(0, "m1").as_deref(), Some("wamid.1"));
        assert_eq!(index.accepted(1, "m2"), None);
        assert_eq!(index.expire(999), vec![]);
        assert_eq!(index.expire(1_000), vec![(0, "m1".to_string())]);
        assert_eq!(index.len(), 0);
        index.record(0, "m3", &send("wamid.3", 10), 5_000);
        index.drop_partition(0);
        assert_eq!(index.accepted(0, "m3"), None);
        assert!(!index.is_restored(0));
    }

    fn send(wamid: &str, sent_at_ms: i64) -> IndexedSend {
        IndexedSend {
            wamid: wamid.into(),
            recipient: "+14155550101".into(),
            sent_at_ms,
            callback: "m".into(),
        }
    }

    #[test]
    fn entries_carry_recipient_and_time_and_old_entries_still_decode() {
        let mut index = SentIndex::default();
        index.restored(
            0,
            HashMap::from([(
                "old".to_string(),
                StoredEntry {
                    value: b"wamid.0".to_vec(),
                    expires_at_ms: 9_000,
                },
            )]),
        );
        index.record(0, "m1", &send("wamid.1", 100), 9_000);
        index.record(0, "m2", &send("wamid.2", 200), 9_000);
        assert_eq!(index.accepted(0, "old").as_deref(), Some("wamid.0"));
        assert_eq!(index.accepted(0, "m2").as_deref(), Some("wamid.2"));
        let mut recent = index.sends_since(0, 150);
        recent.sort();
        assert_eq!(recent, vec![("+14155550101".to_string(), 200)]);
        assert_eq!(IndexedSend::decode(&send("w", 5).encode()), send("w", 5));
    }

    #[test]
    fn an_intent_is_in_doubt_until_its_outcome_replaces_it() {
        let mut index = SentIndex::default();
        index.restored(0, HashMap::new());
        let intent = send("", 300);
        assert!(intent.is_intent());
        index.record(0, "m1", &intent, 9_000);
        assert_eq!(index.accepted(0, "m1"), None, "not known to be accepted");
        assert_eq!(index.in_doubt(0, "m1"), Some(intent.clone()));
        assert_eq!(index.in_doubt_of(0), vec![intent]);
        // The intent counts for the pair limit: the request may have gone.
        assert_eq!(index.sends_since(0, 0).len(), 1);
        index.record(0, "m1", &send("wamid.1", 300), 9_000);
        assert_eq!(index.accepted(0, "m1").as_deref(), Some("wamid.1"));
        assert_eq!(index.in_doubt(0, "m1"), None);
        assert!(index.in_doubt_of(0).is_empty());
        // An entry written before intents existed is an outcome.
        let old = IndexedSend::decode(b"wamid.0\t+14155550101\t7");
        assert_eq!((old.is_intent(), old.callback.as_str()), (false, ""));
    }
}
