//! `schemas/README.md` shows one example per event type, and those examples are exactly the
//! contract's samples and encode with the schema.

use gridtalk_contract::samples::{sample_event, EVENT_TYPES};
use gridtalk_contract::{encode_single_object, json_to_avro, ContractSchemas};

const START: &str = "<!-- examples:start -->";
const END: &str = "<!-- examples:end -->";
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

#[test]
fn the_readme_shows_one_valid_example_per_event_type() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas/README.md");
    let text = std::fs::read_to_string(&path).expect("schemas/README.md");
    let (before, rest) = text.split_once(START).expect("start marker");
    let (current, after) = rest.split_once(END).expect("end marker");
    let wanted = examples();
    if std::env::var_os("GRIDTALK_UPDATE_DOCS").is_some() {
        std::fs::write(&path, format!("{before}{START}{wanted}{END}{after}"))
            .expect("write README");
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
