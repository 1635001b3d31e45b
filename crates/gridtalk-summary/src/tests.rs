use super::*;
use serde_json::json;

const HOUR: i64 = 3_600_000;

fn view(payload: Value) -> Value {
    json!({"payload": payload, "partner": {"partner_id": "ACME"}})
}

fn apply(tally: &mut Tally, event_type: &str, payload: Value, at: i64) {
    for o in from_event(event_type, &view(payload)) {
        tally.observe(&o, at);
    }
}

fn response(body: ResponseBody, request_id: &str) -> WorkflowResponse {
    let mut r = gridtalk_contract::samples::sample_responses(0)
        .into_iter()
        .next()
        .expect("a sample response");
    r.body = body;
    r.request_id = Some(request_id.into());
    r
}

#[test]
fn each_document_counts_once_and_open_ones_close() {
    let mut t = Tally::new(0);
    for (i, at) in [(1, 10), (1, 20), (2, 30)] {
        apply(
            &mut t,
            "tg.po.acknowledged",
            json!({"po_number": format!("PO-{i}")}),
            at,
        );
    }
    apply(
        &mut t,
        "tg.invoice.delivered",
        json!({"invoice_number": "INV-1"}),
        40,
    );
    apply(
        &mut t,
        "tg.invoice.delivered",
        json!({"invoice_number": "INV-2"}),
        41,
    );
    apply(
        &mut t,
        "tg.invoice.acknowledged",
        json!({"invoice_number": "INV-1"}),
        42,
    );
    apply(
        &mut t,
        "tg.shipment.exception",
        json!({"shipment_id": "SH-1"}),
        50,
    );
    apply(
        &mut t,
        "tg.shipment.exception",
        json!({"shipment_id": "SH-2"}),
        51,
    );
    apply(
        &mut t,
        "tg.delivery.confirmed",
        json!({"shipment_id": "SH-2"}),
        52,
    );
    apply(
        &mut t,
        "wf.approval.requested",
        json!({"approval_id": "APR-1"}),
        60,
    );
    apply(
        &mut t,
        "wf.approval.requested",
        json!({"approval_id": "APR-2"}),
        61,
    );
    for o in from_response(&response(
        ResponseBody::ApprovalDecision {
            approval_id: "APR-2".into(),
            decision: "APPROVE".into(),
            comment: None,
        },
        "APR-2",
    )) {
        t.observe(&o, 62);
    }
    let counts = t.counts();
    assert_eq!(counts[&Measure::CompletedPos], 2);
    assert_eq!(counts[&Measure::PendingInvoices], 1);
    assert_eq!(counts[&Measure::OpenExceptions], 1);
    assert_eq!(counts[&Measure::OpenApprovals], 1);
}

#[test]
fn overdue_requests_open_by_upstream_or_clock_once_and_close_with_the_answer() {
    let mut t = Tally::new(0);
    apply(
        &mut t,
        "tg.po.ack_overdue",
        json!({"po_number": "PO-7", "escalation_level": 0}),
        10,
    );
    for o in from_response(&response(
        ResponseBody::RequestOverdue {
            request_kind: "po".into(),
            policy: "a-po-acknowledgement".into(),
            step: 1,
            steps: 3,
            escalation: false,
            due_at: 0,
            hours_overdue: 0,
            notified_contact_ids: vec![],
            trigger: "CLOCK".into(),
        },
        "PO-7",
    )) {
        t.observe(&o, 11);
    }
    assert_eq!(
        t.counts()[&Measure::OverdueRequests],
        1,
        "one order, twice overdue"
    );
    apply(
        &mut t,
        "tg.po.ack_overdue",
        json!({"po_number": "PO-8", "escalation_level": 1}),
        12,
    );
    assert_eq!(t.counts()[&Measure::FailedAcknowledgements], 1);
    for o in from_response(&response(
        ResponseBody::PoAckDecision {
            po_number: "PO-7".into(),
            decision: "ACCEPT".into(),
            comment: None,
        },
        "PO-7",
    )) {
        t.observe(&o, 13);
    }
    let counts = t.counts();
    assert_eq!(counts[&Measure::OverdueRequests], 1, "PO-8 only");
    assert_eq!(counts[&Measure::CompletedPos], 1);
}

#[test]
fn a_close_before_its_open_keeps_the_late_open_from_counting() {
    let mut t = Tally::new(0);
    apply(
        &mut t,
        "tg.delivery.confirmed",
        json!({"shipment_id": "SH-9"}),
        10,
    );
    apply(
        &mut t,
        "tg.shipment.exception",
        json!({"shipment_id": "SH-9"}),
        11,
    );
    assert_eq!(t.counts()[&Measure::OpenExceptions], 0);
}

#[test]
fn a_period_closes_its_happenings_and_keeps_what_is_open() {
    let mut t = Tally::new(0);
    apply(
        &mut t,
        "tg.po.acknowledged",
        json!({"po_number": "PO-1"}),
        10,
    );
    apply(
        &mut t,
        "tg.invoice.delivered",
        json!({"invoice_number": "INV-1"}),
        11,
    );
    let day_one = t.close_period(24 * HOUR);
    assert_eq!(day_one[&Measure::CompletedPos], 1);
    assert_eq!(day_one[&Measure::PendingInvoices], 1);
    let day_two = t.counts();
    assert_eq!(day_two[&Measure::CompletedPos], 0);
    assert_eq!(day_two[&Measure::PendingInvoices], 1);
    assert_eq!(t.period_start_ms, 24 * HOUR);
    let back = Tally::from_json(&t.to_json()).expect("round trip");
    assert_eq!(back, t);
}

#[test]
fn a_tally_is_bounded_and_counts_what_fell_out() {
    let mut t = Tally::new(0);
    for i in 0..(MAX_IDS + 5) {
        t.observe(
            &Observation::Opened(Measure::OpenExceptions, format!("SH-{i}")),
            i as i64,
        );
    }
    assert_eq!(t.counts()[&Measure::OpenExceptions], (MAX_IDS + 5) as u64);
    assert!(t.to_json().len() < MAX_IDS * 40);
}

#[test]
fn the_daily_summary_is_due_at_the_local_time_of_the_zone() {
    let berlin = Daily::parse("08:00", "Europe/Berlin").expect("parses");
    // 2026-12-04 10:00 UTC is 11:00 in Berlin: next is 2026-12-05 08:00 CET = 07:00 UTC.
    let now = chrono::Utc
        .with_ymd_and_hms(2026, 12, 4, 10, 0, 0)
        .unwrap()
        .timestamp_millis();
    let next = berlin.next_after(now);
    let expected = chrono::Utc
        .with_ymd_and_hms(2026, 12, 5, 7, 0, 0)
        .unwrap()
        .timestamp_millis();
    assert_eq!(next, expected);
    // Before the hour on the same day: today.
    let early = chrono::Utc
        .with_ymd_and_hms(2026, 12, 4, 6, 0, 0)
        .unwrap()
        .timestamp_millis();
    assert_eq!(berlin.next_after(early), expected - 24 * HOUR);
    // A local time the spring change skips (02:30 on 2027-03-28 in Berlin) is taken an hour later.
    let skipped = Daily::parse("02:30", "Europe/Berlin").expect("parses");
    let before = chrono::Utc
        .with_ymd_and_hms(2027, 3, 27, 12, 0, 0)
        .unwrap()
        .timestamp_millis();
    let at = skipped.next_after(before);
    assert_eq!(
        at,
        chrono::Utc
            .with_ymd_and_hms(2027, 3, 28, 1, 30, 0)
            .unwrap()
            .timestamp_millis()
    );
    assert!(Daily::parse("8am", "Europe/Berlin").is_err());
    assert!(Daily::parse("08:00", "Mars/Olympus").is_err());
}

#[test]
fn a_threshold_fires_once_per_window() {
    let rule = Threshold {
        name: "exceptions".into(),
        measure: Measure::OpenExceptions,
        at_least: 5,
        within_ms: HOUR,
    };
    let mut t = Tally::new(0);
    let mut fired = Vec::new();
    for i in 0..12i64 {
        let at = i * 5 * 60_000;
        apply(
            &mut t,
            "tg.shipment.exception",
            json!({"shipment_id": format!("SH-{i}")}),
            at,
        );
        if rule.fires(&mut t, at) {
            fired.push(i);
        }
    }
    assert_eq!(
        fired,
        [4],
        "the fifth within the hour, then not again within it"
    );
    let later = 2 * HOUR;
    for i in 20..25 {
        apply(
            &mut t,
            "tg.shipment.exception",
            json!({"shipment_id": format!("SH-{i}")}),
            later,
        );
    }
    assert!(rule.fires(&mut t, later));
}

fn schedules(daily: &str, zone: &str, thresholds: Vec<Threshold>) -> BTreeMap<String, Schedule> {
    BTreeMap::from([(
        "ops".to_string(),
        Schedule {
            daily: Some(Daily::parse(daily, zone).unwrap()),
            thresholds,
        },
    )])
}

fn observed(scope: &str, at: i64, observations: Vec<Observation>) -> Observed {
    Observed {
        summary: "ops".into(),
        scope: scope.into(),
        at_ms: at,
        observations,
    }
}

#[test]
fn a_daily_summary_fires_once_a_day_at_its_local_time_and_survives_a_restore() {
    let start = chrono::Utc
        .with_ymd_and_hms(2026, 12, 4, 0, 0, 0)
        .unwrap()
        .timestamp_millis();
    let mut s = Summaries::new(schedules("09:00", "Asia/Tokyo", vec![]));
    s.observe(
        0,
        &observed(
            "all",
            start,
            vec![Observation::Done(Measure::CompletedPos, "PO-1".into())],
        ),
        start,
    );
    // 09:00 in Tokyo is 00:00 UTC: the next is 2026-12-05 00:00 UTC.
    let due = start + 24 * HOUR;
    assert_eq!(s.next_due_ms(), Some(due));
    assert!(s.take_next_due(due - 1).is_none());
    let fire = s.take_next_due(due).expect("due");
    assert_eq!(
        (fire.kind.as_str(), fire.counts[&Measure::CompletedPos]),
        ("daily", 1)
    );
    assert!(s.take_next_due(due).is_none(), "once");
    assert_eq!(s.next_due_ms(), Some(due + 24 * HOUR));
    // The changelog restores it on another owner, due at the same time.
    let changes = s.take_changes();
    let mut other = Summaries::new(schedules("09:00", "Asia/Tokyo", vec![]));
    other.restore(3, changes);
    assert_eq!(other.next_due_ms(), Some(due + 24 * HOUR));
    other.drop_partition(3);
    assert!(other.is_empty() && other.next_due_ms().is_none());
}

#[test]
fn observations_round_trip_on_the_decisions_topic() {
    let o = observed(
        "ACME",
        5,
        vec![
            Observation::Opened(Measure::OpenExceptions, "SH-1".into()),
            Observation::Closed(Measure::PendingInvoices, "INV-1".into()),
        ],
    );
    assert_eq!(Observed::from_json(&o.to_json()).unwrap().unwrap(), o);
    assert_eq!(o.key(), "summary:ops:ACME");
    assert!(Observed::from_json(br#"{"clock": {}}"#).is_none());
    assert!(Observed::from_json(br#"{"summary": 3}"#).unwrap().is_err());
}

#[test]
fn a_threshold_crossed_by_observations_fires_with_the_counts() {
    let rule = Threshold {
        name: "exceptions".into(),
        measure: Measure::OpenExceptions,
        at_least: 3,
        within_ms: HOUR,
    };
    let mut s = Summaries::new(schedules("08:00", "UTC", vec![rule]));
    let mut fires = Vec::new();
    for i in 0..4 {
        fires.extend(s.observe(
            1,
            &observed(
                "ACME",
                i * 60_000,
                vec![Observation::Opened(
                    Measure::OpenExceptions,
                    format!("SH-{i}"),
                )],
            ),
            i * 60_000,
        ));
    }
    assert_eq!(fires.len(), 1);
    assert_eq!(fires[0].kind, "threshold:open_exceptions");
    assert_eq!(fires[0].counts[&Measure::OpenExceptions], 3);
    assert_eq!(
        fires[0].fire_id(),
        "summary:ops:ACME:threshold:open_exceptions:120000"
    );
}
