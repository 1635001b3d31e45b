//! Outbox records, as anyone who can write to the outbox topic can send them to the send stage.
//!
//! The first byte picks the framing: the rest as a whole record, or as the body of an outbox
//! record (framed here with its fingerprint, so the fuzzer explores the body instead of guessing
//! 8 bytes). Reading must answer, never panic, and a record read must write back to a record that
//! reads the same.
#![no_main]

use std::sync::OnceLock;

use gridtalk_contract::{single_object_fingerprint, AvroRecord, OutboxMessage};
use libfuzzer_sys::fuzz_target;

fn header() -> &'static [u8] {
    static HEADER: OnceLock<Vec<u8>> = OnceLock::new();
    HEADER.get_or_init(|| {
        let mut header = vec![0xC3, 0x01];
        header.extend_from_slice(&single_object_fingerprint(OutboxMessage::schema()).to_le_bytes());
        header
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&framing, rest)) = data.split_first() else {
        return;
    };
    let record = if framing % 2 == 0 {
        OutboxMessage::from_avro(rest)
    } else {
        let mut framed = header().to_vec();
        framed.extend_from_slice(rest);
        OutboxMessage::from_avro(&framed)
    };
    if let Ok(outbox) = record {
        let again = OutboxMessage::from_avro(&outbox.to_avro()).expect("a record written reads");
        assert_eq!(again, outbox);
    }
});
