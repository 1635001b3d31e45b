//! The way back, first leg: the ingest stage takes Meta's webhooks, verifies them and puts every
//! item durably on the webhook topic, keyed by contact. Runs on the real embedded broker with the
//! sandbox posting signed webhooks as Meta does.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::*;

const WAIT: Duration = Duration::from_secs(60);

fn webhook_items(p: &Pipeline) -> Vec<(String, Value)> {
    read_topic(&p.config.topics.webhook)
        .into_iter()
        .map(|m| {
            use rdkafka::message::Message;
            let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
            (
                key,
                serde_json::from_slice(m.payload().unwrap_or_default()).expect("JSON item"),
            )
        })
        .collect()
}

async fn post(p: &Pipeline, body: &[u8], signature: Option<String>) -> u16 {
    let mut request = reqwest::Client::new()
        .post(&p.webhook_url)
        .header("content-type", "application/json")
        .body(body.to_vec());
    if let Some(signature) = signature {
        request = request.header("X-Hub-Signature-256", signature);
    }
    request
        .send()
        .await
        .expect("webhook endpoint answers")
        .status()
        .as_u16()
}

async fn started(setup: Setup) -> Pipeline {
    let pipeline = Pipeline::start(setup).await;
    pipeline.wait_for_way_back(WAIT).await;
    pipeline
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_webhooks_of_sent_messages_land_on_the_webhook_topic_by_contact() {
    let pipeline = started(Setup {
        ingest: true,
        ..Setup::default()
    })
    .await;
    pipeline
        .publish_event(&event("tg.invoice.delivered", 3, "ACME"))
        .await;
    pipeline.wait_for_messages(1, WAIT).await;
    let wamid = pipeline.sandbox.messages()[0].wamid.clone();
    pipeline
        .wait_until("three statuses on the webhook topic", WAIT, |p| {
            webhook_items(p).len() >= 3
        })
        .await;
    let items = webhook_items(&pipeline);
    let mut ids: Vec<String> = items
        .iter()
        .map(|(_, v)| v["item_id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    assert_eq!(
        ids,
        [
            format!("{wamid}:delivered"),
            format!("{wamid}:read"),
            format!("{wamid}:sent")
        ]
    );
    assert!(items.iter().all(|(key, v)| key == "14155550102"
        && v["kind"] == "status"
        && v["phone_number_id"] == PHONE_NUMBER_ID));
    assert_eq!(pipeline.sandbox.stats().webhooks_failed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_correctly_signed_webhooks_are_published_and_batches_are_split() {
    let pipeline = started(Setup {
        ingest: true,
        ..Setup::default()
    })
    .await;
    let body = json!({
        "object": "whatsapp_business_account",
        "entry": [
            {"id": "WABA", "changes": [{"field": "messages", "value": {
                "messaging_product": "whatsapp",
                "metadata": {"display_phone_number": "15550783881", "phone_number_id": PHONE_NUMBER_ID},
                "contacts": [{"profile": {"name": "Maria Keller"}, "wa_id": "14155550101"}],
                "messages": [{"from": "14155550101", "id": "wamid.IN1", "timestamp": "1795514400", "type": "text", "text": {"body": "Looks good"}}]
            }}]},
            {"id": "WABA", "changes": [{"field": "messages", "value": {
                "messaging_product": "whatsapp",
                "metadata": {"display_phone_number": "15550783881", "phone_number_id": PHONE_NUMBER_ID},
                "messages": [{"from": "15550100001", "id": "wamid.IN2", "timestamp": "1795514401", "type": "button",
                              "button": {"payload": "ACCEPT", "text": "Accept"}, "context": {"id": "wamid.OUT9"}}],
                "statuses": [{"id": "wamid.OUT9", "status": "read", "timestamp": "1795514402", "recipient_id": "15550100001"}]
            }}]}
        ]
    })
    .to_string();
    let good = gridtalk_sandbox::signature(APP_SECRET, body.as_bytes());
    let forged = gridtalk_sandbox::signature("not-the-app-secret", body.as_bytes());
    let mut tampered = body.clone().into_bytes();
    let at = tampered
        .iter()
        .position(|b| *b == b'L')
        .expect("a letter to change");
    tampered[at] = b'l';

    assert_eq!(
        post(&pipeline, body.as_bytes(), None).await,
        401,
        "no signature"
    );
    assert_eq!(
        post(&pipeline, body.as_bytes(), Some(forged)).await,
        401,
        "signed with another secret"
    );
    assert_eq!(
        post(&pipeline, &tampered, Some(good.clone())).await,
        401,
        "body changed after signing"
    );
    assert_eq!(
        post(&pipeline, body.as_bytes(), Some("sha256=zz".into())).await,
        401,
        "garbage signature"
    );
    assert_eq!(
        post(&pipeline, &vec![b' '; 70_000], Some(good.clone())).await,
        413,
        "over the body limit"
    );
    assert!(
        webhook_items(&pipeline).is_empty(),
        "nothing published for refused webhooks"
    );

    assert_eq!(post(&pipeline, body.as_bytes(), Some(good)).await, 200);
    let items = webhook_items(&pipeline);
    let mut summary: Vec<(String, String, String)> = items
        .iter()
        .map(|(key, v)| {
            (
                key.clone(),
                v["kind"].as_str().unwrap().to_string(),
                v["item_id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    summary.sort();
    assert_eq!(
        summary,
        [
            (
                "14155550101".to_string(),
                "message".to_string(),
                "wamid.IN1".to_string()
            ),
            (
                "15550100001".to_string(),
                "message".to_string(),
                "wamid.IN2".to_string()
            ),
            (
                "15550100001".to_string(),
                "status".to_string(),
                "wamid.OUT9:read".to_string()
            ),
        ]
    );
    let maria = items
        .iter()
        .find(|(_, v)| v["item_id"] == "wamid.IN1")
        .unwrap();
    assert_eq!(maria.1["profile_name"], "Maria Keller");
    assert_eq!(maria.1["item"]["text"]["body"], "Looks good");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_one_malformed_message_delivers_the_others() {
    let pipeline = started(Setup {
        ingest: true,
        ..Setup::default()
    })
    .await;
    let body = json!({
        "object": "whatsapp_business_account",
        "entry": [{"id": "WABA", "changes": [{"field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "15550783881", "phone_number_id": PHONE_NUMBER_ID},
            "messages": [
                {"from": "14155550101", "id": "wamid.OK1", "timestamp": "1795514400", "type": "text", "text": {"body": "first"}},
                {"id": "wamid.NOFROM", "timestamp": "1795514401", "type": "text", "text": {"body": "no sender"}},
                {"from": "14155550102", "id": "wamid.OK2", "timestamp": "1795514402", "type": "text", "text": {"body": "second"}}
            ]
        }}]}]
    })
    .to_string();
    let signature = gridtalk_sandbox::signature(APP_SECRET, body.as_bytes());
    assert_eq!(post(&pipeline, body.as_bytes(), Some(signature)).await, 200);
    let items = webhook_items(&pipeline);
    let mut kinds: Vec<(String, String)> = items
        .iter()
        .map(|(_, v)| {
            (
                v["kind"].as_str().unwrap().to_string(),
                v["item_id"].as_str().unwrap().to_string(),
            )
        })
        .filter(|(kind, _)| kind == "message")
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        [
            ("message".to_string(), "wamid.OK1".to_string()),
            ("message".to_string(), "wamid.OK2".to_string()),
        ]
    );
    let unparsed: Vec<&Value> = items
        .iter()
        .map(|(_, v)| v)
        .filter(|v| v["kind"] == "unparsed")
        .collect();
    assert_eq!(unparsed.len(), 1, "{items:?}");
    assert!(unparsed[0]["item"]["body"]
        .as_str()
        .unwrap()
        .contains("wamid.NOFROM"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subscription_handshake_answers_only_the_right_verify_token() {
    let pipeline = started(Setup {
        ingest: true,
        ..Setup::default()
    })
    .await;
    let http = reqwest::Client::new();
    let ask = |token: &str| {
        http.get(&pipeline.webhook_url)
            .query(&[
                ("hub.mode", "subscribe"),
                ("hub.verify_token", token),
                ("hub.challenge", "1158201444"),
            ])
            .send()
    };
    let ok = ask(VERIFY_TOKEN).await.expect("answers");
    assert_eq!(ok.status().as_u16(), 200);
    assert_eq!(ok.text().await.unwrap(), "1158201444");
    assert_eq!(
        ask("wrong-token").await.expect("answers").status().as_u16(),
        403
    );
    assert_eq!(ask("").await.expect("answers").status().as_u16(), 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tapped_button_comes_back_with_its_signed_token_and_the_quoted_message() {
    let pipeline = started(Setup {
        ingest: true,
        ..Setup::default()
    })
    .await;
    pipeline
        .publish_event(&event("wf.approval.requested", 15, "ACME"))
        .await;
    pipeline.wait_for_messages(1, WAIT).await;
    let sent = pipeline.sandbox.messages()[0].clone();
    assert_eq!(sent.template.as_deref(), Some("approval_request"));

    // Maria taps "Approve" (the first quick reply), then writes a text quoting the message.
    let tap = pipeline
        .sandbox
        .reply(&sent.wamid, gridtalk_sandbox::Reply::Button { index: 0 })
        .await
        .expect("tap delivered to gridtalk");
    let text = pipeline
        .sandbox
        .reply(
            &sent.wamid,
            gridtalk_sandbox::Reply::Text {
                body: "Approved, thanks".into(),
            },
        )
        .await
        .expect("text delivered to gridtalk");

    pipeline
        .wait_until("both replies on the webhook topic", WAIT, |p| {
            let ids: Vec<String> = webhook_items(p)
                .iter()
                .map(|(_, v)| v["item_id"].as_str().unwrap_or("").to_string())
                .collect();
            ids.contains(&tap) && ids.contains(&text)
        })
        .await;
    let items = webhook_items(&pipeline);
    let (key, button) = items
        .iter()
        .find(|(_, v)| v["item_id"] == tap.as_str())
        .unwrap();
    assert_eq!(key, "14155550101", "keyed by the approver's WhatsApp id");
    assert_eq!(button["kind"], "message");
    assert_eq!(button["item"]["type"], "button");
    assert_eq!(button["item"]["button"]["text"], "Approve");
    assert_eq!(button["item"]["context"]["id"], sent.wamid.as_str());
    let token = gridtalk_whatsapp::buttons::verify(
        BUTTON_SECRET.as_bytes(),
        button["item"]["button"]["payload"].as_str().unwrap(),
        chrono::Utc::now().timestamp(),
    )
    .expect("the payload is the token gridtalk signed");
    assert_eq!(
        (token.action.as_str(), token.request_id.as_str()),
        ("APPROVE", "APR-8015")
    );

    let (_, reply) = items
        .iter()
        .find(|(_, v)| v["item_id"] == text.as_str())
        .unwrap();
    assert_eq!(reply["item"]["text"]["body"], "Approved, thanks");
    assert_eq!(reply["item"]["context"]["id"], sent.wamid.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_wrong_signatures_are_all_counted_and_audited_at_a_bounded_rate() {
    // Ingest as its own process, so that its counters are its alone.
    let pipeline = Pipeline::start(Setup {
        ingest: true,
        only_stages: Some(vec![]),
        overrides: vec![("INGEST__MAX_REFUSAL_AUDITS_PER_MINUTE", "20".into())],
        ..Setup::default()
    })
    .await;
    let admin = gridtalk_embedded::free_port().expect("port");
    let mut ingest = pipeline.spawn_gridtalk_with(
        "ingest",
        "ingest",
        &[("GRIDTALK__ADMIN__LISTEN", format!("127.0.0.1:{admin}"))],
    );
    let http = reqwest::Client::new();
    let started = std::time::Instant::now();
    while http.get(&pipeline.webhook_url).send().await.is_err() {
        assert!(
            started.elapsed() < WAIT,
            "{}",
            pipeline.process_log("ingest")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let body = br#"{"object":"whatsapp_business_account","entry":[]}"#;
    for batch in 0..20 {
        let mut posts = tokio::task::JoinSet::new();
        for i in 0..50 {
            let request = http
                .post(&pipeline.webhook_url)
                .header("content-type", "application/json")
                .header(
                    "X-Hub-Signature-256",
                    format!("sha256={:064x}", batch * 50 + i),
                )
                .body(body.to_vec());
            posts.spawn(async move { request.send().await.expect("answered").status().as_u16() });
        }
        while let Some(status) = posts.join_next().await {
            assert_eq!(status.expect("post task"), 401);
        }
    }
    let counted = metric(
        admin,
        r#"gridtalk_refusals_total{reason="bad_signature",stage="ingest"}"#,
    )
    .await;
    assert_eq!(counted, Some(1000), "every refusal counted");
    let audited = pipeline
        .audits()
        .iter()
        .filter(|a| a.reason == "bad_signature")
        .count();
    assert_eq!(audited, 20, "audited at most 20 a minute");
    assert_eq!(terminate(&mut ingest).code(), Some(0));
}
