//! Bytes from outside that gridtalk must contain: records built to crash a decoder, and the
//! registry writer schemas they are written with.

use gridtalk_contract::ContractSchemas;

/// The registry writer schemas the Confluent-framed hostile records name (id, schema JSON): a map
/// of records, a linked list, a 4 GiB fixed.
pub fn hostile_writer_schemas() -> Vec<(u32, String)> {
    vec![
        (
            31,
            r#"{"type":"record","name":"M","fields":[{"name":"m","type":{"type":"map","values":{"type":"record","name":"V","fields":[{"name":"x","type":"long"}]}}}]}"#.into(),
        ),
        (
            32,
            r#"{"type":"record","name":"Node","fields":[{"name":"next","type":["null","Node"]}]}"#.into(),
        ),
        (
            33,
            r#"{"type":"record","name":"F","fields":[{"name":"f","type":{"type":"fixed","name":"Huge","size":4294967296}}]}"#.into(),
        ),
    ]
}

/// `body` framed in single-object encoding with the contract event's fingerprint.
pub fn single_object_body(body: &[u8]) -> Vec<u8> {
    let mut bytes = vec![0xC3, 0x01];
    bytes.extend_from_slice(
        &gridtalk_contract::single_object_fingerprint(&ContractSchemas::get().trading_grid_event)
            .to_le_bytes(),
    );
    bytes.extend_from_slice(body);
    bytes
}

/// `body` framed in the Confluent wire format with schema `id`.
pub fn confluent_body(id: u32, body: &[u8]) -> Vec<u8> {
    let mut bytes = vec![0x00];
    bytes.extend_from_slice(&id.to_be_bytes());
    bytes.extend_from_slice(body);
    bytes
}

/// Bytes built to crash a decoder: huge counts and lengths, deep nesting. Each is a few bytes.
pub fn hostile_records() -> Vec<(&'static str, Vec<u8>)> {
    let single = single_object_body;
    let confluent = confluent_body;
    // The envelope up to a ShipmentEvent's po_numbers array: 14 zero bytes of empty strings,
    // zero numbers, null unions and first enum symbols; branch 3; an empty shipment id.
    let envelope: Vec<u8> = [0u8; 14].into_iter().chain([0x06, 0x00]).collect();
    let with = |tail: &[u8]| single(&[envelope.as_slice(), tail].concat());
    let deep: Vec<u8> = std::iter::repeat_n(0x02, 200_000).chain([0x00]).collect();
    vec![
        // The 31-byte record that crash-looped every stage: 2^29 array items declared.
        ("array of 2^29", with(&[0x80, 0x80, 0x80, 0x80, 0x04])),
        (
            "negative array count",
            with(&[0xFF, 0xFF, 0xFF, 0xFF, 0x03, 0x02]),
        ),
        (
            "count of i64::MIN",
            with(&[0xFF; 9].iter().copied().chain([0x01]).collect::<Vec<_>>()),
        ),
        (
            "string of 2^40 bytes",
            single(&[0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x02]),
        ),
        ("varint of eleven bytes", single(&[0xFF; 11])),
        (
            "union index 7",
            single(&[[0u8; 5].as_slice(), &[0x0E]].concat()),
        ),
        (
            "payload branch 40",
            single(&[[0u8; 14].as_slice(), &[0x50]].concat()),
        ),
        ("record cut before its payload", single(&[0u8; 14])),
        (
            "map of 2^29 records",
            confluent(31, &[0x80, 0x80, 0x80, 0x80, 0x04]),
        ),
        ("linked list 200,000 deep", confluent(32, &deep)),
        ("fixed of 4 GiB", confluent(33, &[0; 8])),
    ]
}
