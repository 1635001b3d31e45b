//! The webhook body splitter on arbitrary bytes, as a signed body could carry them (the signature
//! proves who sent a body, not that it is well formed).
//!
//! Any bytes must give items or an error, never a panic; every item must survive the webhook
//! topic's encoding unchanged, and be one of the kinds the converse stage knows.
#![no_main]

use gridtalk_contract::webhook_body::split;
use gridtalk_contract::WebhookItem;
use libfuzzer_sys::fuzz_target;

const KINDS: &[&str] = &["message", "status", "error", "other", "unparsed"];

fuzz_target!(|data: &[u8]| {
    let Ok(items) = split(data, 1_795_514_400_000) else {
        return;
    };
    for item in items {
        assert!(KINDS.contains(&item.kind.as_str()), "kind {}", item.kind);
        assert!(!item.item_id.is_empty(), "an item without an id");
        let read = WebhookItem::from_json(&item.to_json()).expect("an item reads back");
        assert_eq!(read, item);
    }
});
