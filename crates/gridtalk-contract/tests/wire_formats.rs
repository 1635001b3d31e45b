//! Both wire formats, schema evolution and the dead-letter reasons of bad bytes, against the
//! committed schemas.

use apache_avro::Schema;
use gridtalk_contract::samples::{payload_type_of, sample_event, EVENT_TYPES};
use gridtalk_contract::{
    encode_confluent, encode_single_object, json_to_avro, ContractSchemas, DecodeErrorKind,
    EventDecoder, EventView, SchemaSet, WireFormat,
};
use serde_json::json;

fn decoder() -> EventDecoder {
    EventDecoder::new(
        ContractSchemas::get().trading_grid_event.clone(),
        SchemaSet::contract(),
        None,
        64 * 1024,
    )
}

fn event_schema() -> &'static Schema {
    &ContractSchemas::get().trading_grid_event
}

#[tokio::test]
async fn every_sample_event_round_trips_in_single_object_encoding() {
    let decoder = decoder();
    for (event_type, payload_type, _) in EVENT_TYPES {
        let json = sample_event(event_type, 7, "ACME", 1_760_000_000_000).unwrap();
        let value = json_to_avro(&json, event_schema()).unwrap();
        let bytes = encode_single_object(event_schema(), value).unwrap();
        let decoded = decoder.decode(&bytes).await.unwrap();
        assert!(matches!(decoded.format, WireFormat::SingleObject { .. }));
        let view = EventView::from_resolved(&decoded.value, event_schema());
        assert_eq!(view.event_type(), *event_type);
        assert_eq!(view.payload_type(), *payload_type, "{event_type}");
        assert_eq!(payload_type_of(event_type), Some(*payload_type));
        assert_eq!(view.partner_id(), "ACME");
    }
}

/// gridtalk writes the specification's fingerprint from now on and still reads the one it wrote
/// before, on events and on its own records (outbox, sent log, responses).
#[tokio::test]
async fn standard_and_legacy_single_object_headers_both_decode_and_the_standard_one_is_written() {
    use gridtalk_contract::{legacy_fingerprint, standard_fingerprint, AvroRecord, OutboxMessage};
    let reheader = |bytes: &[u8], fingerprint: u64| {
        let mut out = vec![0xC3, 0x01];
        out.extend_from_slice(&fingerprint.to_le_bytes());
        out.extend_from_slice(&bytes[10..]);
        out
    };
    let json = sample_event("tg.po.received", 3, "ACME", 1_760_000_000_000).unwrap();
    let bytes =
        encode_single_object(event_schema(), json_to_avro(&json, event_schema()).unwrap()).unwrap();
    assert_eq!(
        bytes[2..10],
        standard_fingerprint(event_schema()).to_le_bytes()
    );
    let legacy = reheader(&bytes, legacy_fingerprint(event_schema()));
    for framed in [&bytes, &legacy] {
        let decoded = decoder().decode(framed).await.unwrap();
        let view = EventView::from_resolved(&decoded.value, event_schema());
        assert_eq!(view.event_type(), "tg.po.received");
    }
    let unknown = reheader(&bytes, 0x0123_4567_89ab_cdef);
    assert_eq!(
        decoder().decode(&unknown).await.unwrap_err().kind,
        DecodeErrorKind::UnknownSchema
    );

    let outbox = OutboxMessage {
        message_id: "m".into(),
        event_id: "e".into(),
        event_type: "tg.po.received".into(),
        correlation_id: "c".into(),
        document_key: "PO-1".into(),
        partner_id: "ACME".into(),
        phone_number_id: "1".into(),
        contact_id: "k".into(),
        recipient: "14155550101".into(),
        template_name: None,
        language: "en_US".into(),
        request_json: "{}".into(),
        rule: "r".into(),
        created_at: 0,
        fallback_request_json: None,
    };
    let written = outbox.to_avro();
    let schema = OutboxMessage::schema();
    assert_eq!(written[2..10], standard_fingerprint(schema).to_le_bytes());
    let old = reheader(&written, legacy_fingerprint(schema));
    assert_eq!(OutboxMessage::from_avro(&old).unwrap(), outbox);
    assert_eq!(OutboxMessage::from_avro(&written).unwrap(), outbox);
}

#[tokio::test]
async fn money_is_read_back_as_a_decimal_string() {
    let json = sample_event("tg.po.received", 1, "ACME", 0).unwrap();
    let expected = json
        .pointer("/payload/PurchaseOrderReceived/total/amount")
        .unwrap()
        .as_str()
        .unwrap()
        .to_string();
    let bytes =
        encode_single_object(event_schema(), json_to_avro(&json, event_schema()).unwrap()).unwrap();
    let decoded = decoder().decode(&bytes).await.unwrap();
    let view = EventView::from_resolved(&decoded.value, event_schema());
    let amount = view.str_at("/payload/total/amount").unwrap();
    assert_eq!(
        amount.trim_end_matches('0').trim_end_matches('.'),
        expected.trim_end_matches('0').trim_end_matches('.')
    );
    assert_eq!(amount.split('.').nth(1).unwrap().len(), 4);
}

/// A newer producer added an optional field to the envelope and to a payload record; an older
/// producer lacks a defaulted field. Both must decode against our reader schema.
#[tokio::test]
async fn compatible_writer_schemas_decode() {
    let mut newer: serde_json::Value =
        serde_json::from_str(gridtalk_contract_schema_text()).unwrap();
    newer["fields"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "region", "type": ["null", "string"], "default": null}));
    let payload = newer["fields"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|f| f["name"] == "payload")
        .unwrap();
    let po = payload["type"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|t| t["name"] == "PurchaseOrderReceived")
        .unwrap();
    po["fields"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "incoterms", "type": ["null", "string"], "default": null}));
    let newer = Schema::parse_str(&newer.to_string()).unwrap();

    let mut older: serde_json::Value =
        serde_json::from_str(gridtalk_contract_schema_text()).unwrap();
    older["fields"]
        .as_array_mut()
        .unwrap()
        .retain(|f| f["name"] != "causation_id" && f["name"] != "tenant_buid");
    let older = Schema::parse_str(&older.to_string()).unwrap();

    let mut known = SchemaSet::contract();
    known.insert("older", older.clone());
    known.insert("newer", newer.clone());
    let decoder = EventDecoder::new(event_schema().clone(), known, None, 64 * 1024);

    let mut json = sample_event("tg.po.received", 3, "ACME", 0).unwrap();
    json["region"] = json!("EMEA");
    json["payload"]["PurchaseOrderReceived"]["incoterms"] = json!("FOB");
    let bytes = encode_single_object(&newer, json_to_avro(&json, &newer).unwrap()).unwrap();
    let view =
        EventView::from_resolved(&decoder.decode(&bytes).await.unwrap().value, event_schema());
    assert_eq!(view.payload_type(), "PurchaseOrderReceived");
    assert!(
        view.json.get("region").is_none(),
        "fields unknown to the reader are dropped"
    );

    let json = sample_event("tg.shipment.exception", 4, "ACME", 0).unwrap();
    let bytes = encode_single_object(&older, json_to_avro(&json, &older).unwrap()).unwrap();
    let view =
        EventView::from_resolved(&decoder.decode(&bytes).await.unwrap().value, event_schema());
    assert_eq!(view.payload_type(), "ShipmentEvent");
    assert_eq!(view.json["tenant_buid"], serde_json::Value::Null);
}

fn gridtalk_contract_schema_text() -> &'static str {
    include_str!("../../../schemas/trading_grid_event.avsc")
}

#[tokio::test]
async fn bad_bytes_get_precise_reasons() {
    let decoder = decoder();
    let good = {
        let json = sample_event("tg.invoice.rejected", 9, "ACME", 0).unwrap();
        encode_single_object(event_schema(), json_to_avro(&json, event_schema()).unwrap()).unwrap()
    };
    // Not Avro at all.
    let err = decoder.decode(b"{\"event_id\": 1}").await.unwrap_err();
    assert_eq!(err.kind, DecodeErrorKind::Malformed);
    // Truncated body.
    let err = decoder.decode(&good[..good.len() - 5]).await.unwrap_err();
    assert_eq!(err.kind, DecodeErrorKind::Malformed);
    // Trailing garbage.
    let mut trailing = good.clone();
    trailing.extend_from_slice(&[1, 2, 3]);
    assert_eq!(
        decoder.decode(&trailing).await.unwrap_err().kind,
        DecodeErrorKind::Malformed
    );
    // Unknown fingerprint.
    let mut unknown = good.clone();
    unknown[2] ^= 0xFF;
    assert_eq!(
        decoder.decode(&unknown).await.unwrap_err().kind,
        DecodeErrorKind::UnknownSchema
    );
    // Confluent framing without a registry.
    let confluent = encode_confluent(
        event_schema(),
        7,
        json_to_avro(
            &sample_event("tg.po.received", 1, "A", 0).unwrap(),
            event_schema(),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(
        decoder.decode(&confluent).await.unwrap_err().kind,
        DecodeErrorKind::UnknownSchema
    );
    // Oversized.
    let small = EventDecoder::new(event_schema().clone(), SchemaSet::contract(), None, 16);
    assert_eq!(
        small.decode(&good).await.unwrap_err().kind,
        DecodeErrorKind::Oversized
    );
}

/// A writer schema without a field our reader requires (no default) is a missing-field error.
#[tokio::test]
async fn a_missing_required_field_is_incompatible() {
    let mut text: serde_json::Value =
        serde_json::from_str(gridtalk_contract_schema_text()).unwrap();
    text["fields"]
        .as_array_mut()
        .unwrap()
        .retain(|f| f["name"] != "correlation_id");
    let lacking = Schema::parse_str(&text.to_string()).unwrap();
    let mut known = SchemaSet::contract();
    known.insert("lacking", lacking.clone());
    let decoder = EventDecoder::new(event_schema().clone(), known, None, 64 * 1024);
    let json = sample_event("tg.po.received", 1, "ACME", 0).unwrap();
    let bytes = encode_single_object(&lacking, json_to_avro(&json, &lacking).unwrap()).unwrap();
    let err = decoder.decode(&bytes).await.unwrap_err();
    assert_eq!(err.kind, DecodeErrorKind::Incompatible);
    assert!(err.detail.contains("correlation_id"), "{}", err.detail);
}

/// The 31-byte record of the bug report: a single-object event whose `ShipmentEvent.po_numbers`
/// declares 2^29 items. Unbounded, apache-avro reserves 2^29 values (about 30 GB) before reading
/// one, and the process aborts.
fn thirty_one_byte_bomb() -> Vec<u8> {
    let mut bytes = vec![0xC3, 0x01];
    bytes.extend_from_slice(
        &gridtalk_contract::single_object_fingerprint(event_schema()).to_le_bytes(),
    );
    // event_id, event_type, schema_version, occurred_at, producer, tenant_buid (null),
    // correlation_id, causation_id (null), severity, partner {id, name, address, role}, edi (null)
    bytes.extend_from_slice(&[0; 14]);
    bytes.push(0x06); // payload branch 3: ShipmentEvent
    bytes.push(0x00); // shipment_id ""
    bytes.extend_from_slice(&[0x80, 0x80, 0x80, 0x80, 0x04]); // po_numbers: 2^29 items
    bytes
}

#[tokio::test]
async fn hostile_bytes_are_malformed_and_never_abort() {
    let bomb = thirty_one_byte_bomb();
    assert_eq!(bomb.len(), 31);
    let err = decoder().decode(&bomb).await.unwrap_err();
    assert_eq!(err.kind, DecodeErrorKind::Malformed, "{}", err.detail);
    assert!(err.detail.contains("array block count"), "{}", err.detail);

    // Writer schemas a producer could register: maps, arrays of records, a linked list, a huge fixed.
    let writer = |text: &str| Schema::parse_str(text).unwrap();
    let map = writer(
        r#"{"type":"record","name":"M","fields":[{"name":"m","type":{"type":"map","values":{"type":"record","name":"V","fields":[{"name":"x","type":"long"}]}}}]}"#,
    );
    let list = writer(
        r#"{"type":"record","name":"Node","fields":[{"name":"next","type":["null","Node"]}]}"#,
    );
    let fixed = writer(
        r#"{"type":"record","name":"F","fields":[{"name":"f","type":{"type":"fixed","name":"Huge","size":4294967296}}]}"#,
    );
    let mut known = SchemaSet::contract();
    for (name, schema) in [("map", &map), ("list", &list), ("fixed", &fixed)] {
        known.insert(name, schema.clone());
    }
    let decoder = EventDecoder::new(event_schema().clone(), known, None, 1 << 20);
    let framed = |schema: &Schema, body: &[u8]| {
        let mut bytes = vec![0xC3, 0x01];
        bytes
            .extend_from_slice(&gridtalk_contract::single_object_fingerprint(schema).to_le_bytes());
        bytes.extend_from_slice(body);
        bytes
    };
    let deep: Vec<u8> = std::iter::repeat_n(0x02, 200_000).chain([0x00]).collect();
    for (case, bytes) in [
        (
            "map of 2^29 records",
            framed(&map, &[0x80, 0x80, 0x80, 0x80, 0x04]),
        ),
        (
            "negative map count",
            framed(&map, &[0xFF, 0xFF, 0xFF, 0xFF, 0x03, 0x02]),
        ),
        ("linked list 200,000 deep", framed(&list, &deep)),
        ("fixed of 4 GiB", framed(&fixed, &[0; 8])),
    ] {
        let err = decoder.decode(&bytes).await.unwrap_err();
        assert_eq!(
            err.kind,
            DecodeErrorKind::Malformed,
            "{case}: {}",
            err.detail
        );
    }
}
