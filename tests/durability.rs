//! Promises under restarts, replays and several processes: the state that suppresses duplicates
//! survives in its changelog, and what a crash replays is not sent again.

mod support;

use std::time::Duration;

use support::*;

const WAIT: Duration = Duration::from_secs(90);

fn replays_suppressed() -> u64 {
    gridtalk_telemetry::Metrics::global()
        .sends
        .with_label_values(&["replay_suppressed", "none"])
        .get()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_replayed_from_the_start_sends_nothing_twice() {
    let mut p = Pipeline::start(Setup::default()).await;
    for (seq, event_type) in [
        (1, "tg.po.received"),
        (2, "tg.invoice.delivered"),
        (3, "wf.approval.requested"),
        (4, "tg.onboarding.reminder"),
        (5, "wf.case.opened"),
        (6, "tg.shipment.exception"),
    ] {
        p.publish_event(&event(event_type, seq, "ACME")).await;
    }
    for input in INPUTS {
        p.wait_for_commits(&p.route_group(), &p.input(input), WAIT)
            .await;
    }
    p.wait_until("every planned message sent", WAIT, |p| {
        let outbox = end_offsets(&p.config.topics.outbox).values().sum::<i64>();
        outbox > 0 && p.sandbox.messages().len() as i64 == outbox
    })
    .await;
    let sent = p.sandbox.messages().len();
    p.wait_for_commits(&p.send_group(), &p.config.topics.outbox, WAIT)
        .await;

    // The crash case at its worst: every outbox offset lost, everything replayed by a new process.
    p.stop_stages().await.expect("stages stop cleanly");
    rewind_group(&p.send_group(), &p.config.topics.outbox);
    let before = replays_suppressed();
    p.start_stages();
    p.wait_for_commits(&p.send_group(), &p.config.topics.outbox, WAIT)
        .await;
    assert_eq!(
        p.sandbox.messages().len(),
        sent,
        "no message sent a second time"
    );
    assert!(
        replays_suppressed() - before >= sent as u64,
        "every replayed record was recognised in the sent index"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_republished_after_a_restart_inside_the_window_sends_nothing() {
    let mut p = Pipeline::start(Setup::default()).await;
    let po = event("tg.po.received", 3, "ACME");
    p.publish_event(&po).await;
    p.wait_for_messages(1, WAIT).await;
    p.wait_for_commits(&p.route_group(), &p.input("tg.documents.v1"), WAIT)
        .await;

    // A new process: the dedupe window comes back from its changelog.
    p.stop_stages().await.expect("stages stop cleanly");
    p.start_stages();
    p.publish_event(&po).await;
    // A later event about another document proves the route stage went past the duplicate.
    p.publish_event(&event("tg.po.received", 4, "ACME")).await;
    p.wait_for_commits(&p.route_group(), &p.input("tg.documents.v1"), WAIT)
        .await;
    p.wait_for_messages(2, WAIT).await;
    p.wait_for_commits(&p.send_group(), &p.config.topics.outbox, WAIT)
        .await;
    let documents: Vec<String> = received(&p).into_iter().map(|m| m.3[0].clone()).collect();
    assert_eq!(
        documents.iter().filter(|d| *d == "PO-4500003").count(),
        1,
        "the republished event was dropped: {documents:?}"
    );
    assert!(documents.contains(&"PO-4500004".to_string()));
    // Dropped by the route stage itself, not only caught by the sender's index: the outbox holds
    // one message per document.
    assert_eq!(
        read_topic(&p.config.topics.outbox).len(),
        2,
        "the republished event never reached the outbox"
    );
}
