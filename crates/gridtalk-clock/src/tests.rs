use super::*;

const H: i64 = 3_600_000;
const T0: i64 = 1_800_000_000_000;

/// Due at T0 + 2 h; reminders at due and due + 4 h, escalation at due + 24 h.
fn po(key: &str) -> OpenClock {
    let due = T0 + 2 * H;
    OpenClock {
        key: key.into(),
        kind: "po".into(),
        request_id: key.trim_start_matches("po:").into(),
        policy: "a-po-acknowledgement".into(),
        correlation_id: format!("ACME|850|{key}"),
        event_id: format!("event-{key}"),
        partner_id: "ACME".into(),
        due_at_ms: due,
        steps_at_ms: vec![due, due + 4 * H, due + 24 * H],
        escalation_last: true,
        recipients: vec!["acme-order-desk".into()],
        view: "{}".into(),
    }
}

fn steps(fires: &[Fire]) -> Vec<(String, u32, bool)> {
    fires
        .iter()
        .map(|f| (f.clock.key.clone(), f.step, f.is_escalation()))
        .collect()
}

#[test]
fn steps_fire_at_their_times_in_order_and_each_once() {
    let mut clocks = Clocks::new();
    assert_eq!(clocks.open(0, po("po:PO-1"), T0), Opened::New);
    assert!(clocks.take_due(T0 + 2 * H - 1).is_empty());
    let first = clocks.take_due(T0 + 2 * H);
    assert_eq!(steps(&first), vec![("po:PO-1".into(), 1, false)]);
    assert_eq!(first[0].hours_overdue(), 0);
    assert_eq!(first[0].fire_id(), "po:PO-1:1");
    assert!(clocks.take_due(T0 + 5 * H).is_empty(), "not twice");
    let second = clocks.take_due(T0 + 6 * H);
    assert_eq!(steps(&second), vec![("po:PO-1".into(), 2, false)]);
    assert_eq!(second[0].hours_overdue(), 4);
    let third = clocks.take_due(T0 + 30 * H);
    assert_eq!(steps(&third), vec![("po:PO-1".into(), 3, true)]);
    assert!(clocks.is_empty(), "a clock whose last step fired is gone");
    assert!(clocks.take_due(T0 + 100 * H).is_empty());
    // Its changelog entry was written at each step and deleted after the last.
    let changes = clocks.take_changes();
    assert_eq!(changes.last().unwrap().value, None);
    assert_eq!(changes.len(), 4);
}

#[test]
fn the_queue_orders_many_clocks_by_time_without_scanning() {
    let mut clocks = Clocks::new();
    for i in 0..1_000 {
        let mut clock = po(&format!("po:PO-{i}"));
        // Reverse order of due times.
        let shift = (1_000 - i) * 60_000;
        clock.due_at_ms += shift;
        for t in &mut clock.steps_at_ms {
            *t += shift;
        }
        clocks.open(i as i32 % 3, clock, T0);
    }
    assert_eq!(clocks.next_due_ms(), Some(T0 + 2 * H + 60_000));
    let due = clocks.take_due(T0 + 2 * H + 10 * 60_000);
    let keys: Vec<_> = due.iter().map(|f| f.clock.key.as_str()).collect();
    assert_eq!(
        keys,
        (990..1_000)
            .rev()
            .map(|i| format!("po:PO-{i}"))
            .collect::<Vec<_>>()
    );
}

#[test]
fn an_answer_closes_the_clock_for_good() {
    let mut clocks = Clocks::new();
    clocks.open(0, po("po:PO-1"), T0);
    assert_eq!(clocks.take_due(T0 + 2 * H).len(), 1);
    assert!(clocks.close(0, "po:PO-1", T0 + 3 * H));
    assert!(clocks.take_due(T0 + 100 * H).is_empty());
    // The Open replayed (a route restart) does not start it again.
    assert_eq!(clocks.open(0, po("po:PO-1"), T0), Opened::AlreadyClosed);
    assert_eq!(
        clocks.upstream("po:PO-1", 2, T0 + 8 * H),
        UpstreamOutcome::Closed
    );
    // An answer before any clock (or a second answer) still leaves the key closed once.
    assert!(!clocks.close(0, "po:PO-2", T0));
    assert!(!clocks.close(0, "po:PO-2", T0));
    assert_eq!(clocks.open(0, po("po:PO-2"), T0), Opened::AlreadyClosed);
    let changes = clocks.take_changes();
    let closed: Vec<_> = changes
        .iter()
        .filter(|c| c.key.starts_with(CLOSED_PREFIX))
        .collect();
    assert_eq!(closed.len(), 2);
    assert!(changes
        .iter()
        .any(|c| c.key == "clock:po:PO-1" && c.value.is_none()));
}

#[test]
fn an_upstream_overdue_event_fires_its_step_once_whoever_comes_first() {
    let mut clocks = Clocks::new();
    clocks.open(0, po("po:PO-1"), T0);
    // Upstream says 0 hours overdue, before gridtalk's clock fired: the first reminder, now.
    let offsets = [0, 4 * H, 24 * H];
    assert_eq!(upstream_step(&offsets, true, false, 0), 1);
    assert_eq!(upstream_step(&offsets, true, false, 5), 2);
    assert_eq!(
        upstream_step(&offsets, true, false, 30),
        2,
        "reminders only"
    );
    assert_eq!(upstream_step(&offsets, true, true, 30), 3);
    assert_eq!(upstream_step(&offsets[..2], false, true, 30), 2);
    let UpstreamOutcome::Fire(fire) = clocks.upstream("po:PO-1", 1, T0 + 2 * H) else {
        panic!("fires");
    };
    assert_eq!((fire.step, fire.trigger), (1, Trigger::Upstream));
    // The clock reaches that step: nothing more.
    assert!(clocks.take_due(T0 + 2 * H + 1).is_empty());
    // The clock fires the second reminder; upstream then names it: nothing more.
    assert_eq!(clocks.take_due(T0 + 6 * H).len(), 1);
    assert_eq!(
        clocks.upstream("po:PO-1", 2, T0 + 6 * H),
        UpstreamOutcome::AlreadyFired
    );
    // An upstream escalation fires the escalation, ending the clock.
    let UpstreamOutcome::Fire(fire) = clocks.upstream("po:PO-1", 3, T0 + 22 * H) else {
        panic!("fires");
    };
    assert!(fire.is_escalation());
    assert_eq!(fire.hours_overdue(), 20);
    assert!(clocks.is_empty());
    // Without a clock the event is routed as before.
    assert_eq!(clocks.upstream("po:PO-9", 1, T0), UpstreamOutcome::NoClock);
}

#[test]
fn state_survives_a_restore_and_stays_with_its_partition() {
    let mut clocks = Clocks::new();
    clocks.open(4, po("po:PO-1"), T0);
    clocks.open(5, po("po:PO-2"), T0);
    clocks.take_due(T0 + 2 * H);
    clocks.close(5, "po:PO-2", T0 + 3 * H);
    let changes = clocks.take_changes();
    // Replay the changelog of partition 4 and 5 the way compaction leaves it (last value per key).
    let mut latest: HashMap<(i32, String), Option<String>> = HashMap::new();
    for c in changes {
        latest.insert((c.partition, c.key), c.value);
    }
    let entries = |p: i32| {
        latest
            .iter()
            .filter(|((partition, _), v)| *partition == p && v.is_some())
            .map(|((_, k), v)| (k.clone(), v.clone().unwrap()))
            .collect::<Vec<_>>()
    };
    let mut restored = Clocks::new();
    restored.restore(4, entries(4));
    restored.restore(5, entries(5));
    assert_eq!(restored.len(), 1);
    assert!(restored.is_closed("po:PO-2"));
    // The first reminder fired before the move: the next to fire is the second.
    assert!(restored.take_due(T0 + 5 * H).is_empty());
    assert_eq!(steps(&restored.take_due(T0 + 6 * H))[0].1, 2);
    restored.drop_partition(4);
    assert!(restored.is_empty());
    assert_eq!(restored.next_due_ms(), None);
    restored.drop_partition(5);
    assert_eq!(restored.closed_len(), 0);
}

#[test]
fn missed_steps_fire_one_after_another_after_an_outage() {
    let mut clocks = Clocks::new();
    clocks.open(0, po("po:PO-1"), T0);
    let fires = clocks.take_due(T0 + 40 * H);
    assert_eq!(
        fires.iter().map(|f| f.step).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    // A clock whose every step is far in the past is not opened at all.
    let mut stale = po("po:PO-2");
    stale.steps_at_ms = vec![T0 - 100 * H];
    assert_eq!(clocks.open(0, stale, T0), Opened::Expired);
}

#[test]
fn commands_round_trip_and_are_told_apart_from_candidates() {
    let open = ClockCommand::Open(po("po:PO-1"));
    assert_eq!(
        ClockCommand::from_json(&open.to_json()).unwrap().unwrap(),
        open
    );
    let close = ClockCommand::Close {
        key: "po:PO-1".into(),
        reason: "tg.po.acknowledged".into(),
    };
    assert_eq!(
        ClockCommand::from_json(&close.to_json()).unwrap().unwrap(),
        close
    );
    assert!(ClockCommand::from_json(br#"{"request":{},"action":"ACCEPT"}"#).is_none());
    assert!(ClockCommand::from_json(b"not json").is_none());
    assert!(ClockCommand::from_json(br#"{"clock":{"open":7}}"#)
        .unwrap()
        .is_err());
}

#[test]
fn a_scaled_time_source_runs_fast_from_its_anchor() {
    let wall = TimeSource::wall();
    assert!(wall.is_wall());
    let anchor = wall_ms() - 2_000;
    let fast = TimeSource::scaled(3_600.0, anchor, T0);
    let now = fast.now_ms();
    // Two real seconds at 3,600x: two hours (give or take the test's own time).
    assert!((now - (T0 + 2 * H)).abs() < 3_600 * 500, "{now}");
    let wait = fast.wait_until(now + H);
    assert!(wait <= Duration::from_millis(1_001) && wait >= Duration::from_millis(900));
    assert_eq!(fast.wait_until(now - H), Duration::ZERO);
}

fn waiting(id: &str, release: i64, sequence: u64) -> DeferredMessage {
    DeferredMessage {
        key: "defer:nippon-billing".into(),
        message_id: id.into(),
        contact_id: "nippon-billing".into(),
        deferred_at_ms: T0,
        release_at_ms: release,
        sequence,
        message: "{}".into(),
    }
}

#[test]
fn waiting_messages_are_released_in_order_once_and_survive_a_restore() {
    let mut deferred = Deferred::new();
    assert!(deferred.hold(2, waiting("b", T0 + 7 * H, 2)));
    assert!(deferred.hold(2, waiting("a", T0 + 7 * H, 1)));
    assert!(deferred.hold(2, waiting("c", T0 + 8 * H, 3)));
    assert!(!deferred.hold(2, waiting("a", T0 + 7 * H, 1)), "held once");
    assert_eq!(deferred.next_due_ms(), Some(T0 + 7 * H));
    assert!(deferred.take_next_due(T0 + 7 * H - 1).is_none());
    let written: Vec<(String, String)> = deferred
        .take_changes()
        .into_iter()
        .map(|c| (c.key, c.value.unwrap()))
        .collect();
    assert_eq!(written.len(), 3);
    let mut restored = Deferred::new();
    restored.restore(2, written);
    for clocks in [&mut deferred, &mut restored] {
        let released: Vec<String> = std::iter::from_fn(|| clocks.take_next_due(T0 + 7 * H))
            .map(|(p, m)| {
                assert_eq!(p, 2);
                m.message_id
            })
            .collect();
        assert_eq!(released, ["a", "b"]);
        assert_eq!(clocks.len(), 1);
    }
    assert!(deferred
        .take_changes()
        .iter()
        .all(|c| c.value.is_none() && c.key.starts_with(DEFERRED_PREFIX)));
    restored.drop_partition(2);
    assert!(restored.is_empty());
    assert_eq!(restored.next_due_ms(), None);
}
