//! The driver against librdkafka's mock cluster (a real group coordinator and fetch path in
//! process, no broker): push-back pauses one partition and never the poll loop, commits stop at
//! the lowest unfinished record, a revoke drains with a deadline, and a panicked task fails the
//! stage.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::ClientConfig;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::*;

/// What the test strategy does with a record.
#[derive(Debug, Clone, Copy)]
enum Action {
    Finish,
    /// Holds an effect for the duration, then finishes.
    EffectThenFinish(Duration),
    /// Keeps the record unfinished (its ticket held) until the stage stops.
    Keep,
    /// The task handling it panics.
    Panic,
    /// The strategy's `submit` itself panics.
    PanicInSubmit,
}

type Behaviour = Arc<dyn Fn(i32, i64) -> Action + Send + Sync>;

#[derive(Default)]
struct Probe {
    submitted: Mutex<Vec<(i32, i64)>>,
    revoked: Mutex<Vec<TopicPartition>>,
    assigned: Mutex<Vec<TopicPartition>>,
    /// Effects that ended with their partition still owned (sent "on the wire" and finished).
    finished: Mutex<Vec<(i32, i64)>>,
    /// When each rebalance callback reached the strategy, for diagnostics.
    events: Mutex<Vec<(Instant, &'static str)>>,
}

struct TestStrategy {
    probe: Arc<Probe>,
    behaviour: Behaviour,
    /// Per partition: how many records may be unfinished at once.
    capacity: usize,
    unfinished: Arc<Mutex<HashMap<i32, usize>>>,
    kept: Vec<Ticket>,
    changed: Arc<Notify>,
}

impl TestStrategy {
    fn new(probe: Arc<Probe>, capacity: usize, behaviour: Behaviour) -> Self {
        TestStrategy {
            probe,
            behaviour,
            capacity,
            unfinished: Default::default(),
            kept: Vec::new(),
            changed: Arc::new(Notify::new()),
        }
    }
}

impl Strategy for TestStrategy {
    async fn assigned(&mut self, partitions: &[TopicPartition]) -> Result<(), StageFailure> {
        self.probe
            .events
            .lock()
            .unwrap()
            .push((Instant::now(), "assigned"));
        self.probe
            .assigned
            .lock()
            .unwrap()
            .extend_from_slice(partitions);
        Ok(())
    }

    fn revoked(&mut self, partitions: &[TopicPartition]) {
        self.probe
            .events
            .lock()
            .unwrap()
            .push((Instant::now(), "revoked"));
        self.probe
            .revoked
            .lock()
            .unwrap()
            .extend_from_slice(partitions);
        self.kept.retain(|t| {
            !partitions
                .iter()
                .any(|(topic, p)| t.topic() == topic && t.partition() == *p)
        });
    }

    fn submit(&mut self, record: Record) -> Submit {
        let partition = record.ticket.partition();
        {
            let mut unfinished = self.unfinished.lock().unwrap();
            let count = unfinished.entry(partition).or_default();
            if *count >= self.capacity {
                return Submit::PushBack(record);
            }
            *count += 1;
        }
        let offset = record.ticket.offset();
        self.probe
            .submitted
            .lock()
            .unwrap()
            .push((partition, offset));
        let action = (self.behaviour)(partition, offset);
        if let Action::PanicInSubmit = action {
            panic!("injected: submit panicked");
        }
        if let Action::Keep = action {
            self.kept.push(record.ticket);
            return Submit::Accepted;
        }
        let (unfinished, changed, probe) = (
            self.unfinished.clone(),
            self.changed.clone(),
            self.probe.clone(),
        );
        tokio::spawn(async move {
            let ticket = record.ticket;
            match action {
                Action::Finish => ticket.finish(),
                Action::EffectThenFinish(hold) => {
                    if let Some(effect) = ticket.begin_effect() {
                        tokio::time::sleep(hold).await;
                        probe.finished.lock().unwrap().push((partition, offset));
                        ticket.finish();
                        drop(effect);
                    }
                }
                Action::Panic => {
                    let _ticket = ticket;
                    panic!("injected: the record handler panicked");
                }
                Action::Keep | Action::PanicInSubmit => unreachable!(),
            }
            *unfinished.lock().unwrap().get_mut(&partition).unwrap() -= 1;
            changed.notify_one();
        });
        Submit::Accepted
    }

    async fn poll(&mut self) -> Result<(), StageFailure> {
        self.changed.notified().await;
        Ok(())
    }
}

struct Cluster {
    mock: MockCluster<'static, DefaultProducerContext>,
    config: KafkaConfig,
    producer: ThreadedProducer<DefaultProducerContext>,
}

fn cluster(topic: &str, partitions: i32) -> Cluster {
    let mock = MockCluster::new(1).expect("mock cluster");
    mock.create_topic(topic, partitions, 1).expect("topic");
    let mut config = gridtalk_config::Config::load(
        None,
        [(
            "GRIDTALK__SEND__ACCESS_TOKEN".to_string(),
            "unused".to_string(),
        )],
    )
    .expect("defaults")
    .kafka;
    config.bootstrap_servers = mock.bootstrap_servers();
    config.session_timeout_ms = 3000;
    config.heartbeat_interval_ms = 500;
    config.max_poll_interval_ms = 3000;
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", mock.bootstrap_servers())
        .create()
        .expect("producer");
    Cluster {
        mock,
        config,
        producer,
    }
}

impl Cluster {
    fn produce(&self, topic: &str, partition: i32, count: usize) {
        for i in 0..count {
            let payload = format!("{partition}-{i}");
            self.producer
                .send(
                    BaseRecord::<(), _>::to(topic)
                        .partition(partition)
                        .payload(&payload),
                )
                .expect("enqueued");
        }
        self.producer.flush(Duration::from_secs(10)).expect("flush");
    }

    fn committed(&self, group: &str, topic: &str) -> HashMap<i32, i64> {
        crate::committed_offsets(&self.config, group, topic).expect("committed offsets")
    }

    fn driver(&self, group: &str, topic: &str, drain: Duration) -> Driver {
        self.driver_with_limit(group, topic, drain, drain)
    }

    /// A driver whose revoke warns after `drain` and waits for begun effects up to `limit`.
    fn driver_with_limit(
        &self,
        group: &str,
        topic: &str,
        drain: Duration,
        limit: Duration,
    ) -> Driver {
        self.driver_with_settings(
            group,
            topic,
            (drain, limit),
            Arc::new(AtomicBool::new(false)),
        )
    }

    fn driver_with_readiness(
        &self,
        group: &str,
        topic: &str,
        drain: Duration,
        ready: Arc<AtomicBool>,
    ) -> Driver {
        self.driver_with_settings(group, topic, (drain, drain), ready)
    }

    fn driver_with_settings(
        &self,
        group: &str,
        topic: &str,
        (drain, limit): (Duration, Duration),
        ready: Arc<AtomicBool>,
    ) -> Driver {
        Driver::new(
            &self.config,
            DriverSettings {
                stage: "test",
                group_id: group.into(),
                topics: vec![topic.into()],
                untracked_topics: vec![],
                assignment: Assignment::CooperativeSticky,
                drain_deadline: drain,
                drain_limit: limit,
                shutdown_deadline: Duration::from_secs(5),
                offset_reset: OffsetReset::Earliest,
            },
            ready,
        )
        .expect("driver")
    }
}

async fn wait_for(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let started = Instant::now();
    while !condition() {
        assert!(started.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_back_pauses_only_its_partition_and_the_member_stays_in_the_group() {
    let cluster = cluster("in", 2);
    cluster.produce("in", 0, 20);
    cluster.produce("in", 1, 20);
    let probe = Arc::new(Probe::default());
    // Partition 0's first record is never finished and fills its capacity of one: the stage
    // pushes back on every later record of partition 0, for longer than max.poll.interval.ms.
    let strategy = TestStrategy::new(
        probe.clone(),
        1,
        Arc::new(|partition, offset| {
            if partition == 0 && offset == 0 {
                Action::Keep
            } else {
                Action::Finish
            }
        }),
    );
    let driver = cluster.driver("g-pause", "in", Duration::from_secs(2));
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(driver.run(strategy, shutdown.clone()));

    wait_for("partition 1 handled", Duration::from_secs(30), || {
        probe
            .submitted
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| *p == 1)
            .count()
            == 20
    })
    .await;
    // Past max.poll.interval.ms (3 s) with partition 0 pushed back the whole time.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        probe.revoked.lock().unwrap().is_empty(),
        "the member never left the group"
    );
    let submitted = probe.submitted.lock().unwrap().clone();
    assert_eq!(
        submitted.iter().filter(|(p, _)| *p == 0).count(),
        1,
        "partition 0 was held back after its first record"
    );
    let offsets_1: Vec<i64> = submitted
        .iter()
        .filter(|(p, _)| *p == 1)
        .map(|(_, o)| *o)
        .collect();
    assert_eq!(
        offsets_1,
        (0..20).collect::<Vec<_>>(),
        "in order, once each"
    );
    wait_for("partition 1 committed", Duration::from_secs(10), || {
        cluster.committed("g-pause", "in").get(&1) == Some(&20)
    })
    .await;
    assert!(
        cluster
            .committed("g-pause", "in")
            .get(&0)
            .is_none_or(|o| *o <= 0),
        "nothing past the unfinished record of partition 0"
    );
    shutdown.cancel();
    run.await
        .unwrap()
        .expect("a clean stop leaves the kept record for replay");
    assert_eq!(
        cluster
            .committed("g-pause", "in")
            .get(&0)
            .copied()
            .unwrap_or(0),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_back_resumes_when_capacity_frees() {
    let cluster = cluster("in", 1);
    cluster.produce("in", 0, 40);
    let probe = Arc::new(Probe::default());
    let strategy = TestStrategy::new(
        probe.clone(),
        2,
        Arc::new(|_, _| Action::EffectThenFinish(Duration::from_millis(20))),
    );
    let driver = cluster.driver("g-resume", "in", Duration::from_secs(2));
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(driver.run(strategy, shutdown.clone()));
    wait_for("every record committed", Duration::from_secs(30), || {
        cluster.committed("g-resume", "in").get(&0) == Some(&40)
    })
    .await;
    let offsets: Vec<i64> = probe
        .submitted
        .lock()
        .unwrap()
        .iter()
        .map(|(_, o)| *o)
        .collect();
    assert_eq!(offsets, (0..40).collect::<Vec<_>>(), "in order, once each");
    shutdown.cancel();
    run.await.unwrap().expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_stop_at_the_lowest_unfinished_record() {
    let cluster = cluster("in", 1);
    cluster.produce("in", 0, 10);
    let probe = Arc::new(Probe::default());
    let strategy = TestStrategy::new(
        probe.clone(),
        100,
        Arc::new(|_, offset| {
            if offset == 3 {
                Action::Keep
            } else {
                Action::Finish
            }
        }),
    );
    let driver = cluster.driver("g-lowest", "in", Duration::from_secs(2));
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(driver.run(strategy, shutdown.clone()));
    wait_for("commit up to 3", Duration::from_secs(30), || {
        cluster.committed("g-lowest", "in").get(&0) == Some(&3)
    })
    .await;
    assert_eq!(probe.submitted.lock().unwrap().len(), 10);
    // Offsets 4..10 finished long ago; the commit still waits for 3.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(cluster.committed("g-lowest", "in").get(&0), Some(&3));
    shutdown.cancel();
    run.await.unwrap().expect("clean stop");
    assert_eq!(
        cluster.committed("g-lowest", "in").get(&0),
        Some(&3),
        "the final commit does not pass the kept record either"
    );
}

/// Starts a second member of the group and returns (its probe, its stop, its run).
fn second_member(
    cluster: &Cluster,
    group: &str,
) -> (
    Arc<Probe>,
    CancellationToken,
    tokio::task::JoinHandle<Result<(), StageFailure>>,
) {
    let probe = Arc::new(Probe::default());
    let strategy = TestStrategy::new(probe.clone(), 100, Arc::new(|_, _| Action::Finish));
    let driver = cluster.driver(group, "in", Duration::from_secs(2));
    let stop = CancellationToken::new();
    let run = tokio::spawn(driver.run(strategy, stop.clone()));
    (probe, stop, run)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_waits_for_begun_effects_and_commits_them() {
    let cluster = cluster("in", 2);
    cluster.produce("in", 0, 1);
    cluster.produce("in", 1, 1);
    let probe = Arc::new(Probe::default());
    let strategy = TestStrategy::new(
        probe.clone(),
        100,
        Arc::new(|_, _| Action::EffectThenFinish(Duration::from_millis(1500))),
    );
    let driver = cluster.driver("g-drain", "in", Duration::from_secs(10));
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(driver.run(strategy, shutdown.clone()));
    wait_for("both records on the wire", Duration::from_secs(30), || {
        probe.submitted.lock().unwrap().len() == 2
    })
    .await;
    // A second member joins while both effects run: one partition is revoked from the first.
    let (other, other_stop, other_run) = second_member(&cluster, "g-drain");
    wait_for(
        "the second member assigned",
        Duration::from_secs(30),
        || !other.assigned.lock().unwrap().is_empty(),
    )
    .await;
    assert_eq!(
        probe.revoked.lock().unwrap().len(),
        1,
        "one partition moved to the new member"
    );
    assert_eq!(
        probe.finished.lock().unwrap().len(),
        2,
        "the revoke returned only after the revoked partition's effect finished"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        other.submitted.lock().unwrap().is_empty(),
        "the new owner starts after the drained record: nothing is done twice"
    );
    other_stop.cancel();
    shutdown.cancel();
    other_run.await.unwrap().expect("clean stop");
    run.await.unwrap().expect("clean stop");
    let committed = cluster.committed("g-drain", "in");
    assert_eq!((committed.get(&0), committed.get(&1)), (Some(&1), Some(&1)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_effect_past_the_drain_limit_is_left_to_the_new_owner() {
    let cluster = cluster("in", 2);
    cluster.produce("in", 0, 1);
    cluster.produce("in", 1, 1);
    let probe = Arc::new(Probe::default());
    let strategy = TestStrategy::new(
        probe.clone(),
        100,
        Arc::new(|_, _| Action::EffectThenFinish(Duration::from_secs(15))),
    );
    let driver = cluster.driver("g-deadline", "in", Duration::from_millis(500));
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(driver.run(strategy, shutdown.clone()));
    wait_for("both records on the wire", Duration::from_secs(30), || {
        probe.submitted.lock().unwrap().len() == 2
    })
    .await;
    let joined_at = Instant::now();
    let (other, other_stop, other_run) = second_member(&cluster, "g-deadline");
    let waited = Instant::now();
    while other.submitted.lock().unwrap().len() != 1 {
        assert!(
            waited.elapsed() < Duration::from_secs(30),
            "the new owner never got the unfinished record; first member: assigned {:?} revoked {:?}; second: assigned {:?} revoked {:?} submitted {:?}",
            probe.assigned.lock().unwrap(),
            probe.revoked.lock().unwrap(),
            other.assigned.lock().unwrap(),
            other.revoked.lock().unwrap(),
            other.submitted.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let timeline = |probe: &Probe| -> Vec<(u128, &'static str)> {
        probe
            .events
            .lock()
            .unwrap()
            .iter()
            .map(|(at, what)| (at.saturating_duration_since(joined_at).as_millis(), *what))
            .collect()
    };
    assert!(
        joined_at.elapsed() < Duration::from_secs(12),
        "the revoke did not wait for the effect past its deadline: first {:?}, second {:?}",
        timeline(&probe),
        timeline(&other)
    );
    assert!(
        probe.finished.lock().unwrap().is_empty(),
        "the slow effect has not ended yet"
    );
    other_stop.cancel();
    shutdown.cancel();
    other_run.await.unwrap().expect("clean stop");
    run.await.unwrap().expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_begun_effect_past_the_drain_deadline_is_still_waited_for_and_not_repeated() {
    // The effect outlasts the deadline (it cannot be recalled once begun) but not the limit:
    // the revoke waits for it and commits it, so the new owner does not do it again.
    let cluster = cluster("in", 2);
    cluster.produce("in", 0, 1);
    cluster.produce("in", 1, 1);
    let probe = Arc::new(Probe::default());
    let strategy = TestStrategy::new(
        probe.clone(),
        100,
        Arc::new(|_, _| Action::EffectThenFinish(Duration::from_secs(3))),
    );
    let driver = cluster.driver_with_limit(
        "g-limit",
        "in",
        Duration::from_millis(500),
        Duration::from_secs(20),
    );
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(driver.run(strategy, shutdown.clone()));
    wait_for("both records on the wire", Duration::from_secs(30), || {
        probe.submitted.lock().unwrap().len() == 2
    })
    .await;
    let (other, other_stop, other_run) = second_member(&cluster, "g-limit");
    wait_for(
        "the moved partition at the new owner",
        Duration::from_secs(30),
        || !other.assigned.lock().unwrap().is_empty(),
    )
    .await;
    assert!(
        !probe.revoked.lock().unwrap().is_empty(),
        "a partition moved"
    );
    assert_eq!(
        probe.finished.lock().unwrap().len(),
        2,
        "the revoked partition's effect ended before it was handed over"
    );
    // The new owner starts after the committed record: nothing is delivered to it again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        other.submitted.lock().unwrap().is_empty(),
        "the new owner repeated a record whose effect had begun: {:?}",
        other.submitted.lock().unwrap()
    );
    other_stop.cancel();
    shutdown.cancel();
    other_run.await.unwrap().expect("clean stop");
    run.await.unwrap().expect("clean stop");
    let committed = cluster.committed("g-limit", "in");
    assert_eq!((committed.get(&0), committed.get(&1)), (Some(&1), Some(&1)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicked_task_fails_the_stage_with_nothing_committed_past_its_record() {
    let cluster = cluster("in", 1);
    cluster.produce("in", 0, 6);
    let probe = Arc::new(Probe::default());
    let strategy = TestStrategy::new(
        probe.clone(),
        100,
        Arc::new(|_, offset| {
            if offset == 2 {
                Action::Panic
            } else {
                Action::Finish
            }
        }),
    );
    let driver = cluster.driver("g-panic", "in", Duration::from_secs(2));
    let started = Instant::now();
    let result = tokio::time::timeout(
        Duration::from_secs(30),
        driver.run(strategy, CancellationToken::new()),
    )
    .await
    .expect("the stage stops by itself");
    let failure = result.expect_err("the stage failed");
    assert!(failure.0.contains("in/0@2"), "{failure}");
    assert!(started.elapsed() < Duration::from_secs(30));
    assert!(
        cluster
            .committed("g-panic", "in")
            .get(&0)
            .is_none_or(|o| *o <= 2),
        "nothing committed past the record whose task panicked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_the_strategy_fails_the_stage_after_begun_effects_finish() {
    let cluster = cluster("in", 1);
    cluster.produce("in", 0, 6);
    let probe = Arc::new(Probe::default());
    let strategy = TestStrategy::new(
        probe.clone(),
        100,
        Arc::new(|_, offset| match offset {
            1 => Action::EffectThenFinish(Duration::from_millis(1500)),
            3 => Action::PanicInSubmit,
            _ => Action::Finish,
        }),
    );
    let driver = cluster.driver("g-submit-panic", "in", Duration::from_secs(2));
    let failure = tokio::time::timeout(
        Duration::from_secs(30),
        driver.run(strategy, CancellationToken::new()),
    )
    .await
    .expect("the stage stops by itself")
    .expect_err("the stage failed");
    assert!(failure.0.contains("panicked in submit"), "{failure}");
    assert_eq!(
        probe.finished.lock().unwrap().as_slice(),
        &[(0, 1)],
        "the effect on its way finished before the stage stopped"
    );
    assert_eq!(
        cluster.committed("g-submit-panic", "in").get(&0),
        Some(&3),
        "committed up to the record that panicked, not past it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_is_false_while_no_broker_is_reachable_and_comes_back_with_it() {
    use std::sync::atomic::Ordering;
    let cluster = cluster("in", 1);
    cluster.produce("in", 0, 3);
    let probe = Arc::new(Probe::default());
    let strategy = TestStrategy::new(probe.clone(), 100, Arc::new(|_, _| Action::Finish));
    let ready = Arc::new(AtomicBool::new(false));
    let driver =
        cluster.driver_with_readiness("g-ready", "in", Duration::from_secs(2), ready.clone());
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(driver.run(strategy, shutdown.clone()));
    wait_for("records handled and ready", Duration::from_secs(30), || {
        probe.submitted.lock().unwrap().len() == 3 && ready.load(Ordering::Acquire)
    })
    .await;
    cluster.mock.broker_down(1).expect("broker down");
    wait_for(
        "not ready without a broker",
        Duration::from_secs(30),
        || !ready.load(Ordering::Acquire),
    )
    .await;
    cluster.mock.broker_up(1).expect("broker up");
    wait_for("ready again", Duration::from_secs(30), || {
        ready.load(Ordering::Acquire)
    })
    .await;
    shutdown.cancel();
    run.await.unwrap().expect("clean stop");
}
