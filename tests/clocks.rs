//! Time in the stream, end to end on the real broker with a fast test clock: a purchase order
//! nobody acknowledges is reminded at its due time and four hours later, then escalated to
//! procurement a day after it was due; an answer stops the rest; a kill -9 between the steps
//! changes nothing anyone sees; a Tokyo contact's informational alert waits for 09:00 there; ten
//! alerts in ten seconds reach a person as a few messages, each request still answerable.
//! Asserted at the sandbox (what people received) and on the response topic (the
//! `wa.request.overdue` records workflows read).

mod support;

use std::time::Duration;

use gridtalk_contract::{ResponseBody, WorkflowResponse};
use gridtalk_sandbox::Reply;
use rdkafka::Message;
use support::*;

const WAIT: Duration = Duration::from_secs(180);
const HOUR: i64 = 3_600_000;

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The pipeline's clock runs `speed` times faster than the wall clock from now on; every
/// process given these settings agrees on the time.
fn fast_clock(setup: &mut Setup, speed: u32) -> gridtalk_clock::TimeSource {
    let anchor = now_ms();
    setup.overrides.push(("CLOCK__SPEED", speed.to_string()));
    setup
        .overrides
        .push(("CLOCK__ANCHOR_MS", anchor.to_string()));
    gridtalk_clock::TimeSource::scaled(f64::from(speed), anchor, 0)
}

/// A purchase order for ACME's order desk whose acknowledgement is due `due_in` from now.
fn purchase_order(seq: u64, due_in: i64) -> serde_json::Value {
    let mut po = event("tg.po.received", seq, "ACME");
    po["payload"]["PurchaseOrderReceived"]["ack_due_at"] = serde_json::json!(now_ms() + due_in);
    po
}

/// The `wa.request.overdue` records of request `po`, by step.
fn overdue(p: &Pipeline, po: &str) -> Vec<(i32, WorkflowResponse)> {
    let mut records: Vec<(i32, WorkflowResponse)> = p
        .responses()
        .into_iter()
        .filter(|r| r.response_type == "wa.request.overdue" && r.request_id.as_deref() == Some(po))
        .map(|r| match &r.body {
            ResponseBody::RequestOverdue { step, .. } => (*step, r.clone()),
            other => panic!("wa.request.overdue with body {other:?}"),
        })
        .collect();
    records.sort_by_key(|(step, _)| *step);
    records
}

/// (template, recipient) of every message the sandbox received about `po`, in order.
fn messages_about(p: &Pipeline, po: &str) -> Vec<(String, String)> {
    p.sandbox
        .messages()
        .into_iter()
        .filter(|m| m.parameters.iter().any(|x| x == po))
        .map(|m| (m.template.unwrap_or_default(), m.to))
        .collect()
}

/// The last value of changelog key `key` on the converse state topic (`None`: a tombstone or
/// nothing).
fn state_entry(p: &Pipeline, key: &str) -> Option<Option<Vec<u8>>> {
    read_topic(&p.config.topics.converse_state)
        .into_iter()
        .rfind(|m| m.key() == Some(key.as_bytes()))
        .map(|m| m.payload().map(<[u8]>::to_vec))
}

fn assert_step(record: &WorkflowResponse, step: i32, escalation: bool, notified: &[&str]) {
    let ResponseBody::RequestOverdue {
        request_kind,
        policy,
        step: s,
        steps,
        escalation: e,
        notified_contact_ids,
        trigger,
        ..
    } = &record.body
    else {
        panic!("not an overdue record: {record:?}");
    };
    assert_eq!(
        (request_kind.as_str(), policy.as_str(), *s, *steps, *e),
        ("po", "a-po-acknowledgement", step, 3, escalation)
    );
    assert_eq!(notified_contact_ids, notified);
    assert_eq!(trigger, "CLOCK");
    assert_eq!(record.partner_id.as_deref(), Some("ACME"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flow_a_an_unanswered_order_is_reminded_twice_then_escalated_to_procurement() {
    let mut setup = Setup {
        ingest: true,
        ..Setup::default()
    };
    let time = fast_clock(&mut setup, 3_600);
    let p = Pipeline::start(setup).await;
    p.wait_for_way_back(WAIT).await;
    let po = purchase_order(61, 2 * HOUR);
    let due = po["payload"]["PurchaseOrderReceived"]["ack_due_at"]
        .as_i64()
        .unwrap();
    p.publish_event(&po).await;
    let number = "PO-4500061";

    // An upstream system's own reminder for the step the clock sends first: one reminder only.
    p.wait_until("the first reminder", WAIT, |p| {
        !overdue(p, number).is_empty()
    })
    .await;
    let mut upstream = event("tg.po.ack_overdue", 61, "ACME");
    upstream["payload"]["PurchaseOrderAckOverdue"]["hours_overdue"] = serde_json::json!(0);
    upstream["payload"]["PurchaseOrderAckOverdue"]["escalation_level"] = serde_json::json!(0);
    p.publish_event(&upstream).await;
    // One for an order gridtalk keeps no clock for: routed by the rules, as before.
    let unknown = event("tg.po.ack_overdue", 69, "ACME");
    p.publish_event(&unknown).await;
    message_to(&p, WAIT, "15550100001", "po_ack_overdue").await;
    p.wait_until("the escalation", WAIT, |p| overdue(p, number).len() == 3)
        .await;
    let records = overdue(&p, number);
    assert_step(&records[0].1, 1, false, &["acme-order-desk"]);
    assert_step(&records[1].1, 2, false, &["acme-order-desk"]);
    assert_step(&records[2].1, 3, true, &["buyer-maria"]);
    // Each at its time on the clock: the due time, +4 h, +24 h.
    for ((_, record), at) in records.iter().zip([due, due + 4 * HOUR, due + 24 * HOUR]) {
        assert!(
            record.received_at >= at && record.received_at < at + 2 * HOUR,
            "step fired at {} for {at}",
            record.received_at
        );
        assert_eq!(
            record.correlation_id,
            po["correlation_id"].as_str().unwrap()
        );
        assert_eq!(
            record.in_reply_to_event_id.as_deref(),
            po["event_id"].as_str()
        );
    }
    p.wait_until("the escalation at the sandbox", WAIT, |p| {
        messages_about(p, number).len() == 4
    })
    .await;
    assert_eq!(
        messages_about(&p, number),
        [
            ("po_ack_request", "15550100001"),
            ("po_ack_reminder", "15550100001"),
            ("po_ack_reminder", "15550100001"),
            ("request_escalation", "14155550101"),
        ]
        .map(|(t, to)| (t.to_string(), to.to_string()))
    );
    let reminders: Vec<_> = p
        .sandbox
        .messages()
        .into_iter()
        .filter(|m| m.template.as_deref() == Some("po_ack_reminder"))
        .collect();
    assert_eq!(reminders[0].parameters[0], "1");
    assert_eq!(reminders[1].parameters[0], "2");
    assert_eq!(reminders[1].parameters[3], "4", "four hours overdue");
    assert_eq!(
        reminders[0].buttons,
        ["Accept", "Accept with changes", "Reject"]
    );
    let escalation = message_to(&p, WAIT, "14155550101", "request_escalation").await;
    assert!(
        escalation
            .rendered
            .contains("Purchase order PO-4500061 for ACME")
            && escalation.rendered.contains("24 hours")
            && escalation.rendered.contains("(2 reminders sent)"),
        "{}",
        escalation.rendered
    );
    // The clock is gone (tombstoned), and a day later still nothing more was sent.
    assert_eq!(state_entry(&p, "clock:po:PO-4500061"), Some(None));
    p.wait_until("two days past the due time", WAIT, |_| {
        time.now_ms() > due + 48 * HOUR
    })
    .await;
    p.wait_for_commits(&p.send_group(), &p.config.topics.outbox, WAIT)
        .await;
    assert_eq!(messages_about(&p, number).len(), 4);
    assert_eq!(overdue(&p, number).len(), 3);
    let upstream_copies: Vec<_> = p
        .sandbox
        .messages()
        .into_iter()
        .filter(|m| m.template.as_deref() == Some("po_ack_overdue"))
        .map(|m| m.parameters[0].clone())
        .collect();
    assert_eq!(
        upstream_copies,
        ["PO-4500069"],
        "the upstream reminder of step 1 was not sent again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flow_a_an_accept_tapped_on_the_first_reminder_stops_the_rest() {
    let mut setup = Setup {
        ingest: true,
        ..Setup::default()
    };
    // One hour in 2 s: the second reminder is 8 s after the first, time to tap and settle.
    let time = fast_clock(&mut setup, 1_800);
    let p = Pipeline::start(setup).await;
    p.wait_for_way_back(WAIT).await;
    let po = purchase_order(62, 4 * HOUR);
    let due = po["payload"]["PurchaseOrderReceived"]["ack_due_at"]
        .as_i64()
        .unwrap();
    p.publish_event(&po).await;
    let number = "PO-4500062";
    let reminder = message_to(&p, WAIT, "15550100001", "po_ack_reminder").await;
    let hours = |at: i64| (at - due) as f64 / HOUR as f64;
    println!("first reminder at due {:+.1} h", hours(time.now_ms()));
    assert!(reminder.parameters.iter().any(|x| x == number));
    // The reminder's own buttons answer the order.
    let tap = p
        .sandbox
        .reply(&reminder.wamid, Reply::Button { index: 0 })
        .await
        .expect("tap delivered");
    p.wait_until("the decision", WAIT, |p| {
        p.responses().iter().any(|r| r.wa_message_id == tap)
    })
    .await;
    let decision = p
        .responses()
        .into_iter()
        .find(|r| r.wa_message_id == tap)
        .unwrap();
    println!("decision at due {:+.1} h", hours(time.now_ms()));
    assert_eq!(decision.response_type, "wa.po.ack_decision");
    assert_eq!(decision.request_id.as_deref(), Some(number));
    // Closed for good: the clock tombstoned, the request remembered as closed.
    p.wait_until("the clock closed", WAIT, |p| {
        state_entry(p, "clock-closed:po:PO-4500062").is_some_and(|v| v.is_some())
    })
    .await;
    println!("closed at due {:+.1} h", hours(time.now_ms()));
    assert_eq!(state_entry(&p, "clock:po:PO-4500062"), Some(None));
    p.wait_until("past the escalation time", WAIT, |_| {
        time.now_ms() > due + 26 * HOUR
    })
    .await;
    p.wait_for_commits(&p.send_group(), &p.config.topics.outbox, WAIT)
        .await;
    let records = overdue(&p, number);
    assert_eq!(records.len(), 1, "only the first reminder: {records:?}");
    assert_step(&records[0].1, 1, false, &["acme-order-desk"]);
    let sent: Vec<String> = messages_about(&p, number)
        .into_iter()
        .map(|(t, _)| t)
        .filter(|t| t != "answer_status")
        .collect();
    assert_eq!(sent, ["po_ack_request", "po_ack_reminder"]);
    assert!(!p
        .sandbox
        .messages()
        .iter()
        .any(|m| m.template.as_deref() == Some("request_escalation")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_step_fires_exactly_once_across_kill_9_between_the_steps() {
    // Ingest runs here (the webhook receiver, up throughout); everything else in a process that
    // is killed with SIGKILL after each of the first two steps and started again.
    let mut setup = Setup {
        ingest: true,
        in_process: true,
        only_stages: Some(vec![gridtalk::Stage::Ingest]),
        ..Setup::default()
    };
    fast_clock(&mut setup, 3_600);
    let p = Pipeline::start(setup).await;
    p.wait_for_way_back(WAIT).await;
    let stages = "route,send,converse";
    let mut gridtalk = p.spawn_gridtalk("first", stages);
    let numbers: Vec<String> = (71..74).map(|seq| format!("PO-45000{seq}")).collect();
    for seq in 71..74 {
        p.publish_event(&purchase_order(seq, 2 * HOUR)).await;
    }
    for (round, after_step) in [(1, 1usize), (2, 2)] {
        p.wait_until(&format!("step {after_step} of every order"), WAIT, |p| {
            numbers.iter().all(|n| overdue(p, n).len() >= after_step)
        })
        .await;
        // Killed between the steps: once the fired step's messages are sent and the send stage
        // has committed them (a send on the wire at the instant of a crash is the send stage's
        // known duplicate, not the clock's), not necessarily after the step's state was written.
        p.wait_until("the step's reminders at the sandbox", WAIT, |p| {
            numbers
                .iter()
                .all(|n| messages_about(p, n).len() > after_step)
        })
        .await;
        p.wait_for_commits(&p.send_group(), &p.config.topics.outbox, WAIT)
            .await;
        gridtalk.kill().expect("SIGKILL");
        gridtalk.wait().expect("reaped");
        gridtalk = p.spawn_gridtalk(&format!("restart-{round}"), stages);
    }
    p.wait_until("every escalation", WAIT, |p| {
        numbers.iter().all(|n| overdue(p, n).len() >= 3)
            && p.sandbox
                .messages()
                .iter()
                .filter(|m| m.template.as_deref() == Some("request_escalation"))
                .count()
                >= 3
    })
    .await;
    p.wait_for_commits(&p.send_group(), &p.config.topics.outbox, WAIT)
        .await;
    for number in &numbers {
        let records = overdue(&p, number);
        let steps: Vec<i32> = records.iter().map(|(s, _)| *s).collect();
        assert_eq!(steps, [1, 2, 3], "{number}: each step's record once");
        // Sorted: a step fired on catch-up after a restart may reach procurement before the
        // order desk's reminder, which waits for the pair limit.
        let mut templates: Vec<String> = messages_about(&p, number)
            .into_iter()
            .map(|(t, _)| t)
            .collect();
        templates.sort();
        assert_eq!(
            templates,
            [
                "po_ack_reminder",
                "po_ack_reminder",
                "po_ack_request",
                "request_escalation"
            ],
            "{number}: each message once"
        );
    }
    assert_eq!(terminate(&mut gridtalk).code(), Some(0));
}

/// A partner in Tokyo with business hours 09:00–18:00 (Monday to Friday) and its billing contact.
const TOKYO: &str = r#"
[[partners]]
id = "NIPPON"
name = "Nippon Parts KK"
time_zone = "Asia/Tokyo"
business_hours = "09:00-18:00"

[[contacts]]
id = "nippon-billing"
name = "Billing Nippon"
phone = "+81 90 1234 5678"
language = "en_US"
opted_in = true
partner = "NIPPON"
roles = ["billing"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contact_in_tokyo_gets_an_informational_alert_at_nine_and_a_critical_one_at_once() {
    let directory = format!("{DIRECTORY}\n{TOKYO}");
    let mut setup = Setup {
        ingest: true,
        directory: directory.clone(),
        ..Setup::default()
    };
    setup.sandbox.people =
        gridtalk_sandbox::people_from_directory(&directory, "Northwind Retail").unwrap();
    // Thursday 2026-12-03, 02:00 in Tokyo, an hour passing every second.
    let two_am = chrono::DateTime::parse_from_rfc3339("2026-12-03T02:00:00+09:00")
        .unwrap()
        .timestamp_millis();
    let nine_am = two_am + 7 * HOUR;
    let anchor = now_ms();
    setup.overrides.push(("CLOCK__SPEED", "3600".into()));
    setup
        .overrides
        .push(("CLOCK__ANCHOR_MS", anchor.to_string()));
    setup
        .overrides
        .push(("CLOCK__START_MS", two_am.to_string()));
    let time = gridtalk_clock::TimeSource::scaled(3_600.0, anchor, two_am);
    let p = Pipeline::start(setup).await;
    p.wait_for_way_back(WAIT).await;

    let mut info = event("tg.invoice.rejected", 81, "NIPPON");
    info["severity"] = serde_json::json!("INFO");
    let mut critical = event("tg.invoice.rejected", 82, "NIPPON");
    critical["severity"] = serde_json::json!("CRITICAL");
    p.publish_event(&info).await;
    p.publish_event(&critical).await;
    let about = |p: &Pipeline, invoice: &str, to: &str| {
        p.sandbox
            .messages()
            .iter()
            .any(|m| m.to == to && m.parameters.iter().any(|x| x == invoice))
    };
    let tokyo = "819012345678";
    p.wait_until("the critical alert in Tokyo", WAIT, |p| {
        about(p, "INV-900082", tokyo)
    })
    .await;
    let critical_at = time.now_ms();
    // The company's own accounts payable (no business hours set) got both at once.
    p.wait_until("both alerts at accounts payable", WAIT, |p| {
        about(p, "INV-900081", "14155550102") && about(p, "INV-900082", "14155550102")
    })
    .await;
    assert!(
        !about(&p, "INV-900081", tokyo),
        "the informational alert waits"
    );
    p.wait_until("the informational alert in Tokyo", WAIT, |p| {
        about(p, "INV-900081", tokyo)
    })
    .await;
    let info_at = time.now_ms();
    println!(
        "critical at {:.1} h Tokyo time, informational at {:.1} h",
        2.0 + (critical_at - two_am) as f64 / HOUR as f64,
        2.0 + (info_at - two_am) as f64 / HOUR as f64
    );
    assert!(critical_at < nine_am, "the critical alert did not wait");
    assert!(
        info_at >= nine_am,
        "the informational alert came before 09:00"
    );
    // The wait is measured, on the clocks' time: from when route held it (before the critical
    // one arrived) until 09:00.
    let waited = gridtalk_telemetry::Metrics::global()
        .quiet_hours_wait_seconds
        .with_label_values(&["decide"]);
    assert!(waited.get_sample_count() >= 1);
    assert!(
        waited.get_sample_sum() >= (nine_am - critical_at) as f64 / 1000.0,
        "{}",
        waited.get_sample_sum()
    );
    assert!(p.dead_letters().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_alerts_in_ten_seconds_become_a_few_messages_and_every_request_stays_answerable() {
    // Meta's pair limit as configured by default (one per 6 s, bursts of 3) and a 10 s window.
    let mut setup = Setup {
        ingest: true,
        ..Setup::default()
    };
    setup
        .overrides
        .push(("SEND__COALESCE__WINDOW_MS", "10000".into()));
    let p = Pipeline::start(setup).await;
    p.wait_for_way_back(WAIT).await;
    let li = "14155550103";
    // Ten alerts for logistics over nine seconds: seven shipment updates (information) and three
    // shipment exceptions (they ask for an answer: a new ETA or a comment).
    let kinds = [
        "tg.asn.sent",
        "tg.shipment.status_updated",
        "tg.shipment.exception",
        "tg.delivery.confirmed",
        "tg.asn.sent",
        "tg.shipment.exception",
        "tg.shipment.status_updated",
        "tg.delivery.confirmed",
        "tg.shipment.exception",
        "tg.asn.sent",
    ];
    for (i, kind) in kinds.iter().enumerate() {
        p.publish_event(&event(kind, 81 + i as u64, "ACME")).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let shipment = |i: usize| format!("SH-{}", 700_081 + i);
    let to_li = |p: &Pipeline| -> Vec<gridtalk_sandbox::ReceivedMessage> {
        p.sandbox
            .messages()
            .into_iter()
            .filter(|m| m.to == li)
            .collect()
    };
    p.wait_until("every alert at logistics", WAIT, |p| {
        let received = to_li(p);
        (0..kinds.len()).all(|i| received.iter().any(|m| m.rendered.contains(&shipment(i))))
    })
    .await;
    p.wait_for_commits(&p.send_group(), &p.config.topics.outbox, WAIT)
        .await;
    let received = to_li(&p);
    for m in &received {
        println!(
            "{:>6} ms {:<20} {}",
            m.received_at_ms - received[0].received_at_ms,
            m.template.as_deref().unwrap_or("-"),
            m.rendered
        );
    }
    let (requests, informational): (Vec<_>, Vec<_>) =
        received.iter().partition(|m| !m.buttons.is_empty());
    // Information: the first at once, then one digest when the window ends: at most one
    // informational message per window over the ten seconds of alerts.
    assert!(
        informational.len() <= 2,
        "{} informational messages",
        informational.len()
    );
    assert!(informational
        .iter()
        .any(|m| m.template.as_deref() == Some("alert_digest")));
    // Every update is in exactly one message.
    for (i, kind) in kinds.iter().enumerate() {
        if *kind != "tg.shipment.exception" {
            let carrying = informational
                .iter()
                .filter(|m| m.rendered.contains(&shipment(i)))
                .count();
            assert_eq!(carrying, 1, "{} in {carrying} messages", shipment(i));
        }
    }
    // Requests are never merged: each exception is its own message with its buttons.
    assert_eq!(requests.len(), 3);
    assert!(requests
        .iter()
        .all(|m| m.template.as_deref() == Some("shipment_exception")));
    assert!(received.len() <= 5, "{} messages", received.len());
    let stats = p.sandbox.stats();
    assert!(!stats.errors.contains_key("131056"), "{stats:?}");
    // And each request can still be answered.
    let mut taps = Vec::new();
    for request in &requests {
        taps.push(
            p.sandbox
                .reply(&request.wamid, Reply::Button { index: 0 })
                .await
                .expect("tap delivered"),
        );
    }
    p.wait_until("an answer to every exception", WAIT, |p| {
        let responses = p.responses();
        taps.iter().all(|tap| {
            responses.iter().any(|r| {
                &r.wa_message_id == tap
                    && matches!(&r.body, ResponseBody::CorrectionAnswer { answer, .. } if answer == "NEW_ETA")
            })
        })
    })
    .await;
    let merged = gridtalk_telemetry::Metrics::global()
        .coalesced
        .with_label_values(&["merged"])
        .get();
    assert!(merged >= 2, "{merged}");
    assert!(p.dead_letters().is_empty());
}

/// The figures a summary should carry, computed here from the published events (and the one
/// accepted order) by the rules of `crates/gridtalk-summary`, independently of gridtalk.
#[derive(Debug, Default, Clone, PartialEq)]
struct Figures {
    completed: std::collections::BTreeSet<String>,
    failed: std::collections::BTreeSet<String>,
    invoices: std::collections::BTreeSet<String>,
    exceptions: std::collections::BTreeSet<String>,
    approvals: std::collections::BTreeSet<String>,
    overdue: std::collections::BTreeSet<String>,
}

impl Figures {
    fn apply(&mut self, event: &serde_json::Value) {
        let kind = event["event_type"].as_str().unwrap();
        let payload = event["payload"]
            .as_object()
            .unwrap()
            .values()
            .next()
            .unwrap();
        let field = |name: &str| payload[name].as_str().unwrap_or_default().to_string();
        match kind {
            "tg.po.acknowledged" => {
                self.completed.insert(field("po_number"));
                self.overdue.remove(&field("po_number"));
            }
            "tg.po.ack_overdue" => {
                self.overdue.insert(field("po_number"));
                if payload["escalation_level"].as_i64().unwrap_or(0) >= 1 {
                    self.failed.insert(field("po_number"));
                }
            }
            "tg.invoice.delivered" => {
                self.invoices.insert(field("invoice_number"));
            }
            "tg.invoice.acknowledged" | "tg.invoice.rejected" => {
                self.invoices.remove(&field("invoice_number"));
            }
            "tg.shipment.exception" => {
                self.exceptions.insert(field("shipment_id"));
            }
            "tg.delivery.confirmed" => {
                self.exceptions.remove(&field("shipment_id"));
            }
            "wf.approval.requested" => {
                self.approvals.insert(field("approval_id"));
            }
            _ => {}
        }
    }

    /// The template's figures, in its parameter order.
    fn parameters(&self) -> Vec<String> {
        [
            &self.completed,
            &self.invoices,
            &self.failed,
            &self.exceptions,
            &self.approvals,
            &self.overdue,
        ]
        .iter()
        .map(|set| set.len().to_string())
        .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_day_of_traffic_is_summed_up_for_each_audience_at_its_local_hour_and_in_the_group() {
    use chrono::TimeZone;
    // The pipeline's clock runs 120 times faster from 08:40 in Tokyo; operations get the day's
    // summary at 09:30 Tokyo (in their group too), ACME's order desk theirs at 01:35 Berlin
    // (09:35 Tokyo), and an alert when two of ACME's shipments are in exception within an hour.
    let tokyo = chrono_tz::Asia::Tokyo;
    let berlin = chrono_tz::Europe::Berlin;
    let today = chrono::Utc::now().with_timezone(&tokyo).date_naive();
    let start = tokyo
        .from_local_datetime(&today.and_hms_opt(8, 40, 0).unwrap())
        .unwrap()
        .timestamp_millis();
    let anchor = now_ms();
    let time = gridtalk_clock::TimeSource::scaled(120.0, anchor, start);
    let mut setup = Setup {
        ingest: true,
        in_process: false,
        ..Setup::default()
    };
    setup.overrides.push(("CLOCK__SPEED", "120".into()));
    setup
        .overrides
        .push(("CLOCK__ANCHOR_MS", anchor.to_string()));
    setup.overrides.push(("CLOCK__START_MS", start.to_string()));
    setup.overrides.push((
        "SUMMARIES",
        // One line: an inline TOML table cannot span lines.
        concat!(
            r#"[{name = "ops", audience = {internal_roles = ["operations"]}, daily_at = "09:30", time_zone = "Asia/Tokyo", template = "computed_summary"}, "#,
            r#"{name = "acme-desk", per_partner = true, audience = {partner_roles = ["order_desk"]}, daily_at = "01:35", time_zone = "Europe/Berlin", template = "computed_summary", "#,
            r#"thresholds = [{measure = "open_exceptions", at_least = 2, within_minutes = 60}]}]"#
        )
        .into(),
    ));
    let mut p = Pipeline::start(setup).await;
    // The operations group, made and joined earlier.
    let group = p
        .sandbox
        .create_group(&p.config.send.phone_number_id, "Operations room")
        .expect("group");
    p.sandbox
        .join_group(&group.id, "14155550106")
        .await
        .expect("joins");
    let directory = p.dir.join("directory.toml");
    let mut text = std::fs::read_to_string(&directory).expect("directory");
    text.push_str(&format!(
        "[[contacts]]\nid = \"ops-room\"\nname = \"Operations room\"\nwhatsapp_group_id = \"{}\"\nopted_in = true\nroles = [\"operations\"]\n",
        group.id
    ));
    std::fs::write(&directory, text).expect("directory");
    p.start_stages();
    p.wait_for_way_back(WAIT).await;

    let mut escalated = event("tg.po.ack_overdue", 6, "ACME");
    escalated["payload"]["PurchaseOrderAckOverdue"]["escalation_level"] = serde_json::json!(1);
    let day = vec![
        event("tg.po.acknowledged", 1, "ACME"),
        event("tg.po.acknowledged", 2, "ACME"),
        event("tg.po.acknowledged", 3, "GLOBEX"),
        event("tg.po.acknowledged", 1, "ACME"), // the same order again: counted once
        event("tg.po.ack_overdue", 5, "ACME"),
        escalated,
        event("tg.invoice.delivered", 7, "ACME"),
        event("tg.invoice.delivered", 8, "ACME"),
        event("tg.invoice.acknowledged", 7, "ACME"),
        event("tg.invoice.delivered", 9, "GLOBEX"),
        event("tg.shipment.exception", 10, "ACME"),
        event("tg.shipment.exception", 11, "ACME"),
        event("tg.shipment.exception", 15, "ACME"),
        event("tg.delivery.confirmed", 11, "ACME"),
        event("tg.shipment.exception", 12, "GLOBEX"),
        event("wf.approval.requested", 13, "ACME"),
    ];
    let (mut all, mut acme) = (Figures::default(), Figures::default());
    for (i, e) in day.iter().enumerate() {
        // A repeated event needs its own id to be routed (the dedupe drops the same id).
        let mut e = e.clone();
        e["event_id"] = serde_json::json!(format!("day-{i}-{}", e["event_id"].as_str().unwrap()));
        p.publish_event(&e).await;
        all.apply(&e);
        if e["partner"]["partner_id"] == "ACME" {
            acme.apply(&e);
        }
    }
    // And one order accepted on WhatsApp.
    p.publish_event(&event("tg.po.received", 4, "ACME")).await;
    let request = message_to(&p, WAIT, "15550100001", "po_ack_request").await;
    let tap = p
        .sandbox
        .reply(&request.wamid, Reply::Button { index: 0 })
        .await
        .expect("tap");
    p.wait_until("the order accepted", WAIT, |p| {
        p.responses().iter().any(|r| r.wa_message_id == tap)
    })
    .await;
    for figures in [&mut all, &mut acme] {
        figures.completed.insert("PO-4500004".into());
    }
    assert!(
        time.now_ms() < start + 50 * 60_000,
        "the traffic took past 09:30 Tokyo"
    );

    let summary_to = |p: &Pipeline, to: &str, kind: &str| {
        p.sandbox.messages().into_iter().find(|m| {
            m.to == to
                && m.template.as_deref() == Some("computed_summary")
                && m.parameters[0].starts_with(kind)
        })
    };
    // The alert came once two of ACME's exceptions were open (the events of one day cross
    // input partitions, so which two is the broker's choice).
    p.wait_until("the exceptions alert", WAIT, |p| {
        summary_to(p, "15550100001", "Alert").is_some()
    })
    .await;
    let alert = summary_to(&p, "15550100001", "Alert").unwrap();
    assert_eq!(alert.parameters[0], "Alert (open exceptions)");
    assert_eq!(alert.parameters[1], "ACME Industrial Supply");
    let open: u32 = alert.parameters[5].parse().unwrap();
    assert!(open >= 2, "{:?}", alert.parameters);

    // Operations: 09:30 Tokyo, to Tom and to the group, about everything.
    p.wait_until("the operations summary", WAIT, |p| {
        summary_to(p, "14155550106", "Daily").is_some()
    })
    .await;
    let arrived = time.now_ms();
    let local = chrono::Utc
        .timestamp_millis_opt(arrived)
        .unwrap()
        .with_timezone(&tokyo);
    println!("operations summary at {local}");
    assert!(
        arrived >= start + 50 * 60_000,
        "before 09:30 Tokyo: {local}"
    );
    assert!(
        arrived < start + 80 * 60_000,
        "not in the 09:00 hour in Tokyo: {local}"
    );
    let tom = summary_to(&p, "14155550106", "Daily").unwrap();
    assert_eq!(tom.parameters[1], "all partners");
    assert_eq!(
        tom.parameters[2..],
        all.parameters()[..],
        "{:?} vs {all:?}",
        tom.parameters
    );
    p.wait_until("the summary in the group", WAIT, |p| {
        summary_to(p, &group.id, "Daily").is_some()
    })
    .await;
    assert_eq!(
        summary_to(&p, &group.id, "Daily").unwrap().parameters,
        tom.parameters
    );

    // ACME's order desk: 01:35 Berlin, about ACME only.
    p.wait_until("ACME's summary", WAIT, |p| {
        summary_to(p, "15550100001", "Daily").is_some()
    })
    .await;
    let arrived = time.now_ms();
    let local = chrono::Utc
        .timestamp_millis_opt(arrived)
        .unwrap()
        .with_timezone(&berlin);
    println!("ACME summary at {local} Berlin");
    assert!(
        arrived >= start + 55 * 60_000,
        "before 01:35 Berlin: {local}"
    );
    let desk = summary_to(&p, "15550100001", "Daily").unwrap();
    assert_eq!(desk.parameters[1], "ACME Industrial Supply");
    assert_eq!(
        desk.parameters[2..],
        acme.parameters()[..],
        "{:?} vs {acme:?}",
        desk.parameters
    );

    // The upstream summary event still goes out as before.
    p.publish_event(&event("ops.summary.published", 14, "ACME"))
        .await;
    message_to(&p, WAIT, "14155550106", "daily_summary").await;
    assert!(p.dead_letters().is_empty(), "{:?}", p.dead_letters());
}
