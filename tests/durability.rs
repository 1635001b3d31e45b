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
