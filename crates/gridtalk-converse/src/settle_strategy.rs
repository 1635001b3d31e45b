//! The settlement's strategy for the driver: candidates from the decisions topic settled in
//! partition order, and what they produce published.
//!
//! A candidate's outcomes (the decision or the refusal, the reply) are enqueued in order and, in a
//! task, acknowledged; then the settlement goes to the converse-state changelog (key
//! `settled:<request>`, on the decisions partition's number) and is acknowledged; then the
//! candidate is committed. A crash in between replays the candidate, which the restored (or not
//! yet written) settlement answers the same way, with the same ids.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::message::Message;
use tokio::task::JoinSet;

use gridtalk_kafka::driver::{Record, StageFailure, Strategy, Submit, TopicPartition};
use gridtalk_kafka::DeadLetterReason;
use gridtalk_telemetry::Metrics;

use crate::conversation::Candidate;
use crate::settle::{Settlements, KEY_PREFIX};
use crate::strategy::{publish, read_or_dead_letter, restore_state, sweep_state, Publishing};

pub(crate) const STAGE: &str = "decide";
/// How often expired settlements are forgotten and tombstoned.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

pub(crate) struct SettleStrategy {
    publishing: Arc<Publishing>,
    settlements: Settlements,
    /// Response ids found on the response topic at the last takeovers (see the converse
    /// strategy): a replayed candidate's decision is not published twice.
    published: Arc<Mutex<HashMap<String, i64>>>,
    tasks: JoinSet<()>,
    sweep: tokio::time::Interval,
}

impl SettleStrategy {
    pub(crate) fn new(publishing: Arc<Publishing>, settlements: Settlements) -> Self {
        let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        SettleStrategy {
            publishing,
            settlements,
            published: Arc::new(Mutex::new(HashMap::new())),
            tasks: JoinSet::new(),
            sweep,
        }
    }

    fn count_memory(&self) {
        Metrics::global()
            .state_entries
            .with_label_values(&["settlements"])
            .set(self.settlements.len() as i64);
    }
}

impl Strategy for SettleStrategy {
    async fn assigned(&mut self, partitions: &[TopicPartition]) -> Result<(), StageFailure> {
        let numbers: Vec<i32> = partitions.iter().map(|(_, p)| *p).collect();
        if numbers.is_empty() {
            return Ok(());
        }
        let entries = restore_state(&self.publishing, &self.published, numbers, |key| {
            key.starts_with(KEY_PREFIX)
        })
        .await?;
        let now = now_ms();
        for (partition, restored) in entries {
            self.settlements.restore(partition, restored, now);
        }
        self.count_memory();
        Ok(())
    }

    fn revoked(&mut self, partitions: &[TopicPartition]) {
        for (_, partition) in partitions {
            self.settlements.drop_partition(*partition);
            self.publishing
                .expiries
                .lock()
                .expect("expiries")
                .remove(partition);
        }
        self.count_memory();
    }

    fn submit(&mut self, record: Record) -> Submit {
        let Ok(permit) = self.publishing.in_flight.clone().try_acquire_owned() else {
            return Submit::PushBack(record);
        };
        let Some((candidate, record, permit)) = read_or_dead_letter(
            &self.publishing,
            &mut self.tasks,
            (record, permit),
            DeadLetterReason::MalformedDecision,
            Candidate::from_json,
        ) else {
            return Submit::Accepted;
        };
        let outcomes = self
            .settlements
            .settle(record.message.partition(), &candidate, now_ms());
        let changes = self.settlements.take_changes();
        self.count_memory();
        let Some(effect) = record.ticket.begin_effect() else {
            // Revoked meanwhile: the new owner settles it again.
            return Submit::Accepted;
        };
        publish(
            &self.publishing,
            &self.published,
            record,
            &candidate.item_id,
            outcomes,
            changes,
            (effect, permit),
        );
        Submit::Accepted
    }

    async fn poll(&mut self) -> Result<(), StageFailure> {
        tokio::select! {
            Some(ended) = self.tasks.join_next() => match ended {
                Err(e) if e.is_panic() => Err(StageFailure(format!("a settlement task panicked: {e}"))),
                _ => Ok(()),
            },
            _ = self.publishing.room.notified() => Ok(()),
            _ = self.sweep.tick() => {
                sweep_state(&self.publishing);
                self.settlements.evict(now_ms());
                self.count_memory();
                Ok(())
            }
        }
    }
}
