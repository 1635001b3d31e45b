//! A consuming stage's progress: which input offsets may be committed, and how the stage stops.
//!
//! Every consuming stage works the same way: records are started in consumption order, finished
//! when their hand-off is durable (possibly out of order), and only the offset after the lowest
//! unfinished record is stored for librdkafka's commits. A hand-off that fails stops the stage so
//! the process restarts and replays. On stop, in-flight work drains up to a deadline, stored
//! offsets are committed synchronously and the group is left.

use std::sync::Mutex;
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::producer::DeliveryFuture;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::{OffsetTracker, StageContext};

pub struct StageProgress {
    stage: &'static str,
    consumer: StreamConsumer<StageContext>,
    tracker: Mutex<OffsetTracker>,
    failure: Mutex<Option<String>>,
    /// Cancelled when the stage stops (shutdown, or a failed hand-off).
    pub stop: CancellationToken,
}

impl StageProgress {
    pub fn new(
        stage: &'static str,
        consumer: StreamConsumer<StageContext>,
        stop: CancellationToken,
    ) -> Self {
        StageProgress {
            stage,
            consumer,
            tracker: Mutex::new(OffsetTracker::default()),
            failure: Mutex::new(None),
            stop,
        }
    }

    pub fn consumer(&self) -> &StreamConsumer<StageContext> {
        &self.consumer
    }

    /// The partitions of `topic` to restore before handling a record of `current`: every assigned
    /// one not yet `held`, and `current` itself, so a new assignment is restored in one pass.
    pub fn partitions_to_restore(
        &self,
        topic: &str,
        current: i32,
        held: impl Fn(i32) -> bool,
    ) -> Vec<i32> {
        let mut wanted: Vec<i32> = self
            .consumer
            .assignment()
            .map(|tpl| {
                tpl.elements_for_topic(topic)
                    .iter()
                    .map(|e| e.partition())
                    .filter(|p| !held(*p))
                    .collect()
            })
            .unwrap_or_default();
        if !wanted.contains(&current) {
            wanted.push(current);
        }
        wanted
    }

    /// The partitions revoked since the last call. The tracker forgets them: work left to their
    /// new owner holds nothing back, late completions store no offsets, and a partition that
    /// comes back starts again from its committed offset.
    pub fn take_revoked(&self) -> Vec<(String, i32)> {
        let revoked = self.consumer.context().take_revoked();
        let mut tracker = self.tracker.lock().expect("tracker");
        for (topic, partition) in &revoked {
            tracker.forget(topic, *partition);
        }
        revoked
    }

    /// Work on a record started.
    pub fn start(&self, topic: &str, partition: i32, offset: i64) {
        self.tracker
            .lock()
            .expect("tracker")
            .start(topic, partition, offset);
    }

    /// A record's hand-off is durable: stores the new committable position if it advanced.
    pub fn finish(&self, topic: &str, partition: i32, offset: i64) {
        let next = self
            .tracker
            .lock()
            .expect("tracker")
            .finish(topic, partition, offset);
        if let Some(next) = next {
            let mut tpl = TopicPartitionList::new();
            if tpl
                .add_partition_offset(topic, partition, Offset::Offset(next))
                .is_ok()
            {
                if let Err(e) = self.consumer.store_offsets(&tpl) {
                    // Revoked meanwhile: the new owner replays from the last commit.
                    tracing::debug!(stage = self.stage, error = %e, topic, partition, "offset not stored");
                }
            }
        }
    }

    /// A hand-off failed: the stage stops, and [`StageProgress::close`] reports `detail`.
    pub fn fail(&self, detail: String) {
        tracing::error!(stage = self.stage, error = %detail, "hand-off failed; stopping the stage");
        self.failure.lock().expect("failure").get_or_insert(detail);
        self.stop.cancel();
    }

    /// Waits for the broker's acknowledgement of `deliveries` (records enqueued in order with
    /// `send_result`). True when all are durable; otherwise the stage fails with `what`.
    pub async fn delivered(&self, deliveries: Vec<DeliveryFuture>, what: &str) -> bool {
        for delivery in futures::future::join_all(deliveries).await {
            match delivery {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => {
                    self.fail(format!("{what}: {e}"));
                    return false;
                }
                Err(_) => {
                    self.fail(format!("{what}: cancelled"));
                    return false;
                }
            }
        }
        true
    }

    /// Stops the stage: waits up to `deadline` for the in-flight work (all `permits` of
    /// `in_flight` back), commits what finished, leaves the group. Returns the failure that
    /// stopped the stage, if one did.
    pub async fn close(
        &self,
        in_flight: &Semaphore,
        permits: usize,
        deadline: Duration,
    ) -> Option<String> {
        let drain = in_flight.acquire_many(u32::try_from(permits).unwrap_or(u32::MAX));
        if tokio::time::timeout(deadline, drain).await.is_err() {
            tracing::warn!(
                stage = self.stage,
                "drain deadline passed; unfinished records will be replayed"
            );
        }
        match self.consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(())
            | Err(rdkafka::error::KafkaError::ConsumerCommit(
                rdkafka::types::RDKafkaErrorCode::NoOffset,
            )) => {}
            Err(e) => tracing::warn!(
                stage = self.stage,
                error = %e,
                "final commit failed; records since the last commit will be replayed"
            ),
        }
        self.consumer.unsubscribe();
        self.failure.lock().expect("failure").take()
    }
}
