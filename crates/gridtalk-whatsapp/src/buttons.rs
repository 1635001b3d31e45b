//! Signed button tokens: what a quick-reply payload or button id carries, so that a tap coming
//! back through a webhook can be trusted to name the request and action gridtalk sent.
//!
//! Format (at most 256 characters, Meta's limit for payloads and ids):
//! `gt1.<action>.<request id>.<expiry, unix seconds in base 36>.<mac>`, where `<mac>` is the first
//! 16 bytes of HMAC-SHA256 over everything before it, base64url without padding. The request id
//! may itself contain dots: the action is the second field and the last two fields are fixed.
//! A token that is malformed, altered, signed with another secret or past its expiry is refused.

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

const PREFIX: &str = "gt1";
const MAC_BYTES: usize = 16;
/// Meta's limit for a quick-reply payload and an interactive button id.
pub const MAX_TOKEN_LEN: usize = 256;

/// What a verified token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ButtonToken {
    pub action: String,
    pub request_id: String,
    pub expires_at_secs: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("not a gridtalk button token")]
    Malformed,
    #[error("button token signature does not match")]
    BadSignature,
    #[error("button token expired")]
    Expired,
    #[error("button token would exceed {MAX_TOKEN_LEN} characters")]
    TooLong,
}

fn mac(secret: &[u8], signed: &str) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(signed.as_bytes());
    mac.finalize().into_bytes()[..MAC_BYTES].to_vec()
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
}

/// Signs a token for `action` on `request_id`, valid until `expires_at_secs`.
pub fn sign(
    secret: &[u8],
    action: &str,
    request_id: &str,
    expires_at_secs: i64,
) -> Result<String, TokenError> {
    if action.is_empty() || action.contains('.') || request_id.is_empty() || expires_at_secs < 0 {
        return Err(TokenError::Malformed);
    }
    let signed = format!(
        "{PREFIX}.{action}.{request_id}.{}",
        to_base36(expires_at_secs as u64)
    );
    let token = format!("{signed}.{}", b64().encode(mac(secret, &signed)));
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::TooLong);
    }
    Ok(token)
}

/// Verifies `token` at `now_secs`.
pub fn verify(secret: &[u8], token: &str, now_secs: i64) -> Result<ButtonToken, TokenError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::Malformed);
    }
    let (signed, mac_text) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
    let (rest, expiry) = signed.rsplit_once('.').ok_or(TokenError::Malformed)?;
    let mut head = rest.splitn(3, '.');
    let (Some(PREFIX), Some(action), Some(request_id)) = (head.next(), head.next(), head.next())
    else {
        return Err(TokenError::Malformed);
    };
    if action.is_empty() || request_id.is_empty() {
        return Err(TokenError::Malformed);
    }
    let given = b64().decode(mac_text).map_err(|_| TokenError::Malformed)?;
    if given.len() != MAC_BYTES {
        return Err(TokenError::BadSignature);
    }
    let mut check = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    check.update(signed.as_bytes());
    // Constant-time comparison of the truncated MAC.
    check
        .verify_truncated_left(&given)
        .map_err(|_| TokenError::BadSignature)?;
    let expires_at_secs = from_base36(expiry).ok_or(TokenError::Malformed)? as i64;
    if now_secs > expires_at_secs {
        return Err(TokenError::Expired);
    }
    Ok(ButtonToken {
        action: action.to_string(),
        request_id: request_id.to_string(),
        expires_at_secs,
    })
}

fn to_base36(mut n: u64) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).expect("ascii")
}

fn from_base36(text: &str) -> Option<u64> {
    if text.is_empty() || text.len() > 13 {
        return None;
    }
    u64::from_str_radix(text, 36).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"button-secret";
    const NOW: i64 = 1_795_514_400;

    #[test]
    fn a_signed_token_verifies_and_round_trips() {
        let token = sign(SECRET, "APPROVE", "APR-8015", NOW + 3600).unwrap();
        assert!(token.starts_with("gt1.APPROVE.APR-8015."));
        assert!(token.len() < 64, "{token}");
        let verified = verify(SECRET, &token, NOW).unwrap();
        assert_eq!(
            verified,
            ButtonToken {
                action: "APPROVE".into(),
                request_id: "APR-8015".into(),
                expires_at_secs: NOW + 3600
            }
        );
        // Request ids may contain dots.
        let dotted = sign(SECRET, "ACCEPT", "PO.4500.001", NOW + 10).unwrap();
        assert_eq!(
            verify(SECRET, &dotted, NOW).unwrap().request_id,
            "PO.4500.001"
        );
    }

    #[test]
    fn tampered_forged_expired_and_garbage_tokens_are_refused() {
        let token = sign(SECRET, "APPROVE", "APR-8015", NOW + 60).unwrap();
        let tampered = token.replace("APPROVE", "REJECT");
        assert_eq!(
            verify(SECRET, &tampered, NOW),
            Err(TokenError::BadSignature)
        );
        let other_request = token.replace("APR-8015", "APR-8016");
        assert_eq!(
            verify(SECRET, &other_request, NOW),
            Err(TokenError::BadSignature)
        );
        let (signed, _) = token.rsplit_once('.').unwrap();
        let later = format!(
            "{}.{}",
            signed.rsplit_once('.').unwrap().0,
            to_base36((NOW + 999_999) as u64)
        );
        assert_eq!(
            verify(
                SECRET,
                &format!("{later}.{}", token.rsplit_once('.').unwrap().1),
                NOW
            ),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            verify(b"another-secret", &token, NOW),
            Err(TokenError::BadSignature)
        );
        assert_eq!(verify(SECRET, &token, NOW + 61), Err(TokenError::Expired));
        for garbage in [
            "",
            "APPROVE",
            "gt1.APPROVE",
            "gt2.APPROVE.X.1.AAAA",
            "gt1..X.1.AAAA",
            "gt1.A.X.zz!.AAAA",
            &"x".repeat(300),
        ] {
            assert!(verify(SECRET, garbage, NOW).is_err(), "{garbage}");
        }
        let truncated_mac = &token[..token.len() - 4];
        assert!(verify(SECRET, truncated_mac, NOW).is_err());
    }

    #[test]
    fn tokens_stay_within_metas_limit() {
        assert_eq!(
            sign(SECRET, "APPROVE", &"R".repeat(240), NOW),
            Err(TokenError::TooLong)
        );
        assert_eq!(
            sign(SECRET, "BAD.ACTION", "R", NOW),
            Err(TokenError::Malformed)
        );
    }
}
