//! gridtalk against an Avro implementation it shares no code with: fastavro (installed by
//! `scripts/install-test-tools`, run through `tests/third_party/fastavro_encode.py`).
//!
//! - Its Parsing Canonical Form and CRC-64-AVRO fingerprint of every committed schema equal
//!   gridtalk's.
//! - Events it encodes, in Avro single-object encoding (with its own fingerprint) and in the
//!   Confluent framing, published to the real broker, route exactly as gridtalk's own encoding
//!   of the same events does: every expected message arrives, nothing is dead-lettered.

mod support;
#[path = "third_party/mod.rs"]
mod third_party;

use std::time::Duration;

use serde_json::json;

use gridtalk_contract::samples::EVENT_TYPES;
use gridtalk_contract::{
    parsing_canonical_form, standard_fingerprint, ContractSchemas, TRADING_GRID_EVENT_AVSC,
};
use support::*;
use third_party::repo_file;

const WAIT: Duration = Duration::from_secs(90);
const SCHEMA_ID: u32 = 41;

fn fastavro(args: &[&std::ffi::OsStr]) -> String {
    third_party::run("fastavro_encode.py", args)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex"))
        .collect()
}

#[test]
fn fastavro_and_gridtalk_agree_on_every_schemas_canonical_form_and_fingerprint() {
    let schemas = ContractSchemas::get();
    for (file, parsed) in [
        (
            "schemas/trading_grid_event.avsc",
            &schemas.trading_grid_event,
        ),
        ("schemas/outbox_message.avsc", &schemas.outbox_message),
        ("schemas/sent_message.avsc", &schemas.sent_message),
        ("schemas/workflow_response.avsc", &schemas.workflow_response),
        ("schemas/audit_record.avsc", &schemas.audit_record),
    ] {
        let path = repo_file(file);
        let answer = fastavro(&["--fingerprint".as_ref(), path.as_os_str()]);
        let (their_form, their_fingerprint) =
            answer.trim_end().split_once('\t').expect("two columns");
        // From the file's text and from the parsed schema: both must be the specification's form.
        let text = std::fs::read_to_string(&path).expect("schema file");
        let ours = parsing_canonical_form(&serde_json::from_str(&text).expect("json"))
            .expect("canonical form");
        assert_eq!(ours, their_form, "{file}: canonical form from the text");
        let from_parsed = parsing_canonical_form(&serde_json::to_value(parsed).expect("json"))
            .expect("canonical form");
        assert_eq!(
            from_parsed, their_form,
            "{file}: canonical form from the parsed schema"
        );
        assert_eq!(
            hex(&standard_fingerprint(parsed).to_le_bytes()),
            their_fingerprint,
            "{file}: fingerprint"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_encoded_by_fastavro_in_both_framings_route_like_our_own() {
    let mut setup = Setup {
        registry: vec![(SCHEMA_ID, TRADING_GRID_EVENT_AVSC.to_string())],
        overrides: vec![
            ("SEND__PAIR_INTERVAL_MS", "10".into()),
            ("SEND__PAIR_BURST", "100000".into()),
        ],
        ..Setup::default()
    };
    // The messages, not Meta's pair limit, are under test here.
    setup.sandbox.pair_interval_ms = 1;
    setup.sandbox.pair_burst = u32::MAX;
    let p = Pipeline::start(setup).await;

    // Every event type twice: once in each framing (distinct ids, so dedupe keeps both).
    let mut events = Vec::new();
    let mut requests = Vec::new();
    for (i, (event_type, _, _)) in EVENT_TYPES.iter().enumerate() {
        for (k, format) in ["single", "confluent"].iter().enumerate() {
            let event = event(event_type, 9_000 + (2 * i + k) as u64, "ACME");
            requests.push(json!({"format": format, "schema_id": SCHEMA_ID, "event": event}));
            events.push(event);
        }
    }
    let file = p.dir.join("fastavro-requests.json");
    std::fs::write(&file, serde_json::to_vec(&requests).expect("json")).expect("requests file");
    let schema = repo_file("schemas/trading_grid_event.avsc");
    let encoded: Vec<Vec<u8>> = fastavro(&[schema.as_os_str(), file.as_os_str()])
        .lines()
        .map(unhex)
        .collect();
    assert_eq!(encoded.len(), events.len());

    let standard = standard_fingerprint(&ContractSchemas::get().trading_grid_event).to_le_bytes();
    for (bytes, event) in encoded.iter().zip(&events) {
        match bytes[0] {
            0xC3 => assert_eq!(
                bytes[2..10],
                standard,
                "fastavro's fingerprint is the standard one"
            ),
            0x00 => assert_eq!(bytes[1..5], SCHEMA_ID.to_be_bytes()),
            other => panic!("unexpected first byte {other:#x}"),
        }
        let event_type = event["event_type"].as_str().expect("event type");
        let key = event["correlation_id"].as_str().unwrap_or_default();
        p.publish_raw(topic_short(event_type), key, bytes).await;
    }

    let expected = expected_messages(&p, &events);
    let total: usize = expected.values().sum();
    assert!(
        total > events.len() / 2,
        "the samples plan messages: {total}"
    );
    p.wait_for_messages(total, WAIT).await;
    let (missing, duplicated) = compare(&p, &expected);
    assert_eq!(
        (missing, duplicated),
        (0, 0),
        "routed like our own encoding"
    );
    assert!(
        p.dead_letters().is_empty(),
        "nothing dead-lettered: {:?}",
        p.dead_letters()
            .iter()
            .map(|d| d.reason.clone())
            .collect::<Vec<_>>()
    );
}

/// With a schema registry configured, the response and audit topics are what the Confluent
/// ecosystem reads: confluent-kafka's `AvroDeserializer` (fastavro underneath), given nothing but
/// the registry's URL, reads every record gridtalk published, of every response type and both
/// stages' audit records, to the same values gridtalk means; the `gridtalk.response_type` header
/// and the key (the correlation id) say what the README says they do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confluent_kafkas_avro_deserializer_reads_every_response_type_and_audit_record() {
    use gridtalk_sandbox::Reply;
    let p = Pipeline::start(Setup {
        ingest: true,
        serve_registry: true,
        ..Setup::default()
    })
    .await;
    p.wait_for_way_back(WAIT).await;

    // A tap on each kind of request: PO acknowledgement, invoice correction, onboarding, approval.
    for (event_type, n, to, template) in [
        ("tg.po.received", 61, "15550100001", "po_ack_request"),
        (
            "tg.invoice.correction_required",
            62,
            "15550100002",
            "invoice_correction_request",
        ),
        (
            "tg.onboarding.reminder",
            63,
            "15550100004",
            "onboarding_reminder",
        ),
        (
            "wf.approval.requested",
            64,
            "14155550101",
            "approval_request",
        ),
    ] {
        p.publish_event(&event(event_type, n, "ACME")).await;
        let request = message_to(&p, WAIT, to, template).await;
        p.sandbox
            .reply(&request.wamid, Reply::Button { index: 0 })
            .await
            .expect("tap delivered");
    }
    // A partner contact with nothing open reports an issue: a case message.
    p.sandbox
        .deliver_inbound(
            PHONE_NUMBER_ID,
            "15550100003",
            json!({"type": "text", "text": {"body": "Truck 12 has a flat tyre"}}),
            "Truck 12 has a flat tyre".into(),
        )
        .await
        .expect("text delivered");
    // A forged tap (converse's audit) and a webhook with a bad signature (ingest's audit).
    let approval = message_to(&p, WAIT, "14155550101", "approval_request").await;
    let token = approval.request["template"]["components"][1]["parameters"][0]["payload"]
        .as_str()
        .expect("the Approve payload")
        .replace("APPROVE", "REJECT");
    p.sandbox
        .deliver_inbound(
            PHONE_NUMBER_ID,
            "14155550101",
            json!({"type": "button", "context": {"from": "15550783881", "id": approval.wamid},
                   "button": {"payload": token, "text": "Approve"}}),
            "Approve".into(),
        )
        .await
        .expect("delivered");
    assert_eq!(p.post_badly_signed_webhook().await, 401);

    let every_type = [
        "wa.po.ack_decision",
        "wa.invoice.correction_ack",
        "wa.onboarding.acknowledged",
        "wa.approval.decided",
        "wa.case.message_received",
        "wa.message.status",
    ];
    p.wait_until("every response type and both audits", WAIT, |p| {
        let types: std::collections::HashSet<String> =
            p.responses().into_iter().map(|r| r.response_type).collect();
        let audits = p.audits();
        every_type.iter().all(|t| types.contains(*t))
            && audits.iter().any(|a| a.stage == "ingest")
            && audits.iter().any(|a| a.stage == "converse")
    })
    .await;
    let (responses, audits) = (p.responses(), p.audits());
    let count = responses.len() + audits.len();
    let bootstrap = p.config.kafka.bootstrap_servers.clone();
    let registry = p
        .config
        .contract
        .schema_registry_url
        .clone()
        .expect("a registry is served");
    let lines = third_party::run(
        "confluent_consume.py",
        &[
            bootstrap.as_ref(),
            registry.as_ref(),
            count.to_string().as_ref(),
            p.config.topics.responses.as_ref(),
            p.config.topics.audit.as_ref(),
        ],
    );
    let read: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert!(read.len() >= count, "{} of {count} read", read.len());

    let on = |topic: &str| -> Vec<&serde_json::Value> {
        read.iter().filter(|r| r["topic"] == topic).collect()
    };
    let (read_responses, read_audits) =
        (on(&p.config.topics.responses), on(&p.config.topics.audit));
    // One schema id per topic, each registered under its topic's subject.
    let ids = |records: &[&serde_json::Value]| -> std::collections::BTreeSet<u64> {
        records
            .iter()
            .map(|r| r["schema_id"].as_u64().expect("id"))
            .collect()
    };
    assert_eq!(ids(&read_responses).len(), 1, "{read_responses:?}");
    assert_eq!(ids(&read_audits).len(), 1, "{read_audits:?}");
    assert_ne!(ids(&read_responses), ids(&read_audits));

    for response in &responses {
        let theirs = read_responses
            .iter()
            .find(|r| r["value"]["response_id"] == response.response_id.as_str())
            .unwrap_or_else(|| panic!("{} not read by confluent-kafka", response.response_id));
        assert_eq!(
            theirs["headers"]["gridtalk.response_type"],
            response.response_type.as_str()
        );
        assert_eq!(theirs["key"], response.correlation_id.as_str());
        // Field by field as gridtalk means it; the body's branch named as in the schema.
        let mut ours = serde_json::to_value(response).expect("json");
        let body = ours["body"].take();
        let (branch, fields) = body
            .as_object()
            .and_then(|b| b.iter().next())
            .expect("a branch");
        let mut value = theirs["value"].clone();
        assert_eq!(
            value["body"][0],
            format!("io.gridtalk.v1.{branch}"),
            "{value}"
        );
        assert_eq!(&value["body"][1], fields, "{}", response.response_type);
        value["body"] = serde_json::Value::Null;
        ours["body"] = serde_json::Value::Null;
        assert_eq!(value, ours);
    }
    readmes_python_consumer_prints(&p, &registry, &responses);
    for audit in &audits {
        let theirs = read_audits
            .iter()
            .find(|r| r["value"]["audit_id"] == audit.audit_id.as_str())
            .unwrap_or_else(|| panic!("audit {} not read by confluent-kafka", audit.audit_id));
        assert_eq!(
            theirs["headers"]["gridtalk.audit.reason"],
            audit.reason.as_str()
        );
        assert_eq!(theirs["value"], serde_json::to_value(audit).expect("json"));
    }
}

/// Runs the Python consumer `schemas/README.md` shows, as it is written there, against the
/// pipeline's broker, registry and response topic, until it has printed a line for each of
/// `responses` (it polls forever, so it is stopped then).
fn readmes_python_consumer_prints(
    p: &Pipeline,
    registry: &str,
    responses: &[gridtalk_contract::WorkflowResponse],
) {
    use std::io::BufRead;
    let readme =
        std::fs::read_to_string(repo_file("schemas/README.md")).expect("schemas/README.md");
    let (_, from_python) = readme
        .split_once("### From Python")
        .expect("a Python section");
    let program = from_python
        .split_once("```python\n")
        .and_then(|(_, rest)| rest.split_once("```"))
        .map(|(code, _)| code)
        .expect("a python block");
    let path = p.dir.join("readme_consumer.py");
    std::fs::write(&path, program).expect("write the program");
    let mut child = std::process::Command::new(third_party::python())
        .arg(&path)
        .env("BOOTSTRAP_SERVERS", &p.config.kafka.bootstrap_servers)
        .env("SCHEMA_REGISTRY_URL", registry)
        .env("RESPONSES_TOPIC", &p.config.topics.responses)
        .env("GROUP_ID", format!("readme-{}", p.config.topics.responses))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python runs");
    let stdout = child.stdout.take().expect("stdout");
    let (lines, seen) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let mut printed = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let wanted = |r: &gridtalk_contract::WorkflowResponse| {
        format!(
            "{} {} {}",
            r.response_type,
            r.correlation_id,
            r.request_id.as_deref().unwrap_or("None")
        )
    };
    while !responses
        .iter()
        .all(|r| printed.iter().any(|l: &String| l.starts_with(&wanted(r))))
    {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match seen.recv_timeout(left) {
            Ok(line) => printed.push(line),
            Err(_) => {
                let _ = child.kill();
                let output = child.wait_with_output().expect("output");
                panic!(
                    "the README's consumer printed {printed:#?}, not every response; stderr: {}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    // The branch it names is the body's record type.
    for response in responses {
        let line = printed
            .iter()
            .find(|l| l.starts_with(&wanted(response)))
            .expect("printed");
        let branch = serde_json::to_value(&response.body).expect("json");
        let branch = branch
            .as_object()
            .and_then(|b| b.keys().next())
            .expect("branch");
        assert!(line.contains(&format!("io.gridtalk.v1.{branch}")), "{line}");
    }
}

/// Runs the converse stage as a process against `setup`'s registry until it exits; its log.
async fn converse_until_it_exits(setup: Setup) -> (Pipeline, String) {
    let p = Pipeline::start(Setup {
        serve_registry: true,
        in_process: false,
        ..setup
    })
    .await;
    let mut converse = p.spawn_gridtalk("converse", "converse");
    let deadline = std::time::Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = converse.try_wait().expect("wait") {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "converse still running: {}",
            p.process_log("converse")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let log = p.process_log("converse");
    assert!(!status.success(), "{log}");
    (p, log)
}

/// A registry whose subject holds a schema gridtalk's is incompatible with stops the stage that
/// publishes there at start-up, with the subject and the registry's reason, instead of writing
/// records the subject's consumers cannot read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incompatible_subject_stops_the_publishing_stage_with_the_registrys_reason() {
    let (p, log) = converse_until_it_exits(Setup {
        registry_incompatible: vec!["audit".into()],
        ..Setup::default()
    })
    .await;
    let subject = format!("{}-value", p.config.topics.audit);
    assert!(log.contains(&subject), "{log}");
    assert!(log.contains("not compatible"), "{log}");
    assert!(log.contains("NAME_MISMATCH"), "{log}");
    assert!(support::read_topic(&p.config.topics.audit).is_empty());
}

/// Where applications may not register schemas, gridtalk only looks its ids up: a subject that
/// does not hold gridtalk's schema stops the stage with what to register where.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_auto_registration_an_unregistered_schema_stops_the_stage_saying_what_to_register()
{
    let (p, log) = converse_until_it_exits(Setup {
        overrides: vec![("CONTRACT__SCHEMA_REGISTRY_AUTO_REGISTER", "false".into())],
        ..Setup::default()
    })
    .await;
    let subject = format!("{}-value", p.config.topics.responses);
    assert!(log.contains(&subject), "{log}");
    assert!(log.contains("not registered"), "{log}");
    assert!(
        log.contains("schema_registry_auto_register is off"),
        "{log}"
    );
}
