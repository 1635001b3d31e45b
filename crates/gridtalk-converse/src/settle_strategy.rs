//! The decide stage's strategy for the driver: decision candidates settled and requests' clocks
//! kept, both in the partition order of the decisions topic (keyed by request, so one owner
//! holds a request's settlement and its clock).
//!
//! A candidate's outcomes (the decision or the refusal, the reply) are enqueued in order and, in a
//! task, acknowledged; then the settlement (`settled:<request>`) and the closed clock go to the
//! converse-state changelog (on the decisions partition's number) and are acknowledged; then the
//! candidate is committed. A crash in between replays the candidate, which the restored (or not
//! yet written) settlement answers the same way, with the same ids.
//!
//! Clock commands (see [`gridtalk_clock`]) change the clocks the same way: the change is durable
//! before the command is committed. A step that comes due is fired by `poll` as an effect of its
//! partition (a revoke waits for it): its messages and `wa.request.overdue` record are
//! acknowledged, then the clock's new state is written. A crash in between fires the step again on
//! the next owner, with the same ids: the send stage's index sends its messages once, and the
//! response topic read back at the takeover keeps its record from being published twice.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::message::Message;
use tokio::task::JoinSet;

use gridtalk_clock::{
    ClockCommand, Clocks, Deferred, DeferredMessage, Fire, Opened, TimeSource, UpstreamOutcome,
};
use gridtalk_config::Secret;
use gridtalk_directory::SharedDirectory;
use gridtalk_kafka::driver::{Record, StageFailure, Strategy, Submit, Supervisor, TopicPartition};
use gridtalk_kafka::DeadLetterReason;
use gridtalk_summary::{Daily, Measure, Observed, Schedule, Summaries, SummaryFire, Threshold};
use gridtalk_telemetry::Metrics;

use crate::conversation::{Candidate, Outcome};
use crate::settle::{Settlements, KEY_PREFIX};
use crate::strategy::{
    publish, publish_for, read_or_dead_letter, restore_state, sweep_state, Completion, Publishing,
    StateChange,
};

pub(crate) const STAGE: &str = "decide";
/// How often expired settlements are forgotten and tombstoned.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);
/// The longest a fire waits in one sleep: a clock changed by a record wakes it anyway, and a
/// time source can be faster than the wall clock.
const MAX_SLEEP: Duration = Duration::from_secs(60);

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A record of the decisions topic.
enum DecisionsRecord {
    Candidate(Box<Candidate>),
    Clock(Box<ClockCommand>),
    Summary(Box<Observed>),
}

fn read_decisions_record(bytes: &[u8]) -> Result<DecisionsRecord, String> {
    if let Some(command) = ClockCommand::from_json(bytes) {
        return command.map(|c| DecisionsRecord::Clock(Box::new(c)));
    }
    if let Some(observed) = Observed::from_json(bytes) {
        return observed.map(|o| DecisionsRecord::Summary(Box::new(o)));
    }
    Candidate::from_json(bytes).map(|c| DecisionsRecord::Candidate(Box::new(c)))
}

/// The schedules of the configured summaries.
pub(crate) fn summary_schedules(
    config: &gridtalk_config::Config,
) -> std::collections::BTreeMap<String, Schedule> {
    config
        .summaries
        .iter()
        .map(|s| {
            let daily = s
                .daily_at
                .as_deref()
                .and_then(|at| Daily::parse(at, &s.time_zone).ok());
            let thresholds = s
                .thresholds
                .iter()
                .enumerate()
                .filter_map(|(i, t)| {
                    Some(Threshold {
                        name: format!("{}:{i}", t.measure),
                        measure: Measure::parse(&t.measure)?,
                        at_least: t.at_least,
                        within_ms: (t.within_minutes as i64).saturating_mul(60_000),
                    })
                })
                .collect();
            (s.name.clone(), Schedule { daily, thresholds })
        })
        .collect()
}

/// What firing a step needs besides the publishing.
pub(crate) struct Timekeeping {
    pub time: TimeSource,
    pub directory: SharedDirectory,
    pub button_secret: Option<Secret>,
    pub supervisor: Supervisor,
}

pub(crate) struct SettleStrategy {
    publishing: Arc<Publishing>,
    settlements: Settlements,
    clocks: Clocks,
    /// Messages waiting for their recipients' business hours.
    deferred: Deferred,
    /// The computed summaries' tallies (flow h), with their daily times.
    summaries: Summaries,
    timekeeping: Timekeeping,
    /// Response ids found on the response topic at the last takeovers (see the converse
    /// strategy): a replayed candidate's decision is not published twice.
    published: Arc<Mutex<HashMap<String, i64>>>,
    tasks: JoinSet<()>,
    sweep: tokio::time::Interval,
}

impl SettleStrategy {
    pub(crate) fn new(
        publishing: Arc<Publishing>,
        settlements: Settlements,
        timekeeping: Timekeeping,
    ) -> Self {
        let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        SettleStrategy {
            summaries: Summaries::new(summary_schedules(&publishing.config)),
            publishing,
            settlements,
            clocks: Clocks::new(),
            deferred: Deferred::new(),
            timekeeping,
            published: Arc::new(Mutex::new(HashMap::new())),
            tasks: JoinSet::new(),
            sweep,
        }
    }

    fn count_memory(&self) {
        let state = &Metrics::global().state_entries;
        state
            .with_label_values(&["settlements"])
            .set(self.settlements.len() as i64);
        state
            .with_label_values(&["clocks"])
            .set(self.clocks.len() as i64);
        state
            .with_label_values(&["clocks_closed"])
            .set(self.clocks.closed_len() as i64);
        state
            .with_label_values(&["deferred"])
            .set(self.deferred.len() as i64);
        state
            .with_label_values(&["summaries"])
            .set(self.summaries.len() as i64);
    }

    fn clock_changes(&mut self) -> Vec<StateChange> {
        let mut changes = self.clocks.take_changes();
        changes.extend(self.deferred.take_changes());
        let mut changes: Vec<StateChange> = changes.into_iter().map(StateChange::from).collect();
        changes.extend(
            self.summaries
                .take_changes()
                .into_iter()
                .map(StateChange::from),
        );
        changes
    }

    /// A due summary's messages for its audience.
    fn summary_outcomes(&self, fire: &SummaryFire) -> Vec<Outcome> {
        Metrics::global()
            .summaries_sent
            .with_label_values(&[
                fire.summary.as_str(),
                fire.kind.split(':').next().unwrap_or("daily"),
            ])
            .inc();
        tracing::info!(summary = %fire.summary, scope = %fire.scope, kind = %fire.kind, counts = ?fire.counts, "summary due");
        let directory = self.timekeeping.directory.read().expect("directory lock");
        match gridtalk_route::render_summary(fire, &self.publishing.config, &directory, now_ms()) {
            Ok(messages) => messages
                .into_iter()
                .map(|m| Outcome::Outbox(Box::new(m)))
                .collect(),
            Err(failure) => {
                tracing::warn!(summary = %fire.summary, scope = %fire.scope, reason = failure.reason.as_str(), detail = %failure.detail, "a summary could not be rendered; nothing sent");
                Vec::new()
            }
        }
    }

    /// `outcomes` without the messages whose recipients are outside their business hours: those
    /// are held on `partition` until the window opens (their entries follow in the changes).
    fn hold_quiet(&mut self, partition: i32, view: &str, outcomes: Vec<Outcome>) -> Vec<Outcome> {
        let config = self.publishing.config.clone();
        if !config.route.quiet_hours {
            return outcomes;
        }
        let view: serde_json::Value = serde_json::from_str(view).unwrap_or_default();
        let urgent = gridtalk_route::is_urgent(
            &config,
            view["severity"].as_str().unwrap_or("INFO"),
            view["event_type"].as_str().unwrap_or_default(),
        );
        let now = self.timekeeping.time.now_ms();
        let directory = self.timekeeping.directory.clone();
        let directory = directory.read().expect("directory lock");
        let mut kept = Vec::with_capacity(outcomes.len());
        for outcome in outcomes {
            if let Outcome::Outbox(message) = &outcome {
                if let Some(release) =
                    gridtalk_route::release_at(&config, &directory, message, urgent, now)
                {
                    if let ClockCommand::Defer(deferred) =
                        gridtalk_route::defer(message, release, now)
                    {
                        self.deferred.hold(partition, deferred);
                        continue;
                    }
                }
            }
            kept.push(outcome);
        }
        kept
    }

    /// Releases every waiting message whose window opened, each as an effect of its partition.
    fn release_due(&mut self) {
        let now = self.timekeeping.time.now_ms();
        while let Some((partition, deferred)) = self.deferred.take_next_due(now) {
            let changes = self.clock_changes();
            let Some(effect) = self.timer_effect(partition) else {
                continue;
            };
            let outcomes = release(&deferred, now);
            self.publish_timer(partition, &deferred.message_id, outcomes, changes, effect);
        }
    }

    /// An effect of `partition` for what its own timers do; none while it is draining (its next
    /// owner restores the state and does it).
    fn timer_effect(&self, partition: i32) -> Option<gridtalk_kafka::driver::EffectGuard> {
        let tp = (self.publishing.config.topics.decisions.clone(), partition);
        self.timekeeping.supervisor.begin_effect(&tp)
    }

    /// Publishes what a timer of `partition` made: the outcomes, then the state changes; a
    /// failure fails the stage.
    fn publish_timer(
        &self,
        partition: i32,
        id: &str,
        outcomes: Vec<Outcome>,
        changes: Vec<StateChange>,
        effect: gridtalk_kafka::driver::EffectGuard,
    ) {
        publish_for(
            &self.publishing,
            &self.published,
            (
                partition,
                Completion::Timer(self.timekeeping.supervisor.clone()),
            ),
            id,
            outcomes,
            changes,
            (effect, None),
        );
    }

    fn fire_outcomes(&self, fire: &Fire) -> Vec<Outcome> {
        self.count_fire(fire);
        let directory = self.timekeeping.directory.read().expect("directory lock");
        crate::overdue::fire_outcomes(
            fire,
            &self.publishing.config,
            &directory,
            self.timekeeping
                .button_secret
                .as_ref()
                .map(|s| s.expose().as_bytes()),
            now_ms(),
        )
    }

    fn count_fire(&self, fire: &Fire) {
        Metrics::global()
            .clock_fires
            .with_label_values(&[
                fire.clock.policy.as_str(),
                if fire.is_escalation() {
                    "escalation"
                } else {
                    "reminder"
                },
                fire.trigger.as_str(),
            ])
            .inc();
        tracing::info!(
            request = %fire.clock.key,
            policy = %fire.clock.policy,
            step = fire.step,
            steps = fire.clock.steps(),
            escalation = fire.is_escalation(),
            trigger = fire.trigger.as_str(),
            "request overdue: step fired"
        );
    }

    /// Fires every step due now, releases the waiting messages whose window opened and sends
    /// the daily summaries due, each as an effect of its partition.
    fn fire_due(&mut self) {
        self.release_due();
        let now = self.timekeeping.time.now_ms();
        while let Some(fire) = self.clocks.take_next_due(now) {
            let mut changes = self.clock_changes();
            let Some(effect) = self.timer_effect(fire.partition) else {
                continue;
            };
            let outcomes = self.fire_outcomes(&fire);
            let outcomes = self.hold_quiet(fire.partition, &fire.clock.view, outcomes);
            changes.extend(self.clock_changes());
            self.publish_timer(fire.partition, &fire.fire_id(), outcomes, changes, effect);
        }
        while let Some(fire) = self.summaries.take_next_due(now) {
            let changes = self.clock_changes();
            let Some(effect) = self.timer_effect(fire.partition) else {
                continue;
            };
            let outcomes = self.summary_outcomes(&fire);
            self.publish_timer(fire.partition, &fire.fire_id(), outcomes, changes, effect);
        }
        self.count_memory();
    }

    /// What a clock command does; the changes it made follow in [`Self::clock_changes`].
    fn command(&mut self, partition: i32, command: ClockCommand) -> Vec<Outcome> {
        let now = self.timekeeping.time.now_ms();
        match command {
            ClockCommand::Open(open) => {
                // A request settled before its clock arrived stays answered.
                if self.settlements.is_settled(&open.key) {
                    self.clocks.close(partition, &open.key, now);
                    return Vec::new();
                }
                let key = open.key.clone();
                let opened = self.clocks.open(partition, open, now);
                tracing::debug!(request = %key, ?opened, "clock opened");
                if opened == Opened::Expired {
                    tracing::debug!(request = %key, "every step of the request's clock is long past; no reminders");
                }
                Vec::new()
            }
            ClockCommand::Close { key, reason } => {
                if self.clocks.close(partition, &key, now) {
                    tracing::debug!(request = %key, reason, "clock closed");
                }
                Vec::new()
            }
            ClockCommand::Upstream {
                key,
                policy,
                step,
                notified,
            } => match self.clocks.upstream(&key, step, now) {
                // Route sent the step's messages; the clock counts it as fired and says so.
                UpstreamOutcome::Fire(fire) => {
                    self.count_fire(&fire);
                    vec![crate::overdue::overdue_record(&fire, notified)]
                }
                UpstreamOutcome::AlreadyFired
                | UpstreamOutcome::Closed
                | UpstreamOutcome::NoClock => {
                    tracing::debug!(request = %key, policy, step, "upstream overdue event for a step already fired, a closed request or none with a clock");
                    Vec::new()
                }
            },
            ClockCommand::Defer(deferred) => {
                if !self.deferred.hold(partition, deferred) {
                    tracing::debug!("a waiting message held twice (a replay); held once");
                }
                Vec::new()
            }
        }
    }
}

/// What releasing a waiting message publishes: the message, for the outbox (its id unchanged, so
/// a release repeated after a crash is sent once).
fn release(deferred: &DeferredMessage, now_ms: i64) -> Vec<Outcome> {
    let Ok(message) = serde_json::from_str::<gridtalk_contract::OutboxMessage>(&deferred.message)
    else {
        tracing::warn!(message_id = %deferred.message_id, "a waiting message is unreadable; dropped from the wait");
        return Vec::new();
    };
    Metrics::global()
        .quiet_hours_wait_seconds
        .with_label_values(&[STAGE])
        .observe((now_ms - deferred.deferred_at_ms).max(0) as f64 / 1000.0);
    tracing::info!(message_id = %deferred.message_id, contact = %deferred.contact_id, waited_minutes = (now_ms - deferred.deferred_at_ms) / 60_000, "business hours opened: waiting message released");
    vec![Outcome::Outbox(Box::new(message))]
}

impl Strategy for SettleStrategy {
    async fn assigned(&mut self, partitions: &[TopicPartition]) -> Result<(), StageFailure> {
        let numbers: Vec<i32> = partitions.iter().map(|(_, p)| *p).collect();
        if numbers.is_empty() {
            return Ok(());
        }
        let entries = restore_state(&self.publishing, &self.published, numbers, |key| {
            key.starts_with(KEY_PREFIX)
                || key.starts_with(gridtalk_clock::CLOCK_PREFIX)
                || key.starts_with(gridtalk_clock::CLOSED_PREFIX)
                || key.starts_with(gridtalk_clock::DEFERRED_PREFIX)
                || key.starts_with(gridtalk_summary::TALLY_PREFIX)
        })
        .await?;
        let now = now_ms();
        for (partition, restored) in entries {
            let (settled, timed): (Vec<_>, Vec<_>) = restored
                .into_iter()
                .partition(|(key, _)| key.starts_with(KEY_PREFIX));
            let (tallies, timed): (Vec<_>, Vec<_>) = timed
                .into_iter()
                .partition(|(key, _)| key.starts_with(gridtalk_summary::TALLY_PREFIX));
            let (waiting, clocks): (Vec<_>, Vec<_>) = timed
                .into_iter()
                .partition(|(key, _)| key.starts_with(gridtalk_clock::DEFERRED_PREFIX));
            self.settlements.restore(partition, settled, now);
            self.clocks.restore(partition, clocks);
            self.deferred.restore(partition, waiting);
            self.summaries.restore(partition, tallies);
        }
        self.count_memory();
        Ok(())
    }

    fn revoked(&mut self, partitions: &[TopicPartition]) {
        for (_, partition) in partitions {
            self.settlements.drop_partition(*partition);
            self.clocks.drop_partition(*partition);
            self.deferred.drop_partition(*partition);
            self.summaries.drop_partition(*partition);
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
        let Some((read, record, permit)) = read_or_dead_letter(
            &self.publishing,
            &mut self.tasks,
            (record, permit),
            DeadLetterReason::MalformedDecision,
            read_decisions_record,
        ) else {
            return Submit::Accepted;
        };
        let partition = record.message.partition();
        let (item_id, outcomes, mut changes) = match read {
            DecisionsRecord::Candidate(candidate) => {
                let outcomes = self.settlements.settle(partition, &candidate, now_ms());
                let changes: Vec<StateChange> = self
                    .settlements
                    .take_changes()
                    .into_iter()
                    .map(StateChange::from)
                    .collect();
                // The request is answered: its clock stops.
                let key = candidate.request_key();
                self.clocks
                    .close(partition, &key, self.timekeeping.time.now_ms());
                (candidate.item_id.clone(), outcomes, changes)
            }
            DecisionsRecord::Clock(mut command) => {
                let id = format!("{}:{}", command.name(), command.key());
                if let ClockCommand::Defer(deferred) = command.as_mut() {
                    // Released in the order the contact's messages arrived.
                    deferred.sequence = record.message.offset().max(0) as u64;
                }
                let outcomes = self.command(partition, *command);
                (id, outcomes, Vec::new())
            }
            DecisionsRecord::Summary(observed) => {
                let id = format!("{}@{}", observed.key(), record.message.offset());
                let fires =
                    self.summaries
                        .observe(partition, &observed, self.timekeeping.time.now_ms());
                let outcomes = fires
                    .iter()
                    .flat_map(|fire| self.summary_outcomes(fire))
                    .collect();
                (id, outcomes, Vec::new())
            }
        };
        changes.extend(self.clock_changes());
        self.count_memory();
        let Some(effect) = record.ticket.begin_effect() else {
            // Revoked meanwhile: the new owner handles it again.
            return Submit::Accepted;
        };
        publish(
            &self.publishing,
            &self.published,
            record,
            &item_id,
            outcomes,
            changes,
            (effect, permit),
        );
        Submit::Accepted
    }

    async fn poll(&mut self) -> Result<(), StageFailure> {
        let next_fire = [
            self.clocks.next_due_ms(),
            self.deferred.next_due_ms(),
            self.summaries.next_due_ms(),
        ]
        .into_iter()
        .flatten()
        .min()
        .map(|at| self.timekeeping.time.wait_until(at).min(MAX_SLEEP));
        tokio::select! {
            _ = async {
                match next_fire {
                    Some(wait) => tokio::time::sleep(wait).await,
                    None => std::future::pending().await,
                }
            } => {
                self.fire_due();
                Ok(())
            }
            Some(ended) = self.tasks.join_next() => match ended {
                Err(e) if e.is_panic() => Err(StageFailure(format!("a settlement task panicked: {e}"))),
                _ => Ok(()),
            },
            _ = self.publishing.room.notified() => Ok(()),
            _ = self.sweep.tick() => {
                sweep_state(&self.publishing);
                self.settlements.evict(now_ms());
                self.clocks.evict(self.timekeeping.time.now_ms());
                self.count_memory();
                Ok(())
            }
        }
    }
}
