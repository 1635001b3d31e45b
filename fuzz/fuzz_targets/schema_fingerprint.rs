//! Arbitrary schema JSON, as a registry or an operator's `extra_schema_dir` could hand it over:
//! the contract's schema parser and the Parsing Canonical Form never panic on any JSON, and every
//! schema the parser accepts has a canonical form and a standard fingerprint.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let _ = gridtalk_contract::parsing_canonical_form(&json);
    if let Ok(schema) = gridtalk_contract::parse_schema(&json) {
        let form = gridtalk_contract::parsing_canonical_form(
            &serde_json::to_value(&schema).expect("a parsed schema serialises"),
        )
        .expect("a parsed schema has a canonical form");
        assert_eq!(
            gridtalk_contract::crc64_avro(&form),
            gridtalk_contract::standard_fingerprint(&schema)
        );
    }
});
