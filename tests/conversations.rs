//! The way back, end to end on the real broker: an event goes out as a message to the sandbox, the
//! person answers on the sandbox (a signed webhook, as Meta sends it), and the converse stage
//! publishes the typed, correlated record on the response topic, or refuses it with an audit
//! record. Flows a (PO acknowledgement), d (onboarding), f (approvals) and g (partner cases).

mod support;

use std::time::Duration;

use gridtalk_contract::{ResponseBody, WorkflowResponse};
use gridtalk_sandbox::{ReceivedMessage, Reply};
use serde_json::{json, Value};
use support::*;

/// Generous: eight tests share two cores and one embedded broker, one of them with two extra
/// `gridtalk` processes and one with Chromium.
const WAIT: Duration = Duration::from_secs(120);

async fn way_back(setup: Setup) -> Pipeline {
    let pipeline = Pipeline::start(Setup {
        ingest: true,
        ..setup
    })
    .await;
    pipeline.wait_for_way_back(WAIT).await;
    pipeline
}

/// Waits for the response record answering inbound message `wamid`.
async fn response_to(p: &Pipeline, wamid: &str) -> WorkflowResponse {
    p.wait_until(&format!("the response to {wamid}"), WAIT, |p| {
        p.responses().iter().any(|r| r.wa_message_id == wamid)
    })
    .await;
    let answers: Vec<WorkflowResponse> = p
        .responses()
        .into_iter()
        .filter(|r| r.wa_message_id == wamid)
        .collect();
    assert_eq!(answers.len(), 1, "one response per inbound message");
    answers.into_iter().next().expect("one")
}

/// Waits for the audit record of `reason` about inbound message `wamid`.
async fn audit_of(p: &Pipeline, wamid: &str, reason: &str) -> gridtalk_contract::AuditRecord {
    p.wait_until(&format!("the {reason} audit of {wamid}"), WAIT, |p| {
        p.audits()
            .iter()
            .any(|a| a.wa_message_id.as_deref() == Some(wamid) && a.reason == reason)
    })
    .await;
    p.audits()
        .into_iter()
        .find(|a| a.wa_message_id.as_deref() == Some(wamid) && a.reason == reason)
        .expect("just seen")
}

fn refusals(stage: &str, reason: &str) -> u64 {
    gridtalk_telemetry::Metrics::global()
        .refusals
        .with_label_values(&[stage, reason])
        .get()
}

fn decisions(p: &Pipeline) -> Vec<WorkflowResponse> {
    p.responses()
        .into_iter()
        .filter(|r| r.response_type != "wa.message.status")
        .collect()
}

/// Waits until the sandbox received a free-form text to `to` containing `words`.
async fn text_to(p: &Pipeline, to: &str, words: &str) -> ReceivedMessage {
    p.wait_until(&format!("a text to {to} saying {words:?}"), WAIT, |p| {
        p.sandbox
            .messages()
            .iter()
            .any(|m| m.to == to && m.template.is_none() && m.rendered.contains(words))
    })
    .await;
    p.sandbox
        .messages()
        .into_iter()
        .find(|m| m.to == to && m.template.is_none() && m.rendered.contains(words))
        .expect("just seen")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flow_a_the_partners_order_desk_accepts_a_purchase_order() {
    let p = way_back(Setup::default()).await;
    let po = event("tg.po.received", 21, "ACME");
    p.publish_event(&po).await;
    let request = message_to(&p, WAIT, "15550100001", "po_ack_request").await;
    assert_eq!(request.buttons, ["Accept", "Accept with changes", "Reject"]);

    let tap = p
        .sandbox
        .reply(&request.wamid, Reply::Button { index: 0 })
        .await
        .expect("tap delivered");
    let answer = response_to(&p, &tap).await;
    assert_eq!(answer.response_type, "wa.po.ack_decision");
    assert_eq!(
        answer.correlation_id,
        po["correlation_id"].as_str().unwrap()
    );
    assert_eq!(
        answer.in_reply_to_event_id.as_deref(),
        po["event_id"].as_str()
    );
    assert_eq!(answer.request_id.as_deref(), Some("PO-4500021"));
    assert_eq!(answer.contact_id.as_deref(), Some("acme-order-desk"));
    assert_eq!(answer.partner_id.as_deref(), Some("ACME"));
    assert_eq!(
        answer.wa_context_message_id.as_deref(),
        Some(request.wamid.as_str())
    );
    assert_eq!(
        answer.body,
        ResponseBody::PoAckDecision {
            po_number: "PO-4500021".into(),
            decision: "ACCEPT".into(),
            comment: None
        }
    );
    // Confirmed back on WhatsApp as free-form text: the tap opened the service window.
    let confirmation = text_to(&p, "15550100001", "is recorded").await;
    assert!(confirmation.rendered.contains("PO-4500021"));
    // The tap was marked read, with the typing indicator, before the confirmation went.
    let tapped = p
        .sandbox
        .inbound()
        .into_iter()
        .find(|m| m.wamid == tap)
        .expect("the tap at the sandbox");
    assert!(tapped.typing_shown, "{tapped:?}");
    let read_at = tapped.read_at_ms.expect("marked read");
    assert!(
        read_at <= confirmation.received_at_ms,
        "read at {read_at}, confirmed at {}",
        confirmation.received_at_ms
    );
    assert_eq!(p.sandbox.stats().read_marks, 1);

    // The request's delivery statuses are on the response topic too, correlated.
    p.wait_until("the request's read status", WAIT, |p| {
        p.responses().iter().any(|r| {
            r.wa_message_id == request.wamid
                && r.body
                    == ResponseBody::DeliveryStatus {
                        status: "READ".into(),
                        error_code: None,
                        error_title: None,
                    }
        })
    })
    .await;
    let statuses: Vec<WorkflowResponse> = p
        .responses()
        .into_iter()
        .filter(|r| r.wa_message_id == request.wamid)
        .collect();
    assert!(statuses.iter().all(
        |r| r.correlation_id == po["correlation_id"].as_str().unwrap()
            && r.response_type == "wa.message.status"
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flow_d_the_partner_acknowledges_an_onboarding_reminder_and_reports_a_submission() {
    let p = way_back(Setup::default()).await;
    let reminder = event("tg.onboarding.reminder", 4, "ACME");
    p.publish_event(&reminder).await;
    let request = message_to(&p, WAIT, "15550100004", "onboarding_reminder").await;
    assert_eq!(request.buttons, ["Will submit", "Need help"]);

    let tap = p
        .sandbox
        .reply(&request.wamid, Reply::Button { index: 0 })
        .await
        .expect("tap delivered");
    let answer = response_to(&p, &tap).await;
    assert_eq!(answer.response_type, "wa.onboarding.acknowledged");
    assert_eq!(
        answer.correlation_id,
        reminder["correlation_id"].as_str().unwrap()
    );
    assert_eq!(
        answer.body,
        ResponseBody::OnboardingAcknowledgement {
            onboarding_id: "ONB-304".into(),
            action: "WILL_SUBMIT".into(),
            item_code: None,
            comment: None
        }
    );

    // A text quoting the reminder is attached to the same onboarding.
    let text = p
        .sandbox
        .reply(
            &request.wamid,
            Reply::Text {
                body: "W-9 uploaded to the portal".into(),
            },
        )
        .await
        .expect("text delivered");
    let comment = response_to(&p, &text).await;
    assert_eq!(comment.request_id.as_deref(), Some("ONB-304"));
    assert_eq!(
        comment.body,
        ResponseBody::OnboardingAcknowledgement {
            onboarding_id: "ONB-304".into(),
            action: "ACKNOWLEDGED".into(),
            item_code: None,
            comment: Some("W-9 uploaded to the portal".into())
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flow_f_the_designated_approver_decides_once_and_a_second_tap_is_politely_refused() {
    let p = way_back(Setup::default()).await;
    let approval = event("wf.approval.requested", 15, "ACME");
    p.publish_event(&approval).await;
    let request = message_to(&p, WAIT, "14155550101", "approval_request").await;
    assert_eq!(request.buttons, ["Approve", "Reject", "Need info"]);

    let approve = p
        .sandbox
        .reply(&request.wamid, Reply::Button { index: 0 })
        .await
        .expect("tap delivered");
    let decision = response_to(&p, &approve).await;
    assert_eq!(decision.response_type, "wa.approval.decided");
    assert_eq!(
        decision.correlation_id,
        approval["correlation_id"].as_str().unwrap()
    );
    assert_eq!(decision.contact_id.as_deref(), Some("buyer-maria"));
    assert_eq!(
        decision.body,
        ResponseBody::ApprovalDecision {
            approval_id: "APR-8015".into(),
            decision: "APPROVE".into(),
            comment: None
        }
    );
    text_to(&p, "14155550101", "\"Approve\" on APR-8015 is recorded").await;

    // Maria changes her mind and taps Reject: the first decision stands.
    let before = refusals("converse", "already_decided");
    let reject = p
        .sandbox
        .reply(&request.wamid, Reply::Button { index: 1 })
        .await
        .expect("tap delivered");
    let audit = audit_of(&p, &reject, "already_decided").await;
    assert_eq!(audit.request_id.as_deref(), Some("APR-8015"));
    assert_eq!(audit.action.as_deref(), Some("REJECT"));
    assert_eq!(audit.contact_id.as_deref(), Some("buyer-maria"));
    assert!(refusals("converse", "already_decided") > before);
    text_to(&p, "14155550101", "was already answered (Approve)").await;

    // Then she writes, quoting the request: a comment on it, not a second (UNKNOWN) decision.
    let afterthought = p
        .sandbox
        .reply(
            &request.wamid,
            Reply::Text {
                body: "Sorry, I meant to reject it".into(),
            },
        )
        .await
        .expect("text delivered");
    let comment = response_to(&p, &afterthought).await;
    assert_eq!(comment.response_type, "wa.request.comment");
    assert_eq!(comment.request_id.as_deref(), Some("APR-8015"));
    assert_eq!(
        comment.correlation_id,
        approval["correlation_id"].as_str().unwrap()
    );
    assert_eq!(
        comment.body,
        ResponseBody::CaseMessage {
            case_id: Some("APR-8015".into()),
            text: "Sorry, I meant to reject it".into()
        }
    );
    let on_the_request: Vec<String> = decisions(&p)
        .into_iter()
        .filter(|r| r.request_id.as_deref() == Some("APR-8015"))
        .map(|r| r.response_type)
        .collect();
    assert_eq!(
        on_the_request,
        ["wa.approval.decided", "wa.request.comment"],
        "exactly one decision on the request, then the comment"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flow_g_partner_messages_update_the_case_or_open_a_new_one() {
    let p = way_back(Setup::default()).await;
    let case = event("wf.case.opened", 7, "ACME");
    p.publish_event(&case).await;
    let update = message_to(&p, WAIT, "15550100005", "case_update").await;

    // Quoting the case message.
    let quoted = p
        .sandbox
        .reply(
            &update.wamid,
            Reply::Text {
                body: "24 cartons found at the cross-dock, shipping today".into(),
            },
        )
        .await
        .expect("text delivered");
    let message = response_to(&p, &quoted).await;
    assert_eq!(message.response_type, "wa.case.message_received");
    assert_eq!(
        message.correlation_id,
        case["correlation_id"].as_str().unwrap()
    );
    assert_eq!(message.contact_id.as_deref(), Some("acme-support"));
    assert_eq!(
        message.body,
        ResponseBody::CaseMessage {
            case_id: Some("CASE-1207".into()),
            text: "24 cartons found at the cross-dock, shipping today".into()
        }
    );

    // Without quoting: the contact's single open case takes it.
    let unquoted = write(&p, "15550100005", "Tracking number 1Z999").await;
    let attached = response_to(&p, &unquoted).await;
    assert_eq!(
        attached.body,
        ResponseBody::CaseMessage {
            case_id: Some("CASE-1207".into()),
            text: "Tracking number 1Z999".into()
        }
    );

    // A partner contact with nothing open reports an issue: a new case (no case id yet).
    let fresh = write(&p, "15550100003", "Truck 12 has a flat tyre, 3h delay").await;
    let opened = response_to(&p, &fresh).await;
    assert_eq!(opened.contact_id.as_deref(), Some("acme-dispatch"));
    assert_eq!(opened.partner_id.as_deref(), Some("ACME"));
    assert_eq!(
        opened.body,
        ResponseBody::CaseMessage {
            case_id: None,
            text: "Truck 12 has a flat tyre, 3h delay".into()
        }
    );
}

/// `from` writes `text` without quoting anything; returns the inbound wamid.
async fn write(p: &Pipeline, from: &str, text: &str) -> String {
    p.sandbox
        .deliver_inbound(
            PHONE_NUMBER_ID,
            from,
            json!({"type": "text", "text": {"body": text}}),
            text.into(),
        )
        .await
        .expect("text delivered")
}

/// `from` taps a button on `message` whose payload is `payload`, which the converse stage must
/// refuse for `reason`: waits for the audit record and checks the refusal was counted.
async fn refused_tap(
    p: &Pipeline,
    from: &str,
    message: &ReceivedMessage,
    payload: &str,
    reason: &str,
) -> gridtalk_contract::AuditRecord {
    let before = refusals("converse", reason);
    let wamid = p
        .sandbox
        .deliver_inbound(
            PHONE_NUMBER_ID,
            from,
            tap_with(message, payload, "Approve"),
            "Approve".into(),
        )
        .await
        .expect("delivered");
    let audit = audit_of(p, &wamid, reason).await;
    assert!(refusals("converse", reason) > before, "{reason} counted");
    audit
}

/// A button tap from `from` on `message`, with `payload` instead of the one gridtalk signed.
fn tap_with(message: &ReceivedMessage, payload: &str, title: &str) -> Value {
    json!({"type": "button", "context": {"from": "15550783881", "id": message.wamid},
           "button": {"payload": payload, "text": title}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_inbounds_make_no_decision_and_each_leaves_an_audit_record_and_a_count() {
    let p = way_back(Setup::default()).await;
    p.publish_event(&event("wf.approval.requested", 31, "ACME"))
        .await;
    let request = message_to(&p, WAIT, "14155550101", "approval_request").await;
    let approve_token = request.request["template"]["components"][1]["parameters"][0]["payload"]
        .as_str()
        .expect("the Approve payload")
        .to_string();
    assert!(approve_token.starts_with("gt1.APPROVE.APR-8031."));

    // 1. A webhook with a bad signature: 401, nothing published, an audit record.
    let before = refusals("ingest", "bad_signature");
    assert_eq!(p.post_badly_signed_webhook().await, 401);
    p.wait_until("the bad-signature audit record", WAIT, |p| {
        p.audits()
            .iter()
            .any(|a| a.reason == "bad_signature" && a.stage == "ingest")
    })
    .await;
    assert!(refusals("ingest", "bad_signature") > before);

    // 2. A tampered token: the action changed after signing.
    let maria = "14155550101";
    refused_tap(
        &p,
        maria,
        &request,
        &approve_token.replace("APPROVE", "REJECT"),
        "token_forged",
    )
    .await;

    // 3. An expired token, correctly signed.
    let expired_token = gridtalk_whatsapp::buttons::sign(
        BUTTON_SECRET.as_bytes(),
        "APPROVE",
        "APR-8031",
        chrono::Utc::now().timestamp() - 60,
    )
    .unwrap();
    refused_tap(&p, maria, &request, &expired_token, "token_expired").await;

    // 4. The genuine token, tapped on another phone (Sam from accounts payable is not the
    //    designated approver).
    let audit = refused_tap(
        &p,
        "14155550102",
        &request,
        &approve_token,
        "unauthorised_contact",
    )
    .await;
    assert_eq!(audit.contact_id.as_deref(), Some("ap-sam"));
    assert_eq!(audit.request_id.as_deref(), Some("APR-8031"));

    assert!(
        decisions(&p).is_empty(),
        "no refused inbound became a decision: {:?}",
        decisions(&p)
    );

    // 5. Maria decides (Reject), then a second decision (Approve) is refused.
    let reject = p
        .sandbox
        .reply(&request.wamid, Reply::Button { index: 1 })
        .await
        .expect("delivered");
    let decision = response_to(&p, &reject).await;
    assert!(
        matches!(decision.body, ResponseBody::ApprovalDecision { ref decision, .. } if decision == "REJECT")
    );
    let before = refusals("converse", "already_decided");
    let second = p
        .sandbox
        .reply(&request.wamid, Reply::Button { index: 0 })
        .await
        .expect("delivered");
    audit_of(&p, &second, "already_decided").await;
    assert!(refusals("converse", "already_decided") > before);
    assert_eq!(decisions(&p).len(), 1, "only the first decision counts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_delivered_three_times_yields_one_record_and_statuses_end_in_the_right_state() {
    let mut setup = Setup::default();
    // The test plays Meta's status webhooks itself, in the wrong order.
    setup.sandbox.auto_statuses = false;
    let p = way_back(setup).await;
    let invoice = event("tg.invoice.delivered", 9, "ACME");
    p.publish_event(&invoice).await;
    let notice = message_to(&p, WAIT, "14155550102", "invoice_status").await;

    // The same text webhook, delivered three times (Meta retries until it gets a 200).
    let text = json!({
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550783881", "phone_number_id": PHONE_NUMBER_ID},
        "contacts": [{"profile": {"name": "Sam Ortiz"}, "wa_id": "14155550102"}],
        "messages": [{"from": "14155550102", "id": "wamid.REDELIVERED1", "timestamp": "1795514400",
                      "type": "text", "context": {"from": "15550783881", "id": notice.wamid},
                      "text": {"body": "Paid on Friday"}}]
    });
    for _ in 0..3 {
        assert_eq!(p.post_webhook(&text).await, 200);
    }
    let status = |state: &str, at: u64| {
        json!({
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "15550783881", "phone_number_id": PHONE_NUMBER_ID},
            "statuses": [{"id": notice.wamid, "status": state, "timestamp": (1_795_514_400 + at).to_string(),
                          "recipient_id": "14155550102"}]
        })
    };
    // Read arrives first, then delivered and sent late.
    for (state, at) in [("read", 3), ("delivered", 2), ("sent", 1)] {
        assert_eq!(p.post_webhook(&status(state, at)).await, 200);
    }
    // Everything posted is handled once the converse group has committed the webhook topic.
    p.wait_for_commits(
        &format!("{}-converse", p.namespace),
        &p.config.topics.webhook,
        WAIT,
    )
    .await;

    let responses = p.responses();
    let replies: Vec<&WorkflowResponse> = responses
        .iter()
        .filter(|r| r.wa_message_id == "wamid.REDELIVERED1")
        .collect();
    assert_eq!(replies.len(), 1, "one record for three deliveries");
    assert_eq!(
        replies[0].correlation_id,
        invoice["correlation_id"].as_str().unwrap()
    );
    let statuses: Vec<&ResponseBody> = responses
        .iter()
        .filter(|r| r.wa_message_id == notice.wamid)
        .map(|r| &r.body)
        .collect();
    assert_eq!(
        statuses,
        [&ResponseBody::DeliveryStatus {
            status: "READ".into(),
            error_code: None,
            error_title: None
        }],
        "read is final: the late delivered and sent change nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_taps_approve_on_the_sandbox_page_in_headless_chromium() {
    let p = way_back(Setup::default()).await;
    let approval = event("wf.approval.requested", 44, "ACME");
    p.publish_event(&approval).await;
    message_to(&p, WAIT, "14155550101", "approval_request").await;

    let browser = browser::Browser::launch(&format!("{}/", p.sandbox.base_url()));
    let mut page = browser.page().await;
    let maria = r#"document.querySelector('[data-phone="14155550101"]')"#;
    page.wait_for(
        "Maria's phone with the approval request and its buttons",
        WAIT,
        &format!(
            r#"(() => {{ const phone = {maria}; return !!phone && phone.innerText.includes("Approval APR-8044 needed: PO-4500044 change 1")
                && !!phone.querySelector('button.reply[data-title="Approve"]'); }})()"#
        ),
    )
    .await;
    // The phone is labelled with the directory's name for its holder and their company; the chat
    // shows the business that writes to them.
    let label = page
        .evaluate(&format!(r#"(() => {maria}.innerText)()"#))
        .await;
    let label = label.as_str().expect("text");
    for shown in [
        "Maria Keller",
        "+14155550101 · Northwind Retail",
        "Northwind Retail",
    ] {
        assert!(label.contains(shown), "{shown:?} not on the phone: {label}");
    }
    // The person taps Approve.
    let tapped = page
        .evaluate(&format!(
            r#"(() => {{ {maria}.querySelector('button.reply[data-title="Approve"]').click(); return true; }})()"#
        ))
        .await;
    assert_eq!(tapped, Value::Bool(true));

    p.wait_until("the decision taken in the browser", WAIT, |p| {
        !decisions(p).is_empty()
    })
    .await;
    let decision = decisions(&p).remove(0);
    assert_eq!(
        decision.correlation_id,
        approval["correlation_id"].as_str().unwrap()
    );
    assert_eq!(decision.contact_id.as_deref(), Some("buyer-maria"));
    assert_eq!(
        decision.body,
        ResponseBody::ApprovalDecision {
            approval_id: "APR-8044".into(),
            decision: "APPROVE".into(),
            comment: None
        }
    );
    // The page shows the tap as Maria's message and gridtalk's confirmation after it.
    page.wait_for(
        "the tap and the confirmation on Maria's phone",
        WAIT,
        &format!(
            r#"(() => {{ const t = {maria}.innerText; return t.includes("Approve") && t.includes("is recorded"); }})()"#
        ),
    )
    .await;
}

/// Whether the log of process `name` shows it was assigned a partition of `topic`.
fn holds_partition_of(p: &Pipeline, name: &str, topic: &str) -> bool {
    p.process_log(name)
        .lines()
        .any(|line| line.contains("partitions assigned") && line.contains(topic))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_approvers_served_by_two_converse_processes_get_one_decision_per_request() {
    // Maria's and Jo's messages land on different webhook (and sent-log) partitions, and two
    // converse processes share the two partitions: each approver is served by another process.
    let mut setup = Setup {
        ingest: true,
        only_stages: Some(vec![
            gridtalk::Stage::Route,
            gridtalk::Stage::Send,
            gridtalk::Stage::Ingest,
        ]),
        // Twenty requests and twenty confirmations per person: Meta's pair limit, scaled down.
        overrides: vec![("SEND__PAIR_INTERVAL_MS", "100".into())],
        ..Setup::default()
    };
    setup.sandbox.pair_interval_ms = 100;
    let p = Pipeline::start(setup).await;
    p.wait_for_way_back(WAIT).await;
    let mut processes = [
        p.spawn_gridtalk("converse-a", "converse"),
        p.spawn_gridtalk("converse-b", "converse"),
    ];
    let (webhook, decisions) = (
        p.config.topics.webhook.clone(),
        p.config.topics.decisions.clone(),
    );
    p.wait_until(
        "both processes hold webhook and decision partitions",
        WAIT,
        |p| {
            ["converse-a", "converse-b"].iter().all(|name| {
                holds_partition_of(p, name, &webhook) && holds_partition_of(p, name, &decisions)
            })
        },
    )
    .await;

    const REQUESTS: u64 = 20;
    let (maria, jo) = ("14155550101", "14155550104");
    for seq in 0..REQUESTS {
        let mut approval = event("wf.approval.requested", 300 + seq, "ACME");
        approval["payload"]["ApprovalRequested"]["approver_contact_ids"] =
            json!(["buyer-maria", "warehouse-jo"]);
        p.publish_event(&approval).await;
    }
    p.wait_for_messages(2 * REQUESTS as usize, WAIT).await;
    let partition_of = |wa_id: &str| {
        read_topic(&p.config.topics.sent)
            .iter()
            .find(|m| {
                use rdkafka::message::Message;
                m.key() == Some(wa_id.as_bytes())
            })
            .map(|m| {
                use rdkafka::message::Message;
                m.partition()
            })
    };
    p.wait_until("both approvers on the sent log", WAIT, |_| {
        partition_of(maria).is_some() && partition_of(jo).is_some()
    })
    .await;
    assert_ne!(
        partition_of(maria),
        partition_of(jo),
        "the approvers are on different partitions"
    );

    // Both tap on every request at once: Maria approves, Jo rejects.
    let messages = p.sandbox.messages();
    let mut taps: Vec<(String, String, String)> = Vec::new(); // (request, maria's tap, jo's tap)
    for seq in 0..REQUESTS {
        let request = format!("APR-{}", 8_300 + seq);
        // The approval's message names the purchase order it changes.
        let subject = format!("PO-{} change", 4_500_300 + seq);
        let to = |wa_id: &str| {
            messages
                .iter()
                .find(|m| m.to == wa_id && m.rendered.contains(&subject))
                .unwrap_or_else(|| panic!("no message about {subject} to {wa_id}"))
                .wamid
                .clone()
        };
        let (for_maria, for_jo) = (to(maria), to(jo));
        let approve = p.sandbox.reply(&for_maria, Reply::Button { index: 0 });
        let reject = p.sandbox.reply(&for_jo, Reply::Button { index: 1 });
        // Started together; who is polled first alternates, so either may be first at Meta.
        let (a, b) = if seq % 2 == 0 {
            tokio::join!(approve, reject)
        } else {
            let (b, a) = tokio::join!(reject, approve);
            (a, b)
        };
        taps.push((
            request,
            a.expect("tap delivered"),
            b.expect("tap delivered"),
        ));
    }

    // Per request: exactly one decision, the other tap audited already_decided, each person
    // told accordingly.
    p.wait_until("every request settled", WAIT, |p| {
        let responses = p.responses();
        let audits = p.audits();
        taps.iter().all(|(_, a, b)| {
            let decided = responses
                .iter()
                .filter(|r| r.wa_message_id == *a || r.wa_message_id == *b)
                .count();
            let refused = audits
                .iter()
                .filter(|x| {
                    x.reason == "already_decided"
                        && (x.wa_message_id.as_deref() == Some(a)
                            || x.wa_message_id.as_deref() == Some(b))
                })
                .count();
            decided == 1 && refused == 1
        })
    })
    .await;
    let responses = p.responses();
    let mut maria_won = 0;
    for (request, a, b) in &taps {
        let decisions: Vec<&WorkflowResponse> = responses
            .iter()
            .filter(|r| {
                r.request_id.as_deref() == Some(request.as_str())
                    && r.response_type == "wa.approval.decided"
            })
            .collect();
        assert_eq!(decisions.len(), 1, "{request}: {decisions:?}");
        let (winner, loser) = if decisions[0].wa_message_id == *a {
            maria_won += 1;
            ((maria, "Approve"), jo)
        } else {
            assert_eq!(decisions[0].wa_message_id, *b);
            ((jo, "Reject"), maria)
        };
        text_to(&p, winner.0, &format!("on {request} is recorded")).await;
        text_to(
            &p,
            loser,
            &format!("{request} was already answered ({})", winner.1),
        )
        .await;
    }
    println!("Maria's tap won {maria_won} of {REQUESTS} races");
    for child in &mut processes {
        assert_eq!(terminate(child).code(), Some(0));
    }
    // Replies, statuses, refusals and confirmations name messages by wamid (shaped like Meta's,
    // holding the number) and people by number: none of it reaches a log line in clear.
    let numbers = [maria, jo].map(String::from).into_iter().collect();
    for name in ["converse-a", "converse-b"] {
        assert_no_number_or_wamid_logged(&p.process_log(name), &numbers);
    }
}
