//! Button tokens: the payload of a tapped button is whatever the person's client sends back.
//!
//! The first byte picks a mode. Verifying arbitrary text must answer, never panic. Signing
//! fuzzer-chosen fields must verify to the same fields, and a token changed anywhere must not
//! verify to anything else (a change either breaks it or is no change at all).
#![no_main]

use gridtalk_whatsapp::buttons::{sign, verify};
use libfuzzer_sys::fuzz_target;

const SECRET: &[u8] = b"fuzz-button-secret";
const NOW: i64 = 1_795_514_400;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        let _ = verify(SECRET, &String::from_utf8_lossy(rest), NOW);
        return;
    }
    // Fields separated by 0x00: action, request id, expiry offset, then where and what to change.
    let mut fields = rest.splitn(4, |&b| b == 0);
    let action = String::from_utf8_lossy(fields.next().unwrap_or_default());
    let request = String::from_utf8_lossy(fields.next().unwrap_or_default());
    let offset = fields
        .next()
        .map(|b| b.iter().fold(0i64, |n, &d| n.wrapping_mul(31).wrapping_add(i64::from(d))))
        .unwrap_or(0)
        .rem_euclid(1 << 40);
    let tamper = fields.next().unwrap_or_default();
    let expires = NOW + offset;
    let Ok(token) = sign(SECRET, &action, &request, expires) else {
        return;
    };
    let verified = verify(SECRET, &token, NOW).expect("a token just signed verifies");
    assert_eq!(
        (verified.action.as_str(), verified.request_id.as_str(), verified.expires_at_secs),
        (action.as_ref(), request.as_ref(), expires)
    );
    if let [at, with, ..] = tamper {
        let mut changed = token.clone().into_bytes();
        let i = usize::from(*at) % changed.len();
        changed[i] = *with;
        if let Ok(text) = String::from_utf8(changed) {
            if let Ok(other) = verify(SECRET, &text, NOW) {
                assert_eq!(text, token, "a changed token verified: {other:?}");
            }
        }
    }
});
