//! The WhatsApp sandbox answers like the Cloud API where the outbound tests rely on it: the same
//! error codes and bodies for a bad token, an unknown template, a wrong parameter count, and the
//! throughput and pair limits. Without this, "no 130429 / 131056 seen" would prove nothing.

#[path = "third_party/mod.rs"]
mod third_party;

use gridtalk_config::Config;
use gridtalk_sandbox::{Sandbox, SandboxConfig};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

const NUMBER: &str = "106540352242922";

async fn sandbox(configure: impl FnOnce(&mut SandboxConfig)) -> (Sandbox, CancellationToken) {
    let defaults = Config::load(
        None,
        [("GRIDTALK__SEND__ACCESS_TOKEN".to_string(), "x".to_string())],
    )
    .expect("defaults");
    let mut config = SandboxConfig {
        phone_number_ids: vec![NUMBER.into()],
        valid_tokens: vec!["good".into()],
        templates: gridtalk_sandbox::templates_from_config(&defaults.templates),
        ..SandboxConfig::default()
    };
    configure(&mut config);
    let stop = CancellationToken::new();
    let sandbox = Sandbox::start(config, ([127, 0, 0, 1], 0).into(), stop.clone())
        .await
        .expect("sandbox");
    (sandbox, stop)
}

fn summary(to: &str) -> Value {
    let parameters: Vec<Value> = ["2026-11-24", "45", "7", "2", "3"]
        .iter()
        .map(|t| json!({"type": "text", "text": t}))
        .collect();
    json!({
        "messaging_product": "whatsapp", "recipient_type": "individual", "to": to, "type": "template",
        "template": {"name": "daily_summary", "language": {"code": "en_US"}, "components": [
            {"type": "body", "parameters": parameters}
        ]}
    })
}

async fn post(sandbox: &Sandbox, token: &str, body: &Value) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!("{}/v25.0/{NUMBER}/messages", sandbox.base_url()))
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .expect("request");
    let status = response.status().as_u16();
    (status, response.json().await.expect("json body"))
}

fn code(body: &Value) -> i64 {
    body["error"]["code"]
        .as_i64()
        .unwrap_or_else(|| panic!("Graph error body: {body}"))
}

#[tokio::test]
async fn accepted_messages_get_a_wamid() {
    let (sandbox, _stop) = sandbox(|_| {}).await;
    let (status, body) = post(&sandbox, "good", &summary("14155550106")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["messaging_product"], "whatsapp");
    assert_eq!(body["contacts"][0]["wa_id"], "14155550106");
    // Shaped like Meta's: base64 of a structure that holds the recipient's number.
    let wamid = body["messages"][0]["id"].as_str().unwrap();
    let encoded = wamid.strip_prefix("wamid.").expect("wamid. prefix");
    use base64::Engine;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .expect("base64");
    assert!(
        decoded.windows(11).any(|w| w == b"14155550106"),
        "{wamid} holds the number"
    );
    assert_eq!(sandbox.messages()[0].rendered, "Summary to 2026-11-24: 45 POs completed, 7 invoices pending, 2 failed acknowledgements, 3 open exceptions.");
}

#[tokio::test]
async fn errors_carry_metas_codes_and_shape() {
    let (sandbox, _stop) = sandbox(|_| {}).await;
    let (status, body) = post(&sandbox, "expired", &summary("14155550106")).await;
    assert_eq!((status, code(&body)), (401, 190));
    assert_eq!(body["error"]["type"], "OAuthException");
    assert!(body["error"]["fbtrace_id"].is_string());

    let mut unknown = summary("14155550106");
    unknown["template"]["name"] = json!("no_such_template");
    let (_, body) = post(&sandbox, "good", &unknown).await;
    assert_eq!(code(&body), 132001);

    let mut short = summary("14155550106");
    short["template"]["components"][0]["parameters"]
        .as_array_mut()
        .unwrap()
        .pop();
    let (_, body) = post(&sandbox, "good", &short).await;
    assert_eq!(code(&body), 132000);
    assert!(body["error"]["error_data"]["details"]
        .as_str()
        .unwrap()
        .contains("number of"));
    assert!(sandbox.messages().is_empty());
}

/// Meta accepts a recipient written with a leading `+`, spaces, hyphens and parentheses, echoes
/// it as `contacts[].input` and answers the digits as `wa_id`; letters are refused with 100.
#[tokio::test]
async fn recipients_in_metas_accepted_formats_are_sent_and_echoed() {
    let (sandbox, _stop) = sandbox(|_| {}).await;
    for written in ["+14155550199", "+1 (415) 555-0188", "1-415-555-0177"] {
        let (status, body) = post(&sandbox, "good", &summary(written)).await;
        assert_eq!(status, 200, "{written}: {body}");
        assert_eq!(body["contacts"][0]["input"], written);
        let digits: String = written.chars().filter(char::is_ascii_digit).collect();
        assert_eq!(body["contacts"][0]["wa_id"], digits.as_str());
    }
    let received: Vec<String> = sandbox.messages().into_iter().map(|m| m.to).collect();
    assert_eq!(received, ["14155550199", "14155550188", "14155550177"]);
    for refused in ["+1-555-CALL-ME", "+", "0049 151 1234567", "++14155550199"] {
        let (status, body) = post(&sandbox, "good", &summary(refused)).await;
        assert_eq!((status, code(&body)), (400, 100), "{refused}: {body}");
    }
}

/// Component `type` and `sub_type` in upper case, as several SDKs write them.
#[tokio::test]
async fn upper_case_component_types_are_read_like_lower_case() {
    let (sandbox, _stop) = sandbox(|_| {}).await;
    let (status, _) = post(&sandbox, "good", &summary("14155550106")).await;
    assert_eq!(status, 200);
    let mut upper = summary("14155550107");
    upper["template"]["components"][0]["type"] = json!("BODY");
    let (status, body) = post(&sandbox, "good", &upper).await;
    assert_eq!(status, 200, "{body}");
    let messages = sandbox.messages();
    assert_eq!(
        messages[1].rendered, messages[0].rendered,
        "the BODY parameters were read"
    );
    assert!(!messages[1].parameters.is_empty());

    // Quick-reply buttons as BUTTON / QUICK_REPLY.
    let body: Vec<String> = ["PO-1", "Northwind", "USD 1.00", "2026-12-03"]
        .map(String::from)
        .to_vec();
    let mut buttons = gridtalk_whatsapp::template_message(
        "14155550108",
        "po_ack_request",
        "en_US",
        &body,
        &["a".into(), "b".into(), "c".into()],
    );
    for component in buttons["template"]["components"].as_array_mut().unwrap() {
        for key in ["type", "sub_type"] {
            if let Some(text) = component[key].as_str().map(str::to_ascii_uppercase) {
                component[key] = json!(text);
            }
        }
    }
    let (status, body) = post(&sandbox, "good", &buttons).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        sandbox.messages()[2].buttons,
        ["Accept", "Accept with changes", "Reject"]
    );
}

/// A template is shown in the language it was sent in, as WhatsApp shows the approved
/// translation: the same request in en_US, de_DE and es_MX reads in English, German and Spanish,
/// buttons included; a language the template is not approved in is Meta's 132001.
#[tokio::test]
async fn a_template_is_rendered_in_the_language_it_was_sent_in() {
    let (sandbox, _stop) = sandbox(|_| {}).await;
    let body: Vec<String> = ["PO-7", "Northwind Retail", "USD 9.00", "2026-12-04"]
        .map(String::from)
        .to_vec();
    let tokens = ["a".to_string(), "b".into(), "c".into()];
    for (to, language) in [
        ("14155550111", "en_US"),
        ("4915110000012", "de_DE"),
        ("5215550000013", "es_MX"),
    ] {
        let request =
            gridtalk_whatsapp::template_message(to, "po_ack_request", language, &body, &tokens);
        let (status, answer) = post(&sandbox, "good", &request).await;
        assert_eq!(status, 200, "{language}: {answer}");
    }
    let shown: Vec<(String, Vec<String>)> = sandbox
        .messages()
        .into_iter()
        .map(|m| (m.rendered, m.buttons))
        .collect();
    assert_eq!(
        shown,
        [
            (
                "New purchase order PO-7 from Northwind Retail for USD 9.00. Please acknowledge by 2026-12-04.".to_string(),
                vec!["Accept".to_string(), "Accept with changes".into(), "Reject".into()]
            ),
            (
                "Neue Bestellung PO-7 von Northwind Retail über USD 9.00. Bitte bestätigen Sie bis 2026-12-04.".into(),
                vec!["Annehmen".into(), "Mit Änderungen".into(), "Ablehnen".into()]
            ),
            (
                "Nueva orden de compra PO-7 de Northwind Retail por USD 9.00. Confirme antes del 2026-12-04.".into(),
                vec!["Aceptar".into(), "Aceptar con cambios".into(), "Rechazar".into()]
            ),
        ]
    );
    let request = gridtalk_whatsapp::template_message(
        "33600000014",
        "po_ack_request",
        "fr_FR",
        &body,
        &tokens,
    );
    let (status, answer) = post(&sandbox, "good", &request).await;
    assert_eq!((status, code(&answer)), (404, 132001), "{answer}");
}

/// Token errors come in Meta's OAuth body: no `(#190)` prefix, no `error_data`, subcode 463 for a
/// token that expired; a token Meta cannot parse has no subcode; no token at all is 104.
#[tokio::test]
async fn token_errors_have_metas_oauth_bodies() {
    let (sandbox, _stop) = sandbox(|_| {}).await;
    let (status, body) = post(&sandbox, "never-issued", &summary("14155550106")).await;
    assert_eq!((status, code(&body)), (401, 190));
    let error = &body["error"];
    assert_eq!(error["type"], "OAuthException");
    assert_eq!(
        error["message"],
        "Invalid OAuth access token - Cannot parse access token"
    );
    assert!(error.get("error_data").is_none() && error.get("error_subcode").is_none());
    assert!(error["fbtrace_id"].is_string());

    sandbox.set_valid_tokens(vec!["rotated".into()]);
    let (status, body) = post(&sandbox, "good", &summary("14155550106")).await;
    assert_eq!((status, code(&body)), (401, 190));
    assert_eq!(body["error"]["error_subcode"], 463);
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("Error validating access token: Session has expired on "),
        "{message}"
    );
    assert!(!message.starts_with("(#"));
    let (status, _) = post(&sandbox, "rotated", &summary("14155550106")).await;
    assert_eq!(status, 200);

    let response = reqwest::Client::new()
        .post(format!("{}/v25.0/{NUMBER}/messages", sandbox.base_url()))
        .json(&summary("14155550106"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status().as_u16(), 401);
    let body: Value = response.json().await.expect("json");
    assert_eq!(code(&body), 104);
}

#[tokio::test]
async fn the_pair_limit_answers_131056() {
    let (sandbox, _stop) = sandbox(|c| {
        c.pair_interval_ms = 60_000;
        c.pair_burst = 2;
    })
    .await;
    for _ in 0..2 {
        assert_eq!(post(&sandbox, "good", &summary("14155550106")).await.0, 200);
    }
    let (status, body) = post(&sandbox, "good", &summary("14155550106")).await;
    assert_eq!((status, code(&body)), (400, 131056));
    // Another recipient is not affected.
    assert_eq!(post(&sandbox, "good", &summary("14155550107")).await.0, 200);
}

#[tokio::test]
async fn the_throughput_limit_answers_130429() {
    let (sandbox, _stop) = sandbox(|c| c.throughput_per_second = 5).await;
    let mut codes = Vec::new();
    for i in 0..8 {
        let (_, body) = post(&sandbox, "good", &summary(&format!("1415555{i:04}"))).await;
        codes.push(body["error"]["code"].as_i64().unwrap_or(0));
    }
    // Sent back to back well within one second: the sixth and later are refused.
    assert_eq!(codes.iter().filter(|c| **c == 0).count(), 5, "{codes:?}");
    assert!(codes[5..].iter().all(|c| *c == 130429), "{codes:?}");
}

/// Receives webhook posts: (X-Hub-Signature-256 header, body).
async fn webhook_receiver() -> (
    String,
    tokio::sync::mpsc::UnboundedReceiver<(String, String)>,
) {
    use axum::http::HeaderMap;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let app = axum::Router::new().route(
        "/webhook",
        axum::routing::post(move |headers: HeaderMap, body: String| {
            let tx = tx.clone();
            async move {
                let signature = headers
                    .get("x-hub-signature-256")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                let _ = tx.send((signature, body));
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("port");
    let url = format!("http://{}/webhook", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, rx)
}

async fn statuses(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<(String, String)>,
    n: usize,
) -> Vec<Value> {
    let mut out = Vec::new();
    while out.len() < n {
        let (signature, body) = tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv())
            .await
            .expect("webhook within 10 s")
            .expect("receiver open");
        assert_eq!(
            signature,
            gridtalk_sandbox::signature("sandbox-app-secret", body.as_bytes()),
            "signed with the app secret"
        );
        assert!(signature.starts_with("sha256="));
        let payload: Value = serde_json::from_str(&body).expect("JSON webhook");
        assert_eq!(payload["object"], "whatsapp_business_account");
        out.push(payload["entry"][0]["changes"][0]["value"]["statuses"][0].clone());
    }
    out
}

#[tokio::test]
async fn status_webhooks_are_signed_and_follow_the_message() {
    let (url, mut rx) = webhook_receiver().await;
    let (sandbox, _stop) = sandbox(|c| {
        c.webhook_url = Some(url);
        c.undeliverable = vec!["14155550199".into()];
    })
    .await;
    let (_, body) = post(&sandbox, "good", &summary("14155550106")).await;
    let wamid = body["messages"][0]["id"]
        .as_str()
        .expect("wamid")
        .to_string();
    let delivered = statuses(&mut rx, 3).await;
    let names: Vec<&str> = delivered
        .iter()
        .map(|s| s["status"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["sent", "delivered", "read"]);
    assert!(delivered
        .iter()
        .all(|s| s["id"] == wamid.as_str() && s["recipient_id"] == "14155550106"));
    // Priced on `sent` and again on `delivered`, by the template's category; `read` after a
    // `delivered` carries no price.
    let utility =
        json!({"billable": true, "pricing_model": "PMP", "category": "utility", "type": "regular"});
    assert_eq!(delivered[0]["pricing"], utility);
    assert_eq!(delivered[1]["pricing"], utility);
    assert!(delivered[2].get("pricing").is_none(), "{}", delivered[2]);

    let (status, _) = post(&sandbox, "good", &summary("14155550199")).await;
    assert_eq!(status, 200, "accepted first, like Meta");
    let failed = statuses(&mut rx, 1).await;
    assert_eq!(failed[0]["status"], "failed");
    assert_eq!(failed[0]["errors"][0]["code"], 131026);
    assert!(
        failed[0].get("pricing").is_none(),
        "never priced when failed"
    );
}

#[tokio::test]
async fn an_inbound_message_is_marked_read_with_the_typing_indicator() {
    let (url, _rx) = webhook_receiver().await;
    let (sandbox, _stop) = sandbox(|c| c.webhook_url = Some(url)).await;
    let inbound = sandbox
        .deliver_inbound(
            NUMBER,
            "14155550106",
            json!({"type": "text", "text": {"body": "hi"}}),
            "hi".into(),
        )
        .await
        .expect("delivered");
    let read = |id: &str, typing: Value| {
        let mut body = json!({"messaging_product": "whatsapp", "status": "read", "message_id": id});
        if !typing.is_null() {
            body["typing_indicator"] = typing;
        }
        body
    };
    let (status, body) = post(&sandbox, "good", &read("wamid.unknown", Value::Null)).await;
    assert_eq!((status, code(&body)), (400, 100), "{body}");
    let (status, body) = post(&sandbox, "good", &read(&inbound, json!({"type": "audio"}))).await;
    assert_eq!((status, code(&body)), (400, 100), "{body}");
    let (status, body) = post(&sandbox, "bad", &read(&inbound, Value::Null)).await;
    assert_eq!((status, code(&body)), (401, 190), "{body}");
    let (status, body) = post(&sandbox, "good", &read(&inbound, json!({"type": "text"}))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"success": true}));
    let marked = &sandbox.inbound()[0];
    assert!(
        marked.read_at_ms.is_some() && marked.typing_shown,
        "{marked:?}"
    );
    assert!(
        sandbox.messages().is_empty(),
        "a read mark is not a message"
    );
}

#[tokio::test]
async fn recipients_refused_with_metas_newer_codes_get_metas_bodies() {
    let (sandbox, _stop) = sandbox(|c| {
        c.refusals = [
            ("14155550191", 130497),
            ("14155550192", 131062),
            ("14155550193", 131049),
        ]
        .into_iter()
        .map(|(to, code)| (to.to_string(), code))
        .collect();
    })
    .await;
    for (to, expected, words) in [
        (
            "+1 415 555 0191",
            130497,
            "restricted from messaging users in this country",
        ),
        ("14155550192", 131062, "business-scoped user ID"),
        ("14155550193", 131049, "healthy ecosystem engagement"),
    ] {
        let (status, body) = post(&sandbox, "good", &summary(to)).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(code(&body), expected);
        let message = body["error"]["message"].as_str().expect("message");
        assert!(message.starts_with(&format!("(#{expected}) ")), "{message}");
        assert_eq!(body["error"]["type"], "OAuthException");
        assert!(body["error"]["fbtrace_id"].is_string());
        let details = body["error"]["error_data"]["details"]
            .as_str()
            .expect("details");
        assert!(details.contains(words), "{details}");
        // gridtalk reads it as Meta's answer, with the class the reference gives the code.
        let error: gridtalk_whatsapp::SendError = gridtalk_whatsapp::SendError::Graph {
            status,
            error: serde_json::from_value(body["error"].clone()).expect("Graph error"),
        };
        let class = error.class();
        assert_eq!(
            class,
            if expected == 131049 {
                gridtalk_whatsapp::ErrorClass::RetryAfterDay
            } else {
                gridtalk_whatsapp::ErrorClass::Permanent
            },
            "{expected}"
        );
    }
    // Anyone else is sent to as before.
    let (status, body) = post(&sandbox, "good", &summary("14155550106")).await;
    assert_eq!(status, 200, "{body}");
}

/// pywa, a WhatsApp Cloud API SDK written by others (installed by `scripts/install-test-tools`),
/// sends through the sandbox as it would through Meta and parses every answer: a template to a
/// number written with `+`, spaces and parentheses, and three refusals, each into the error class
/// pywa maps Meta's code to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_party_sdk_parses_every_answer_as_it_would_from_meta() {
    let (sandbox, _stop) = sandbox(|_| {}).await;
    let url = sandbox.base_url();
    let output = tokio::task::spawn_blocking(move || {
        third_party::run(
            "pywa_conformance.py",
            &[url.as_ref(), NUMBER.as_ref(), "good".as_ref()],
        )
    })
    .await
    .expect("pywa ran");
    let results: Value = serde_json::from_str(output.trim()).expect("json from the script");
    println!("pywa: {results:#}");

    let template = &results["template"];
    assert_eq!(template["ok"], true, "{template}");
    let wamid = template["id"].as_str().expect("pywa read the wamid");
    let received = sandbox.messages();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].wamid, wamid);
    assert_eq!(received[0].to, "14155550199");

    for (case, code, class) in [
        ("outside_window", 131047, "ReEngagementMessage"),
        ("unknown_template", 132001, "TemplateNotExists"),
        ("bad_token", 190, "ExpiredAccessToken"),
    ] {
        let result = &results[case];
        assert_eq!(result["ok"], false, "{case}: {result}");
        assert_eq!(result["code"], code, "{case}: {result}");
        assert_eq!(result["class"], class, "{case}: {result}");
        assert!(
            result["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{case}: {result}"
        );
    }
    assert!(
        results["outside_window"]["details"]
            .as_str()
            .is_some_and(|d| d.contains("24 hours")),
        "pywa read error_data.details: {}",
        results["outside_window"]
    );
}

/// The next webhook change of `field`, skipping others.
async fn change_of(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<(String, String)>,
    field: &str,
) -> Value {
    loop {
        let (_, body) = tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv())
            .await
            .expect("webhook within 10 s")
            .expect("receiver open");
        let payload: Value = serde_json::from_str(&body).expect("JSON webhook");
        let change = &payload["entry"][0]["changes"][0];
        if change["field"] == field {
            return change["value"].clone();
        }
    }
}

#[tokio::test]
async fn groups_are_created_joined_by_link_and_sent_to_without_buttons() {
    let (url, mut rx) = webhook_receiver().await;
    let (sandbox, _stop) = sandbox(|c| c.webhook_url = Some(url)).await;
    let client = gridtalk_whatsapp::GroupsClient::new(
        &sandbox.base_url(),
        "v25.0",
        std::time::Duration::from_secs(5),
    );
    let token = gridtalk_config::Secret::new("good");
    // Created asynchronously: a request id now, the group id and link in the lifecycle webhook.
    let request_id = client
        .create(&token, NUMBER, "Operations room", "Daily summaries", false)
        .await
        .expect("created");
    let lifecycle = change_of(&mut rx, "group_lifecycle_update").await;
    let created = &lifecycle["groups"][0];
    assert_eq!(created["type"], "group_create");
    assert_eq!(created["request_id"], request_id.as_str());
    assert_eq!(created["subject"], "Operations room");
    let group = created["group_id"].as_str().expect("group id").to_string();
    let link = client.invite_link(&token, &group).await.expect("link");
    assert_eq!(created["invite_link"], link.as_str());
    assert!(link.starts_with("https://chat.whatsapp.com/"));

    // Meta's validation of a create request.
    let too_long = client
        .create(&token, NUMBER, &"x".repeat(129), "", false)
        .await
        .expect_err("a subject over 128 characters");
    assert!(
        matches!(&too_long, gridtalk_whatsapp::SendError::Graph { error, .. } if error.code == 131009),
        "{too_long}"
    );
    let bad_token = client
        .create(&gridtalk_config::Secret::new("bad"), NUMBER, "x", "", false)
        .await
        .expect_err("a bad token");
    assert!(
        matches!(&bad_token, gridtalk_whatsapp::SendError::Graph { error, .. } if error.code == 190),
        "{bad_token}"
    );

    // People join by the link (at most 8); each join is a participants webhook.
    for phone in ["14155550106", "14155550101"] {
        sandbox.join_group(&group, phone).await.expect("joins");
        let joined = change_of(&mut rx, "group_participants_update").await;
        assert_eq!(joined["groups"][0]["added_participants"][0]["wa_id"], phone);
    }
    for i in 0..6 {
        sandbox
            .join_group(&group, &format!("1415555020{i}"))
            .await
            .expect("up to eight join");
    }
    assert!(
        sandbox.join_group(&group, "14155550299").await.is_err(),
        "a ninth"
    );

    // A template without buttons goes to the group; no contacts entry in the answer.
    let mut to_group = summary(&group);
    to_group["recipient_type"] = json!("group");
    let (status, body) = post(&sandbox, "good", &to_group).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.get("contacts").is_none(), "{body}");
    let wamid = body["messages"][0]["id"]
        .as_str()
        .expect("wamid")
        .to_string();
    // One group-level sent, then delivered and read per participant.
    let mut seen = Vec::new();
    while seen.len() < 1 + 2 * 8 {
        let value = change_of(&mut rx, "messages").await;
        let s = value["statuses"][0].clone();
        assert_eq!(s["id"], wamid.as_str());
        assert_eq!(s["recipient_id"], group.as_str());
        assert_eq!(s["recipient_type"], "group");
        seen.push((
            s["status"].as_str().unwrap().to_string(),
            s["recipient_participant_id"].as_str().map(String::from),
        ));
    }
    assert_eq!(seen[0], ("sent".to_string(), None));
    for state in ["delivered", "read"] {
        let participants: Vec<&str> = seen
            .iter()
            .filter(|(s, _)| s == state)
            .filter_map(|(_, p)| p.as_deref())
            .collect();
        assert_eq!(participants.len(), 8, "{state}: {participants:?}");
    }

    // Nothing to tap in a group, and only the number's own groups.
    let mut with_buttons = json!({
        "messaging_product": "whatsapp", "recipient_type": "group", "to": group, "type": "template",
        "template": {"name": "po_ack_overdue", "language": {"code": "en_US"}, "components": [
            {"type": "body", "parameters": [{"type": "text", "text": "PO-1"}, {"type": "text", "text": "2026-12-01"}, {"type": "text", "text": "4"}]},
            {"type": "button", "sub_type": "quick_reply", "index": "0", "parameters": [{"type": "payload", "payload": "gt1.x"}]}
        ]}
    });
    let (status, body) = post(&sandbox, "good", &with_buttons).await;
    assert_eq!((status, code(&body)), (400, 131009), "{body}");
    with_buttons = json!({
        "messaging_product": "whatsapp", "recipient_type": "group", "to": group, "type": "interactive",
        "interactive": {"type": "button", "body": {"text": "Approve?"}, "action": {"buttons": [
            {"type": "reply", "reply": {"id": "a", "title": "Approve"}}]}}
    });
    let (status, body) = post(&sandbox, "good", &with_buttons).await;
    assert_eq!((status, code(&body)), (400, 131009), "{body}");
    let mut unknown = summary("Y2FwaV9ncm91cDpub3RoaW5n");
    unknown["recipient_type"] = json!("group");
    let (status, body) = post(&sandbox, "good", &unknown).await;
    assert_eq!((status, code(&body)), (400, 131009), "{body}");
}
