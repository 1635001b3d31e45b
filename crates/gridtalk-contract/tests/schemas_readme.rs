//! `schemas/README.md` shows one example per event type and one per response type and audit
//! record, and those examples are exactly the contract's samples and encode with the schemas.

use gridtalk_contract::samples::{sample_audits, sample_event, sample_responses, EVENT_TYPES};
use gridtalk_contract::{
    encode_single_object, json_to_avro, AuditRecord, AvroRecord, ContractSchemas, Framing,
    WorkflowResponse,
};

const START: &str = "<!-- examples:start -->";
const END: &str = "<!-- examples:end -->";
const RESPONSES_START: &str = "<!-- responses:start -->";
const RESPONSES_END: &str = "<!-- responses:end -->";
/// 2026-11-24T10:00:00Z, so the examples do not change from run to run.
const AT: i64 = 1_795_514_400_000;

fn examples() -> String {
    let schema = &ContractSchemas::get().trading_grid_event;
    let mut out = String::new();
    for (i, (event_type, payload, flow)) in EVENT_TYPES.iter().enumerate() {
        let partner = if *flow == 'b' && event_type.ends_with("rejected") {
            "GLOBEX"
        } else {
            "ACME"
        };
        let event = sample_event(event_type, i as u64 + 1, partner, AT).expect("sample");
        let value = json_to_avro(&event, schema).unwrap_or_else(|e| panic!("{event_type}: {e}"));
        encode_single_object(schema, value).expect("encodes");
        out.push_str(&format!(
            "\n### `{event_type}` ({payload}, flow {flow})\n\n```json\n{}\n```\n",
            serde_json::to_string_pretty(&event).expect("json")
        ));
    }
    out
}

/// The response and audit examples; each round-trips in the single-object framing, and its
/// Confluent framing is the schema id and the same Avro body.
fn response_examples() -> String {
    let mut out = String::new();
    let responses = sample_responses(AT);
    for response in &responses {
        let single = response.to_avro();
        assert_eq!(
            &WorkflowResponse::from_avro(&single).expect("reads"),
            response
        );
        let confluent = response.encode(Framing::Confluent { schema_id: 7 });
        assert_eq!(confluent[..5], [0, 0, 0, 0, 7]);
        assert_eq!(confluent[5..], single[10..]);
        let json = serde_json::to_value(response).expect("json");
        let branch = json["body"]
            .as_object()
            .and_then(|b| b.keys().next())
            .expect("branch");
        out.push_str(&format!(
            "\n#### `{}` ({branch})\n\n```json\n{}\n```\n",
            response.response_type,
            serde_json::to_string_pretty(&json).expect("json")
        ));
    }
    for audit in sample_audits(AT) {
        let single = audit.to_avro();
        assert_eq!(AuditRecord::from_avro(&single).expect("reads"), audit);
        assert_eq!(
            audit.encode(Framing::Confluent { schema_id: 8 })[5..],
            single[10..]
        );
        out.push_str(&format!(
            "\n#### Audit record: `{}` ({})\n\n```json\n{}\n```\n",
            audit.reason,
            audit.stage,
            serde_json::to_string_pretty(&audit).expect("json")
        ));
    }
    out
}

/// Replaces the text between `start` and `end` in `text` with `wanted`, or says it differs.
fn section(text: &str, start: &str, end: &str, wanted: &str) -> (String, bool) {
    let (before, rest) = text.split_once(start).expect("start marker");
    let (current, after) = rest.split_once(end).expect("end marker");
    (
        format!("{before}{start}{wanted}{end}{after}"),
        current == wanted,
    )
}

#[test]
fn the_readme_shows_one_valid_example_per_response_type_and_audit_record() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas/README.md");
    let text = std::fs::read_to_string(&path).expect("schemas/README.md");
    let wanted = response_examples();
    let (updated, same) = section(&text, RESPONSES_START, RESPONSES_END, &wanted);
    if std::env::var_os("GRIDTALK_UPDATE_DOCS").is_some() {
        std::fs::write(&path, updated).expect("write README");
        return;
    }
    assert!(
        same,
        "schemas/README.md response examples are out of date; run with GRIDTALK_UPDATE_DOCS=1"
    );
    // Every branch of the body union and every response type the table lists has an example.
    let responses = sample_responses(AT);
    for branch in [
        "PoAckDecision",
        "ApprovalDecision",
        "OnboardingAcknowledgement",
        "CaseMessage",
        "CorrectionAnswer",
        "DeliveryStatus",
        "RequestOverdue",
    ] {
        assert!(
            wanted.contains(&format!("({branch})")),
            "{branch} has an example"
        );
    }
    for response_type in [
        "wa.po.ack_decision",
        "wa.invoice.correction_ack",
        "wa.shipment.exception_response",
        "wa.onboarding.acknowledged",
        "wa.approval.decided",
        "wa.case.message_received",
        "wa.request.comment",
        "wa.message.status",
        "wa.request.overdue",
    ] {
        assert!(
            responses.iter().any(|r| r.response_type == response_type),
            "{response_type} has an example"
        );
        assert!(
            text.contains(&format!("| `{response_type}` |")),
            "{response_type} is in the table"
        );
    }
}

#[test]
fn the_readme_shows_one_valid_example_per_event_type() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas/README.md");
    let text = std::fs::read_to_string(&path).expect("schemas/README.md");
    let (_, rest) = text.split_once(START).expect("start marker");
    let (current, _) = rest.split_once(END).expect("end marker");
    let wanted = examples();
    if std::env::var_os("GRIDTALK_UPDATE_DOCS").is_some() {
        let (updated, _) = section(&text, START, END, &wanted);
        std::fs::write(&path, updated).expect("write README");
        return;
    }
    assert!(
        current == wanted,
        "schemas/README.md examples are out of date; run with GRIDTALK_UPDATE_DOCS=1"
    );
    for (event_type, _, _) in EVENT_TYPES {
        assert!(
            current.contains(&format!("### `{event_type}`")),
            "{event_type} has an example"
        );
    }
}
