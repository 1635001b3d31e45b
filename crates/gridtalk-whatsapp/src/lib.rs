//! A thin client for the part of the WhatsApp Business Cloud API gridtalk uses, the request
//! builders for the message shapes it sends, and the classification of Meta's error codes.
//!
//! The client never retries by itself: it reports what happened ([`SendError`] with an
//! [`ErrorClass`]) and the send stage decides. Classification follows Meta's advice to act on
//! `error.code`, never on the HTTP status or the message text.

pub mod buttons;
pub mod catalogue;

use std::time::Duration;

use gridtalk_config::Secret;
use serde::Deserialize;
use serde_json::{json, Value};

/// What to do about a failed send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Try again later with backoff; nothing is wrong with the message.
    Retry(RetryScope),
    /// The message can never be sent as it is: dead-letter it with the reason.
    Permanent,
    /// The sending number cannot send at all (token, account, policy): stop every send of the
    /// number, alert, keep the messages, and resume when it works again.
    HaltSender,
    /// Not now, and not soon: Meta asks for a day's wait (131049, the per-user marketing cap).
    /// The message is dead-lettered with the time it may be replayed, never retried in place.
    RetryAfterDay,
    /// The template is paused or disabled for low quality (132015, 132016): its messages stop
    /// (dead-lettered, to replay once Meta approves it again); the number's others go on.
    TemplatePaused,
}

/// What a retry waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryScope {
    /// Throughput of the number (130429), app or WABA limits, transient server errors.
    Number,
    /// The pair limit of one recipient (131056): only that recipient waits.
    Recipient,
    /// Meta's "unknown error": retried a few times, then dead-lettered.
    Limited,
    /// No answer from Meta (connection failure, timeout) or an answer without Meta's error body
    /// (a proxy's 502 page, a wrong base URL): retried `send.max_unanswered_attempts` times,
    /// then the number halts and alerts, keeping the messages.
    Unanswered,
}

impl ErrorClass {
    pub fn label(self) -> &'static str {
        match self {
            ErrorClass::Retry(RetryScope::Number) => "retry",
            ErrorClass::Retry(RetryScope::Recipient) => "retry_recipient",
            ErrorClass::Retry(RetryScope::Limited) => "retry_limited",
            ErrorClass::Retry(RetryScope::Unanswered) => "retry_unanswered",
            ErrorClass::Permanent => "permanent",
            ErrorClass::HaltSender => "halt",
            ErrorClass::RetryAfterDay => "retry_after_day",
            ErrorClass::TemplatePaused => "template_paused",
        }
    }
}

/// Classifies a Graph / Cloud API error code (see the reference's error table). Codes Meta does
/// not document, and the documented permanent ones (131047 without a fallback, 131026, 131050,
/// 130497 country restriction, 131062 BSUID recipient refused, 1320xx, 100, 131008/9, 131030),
/// are permanent: a dead letter with the code, never a retry loop.
pub fn classify(code: i64) -> ErrorClass {
    match code {
        // 131057: the number is being upgraded to 1,000 mps (about a minute); the backoff's
        // ceiling (`send.retry_max_backoff_ms`) spaces the retries.
        130429 | 4 | 80007 | 1 | 2 | 131016 | 131057 => ErrorClass::Retry(RetryScope::Number),
        131056 => ErrorClass::Retry(RetryScope::Recipient),
        131000 | 131053 => ErrorClass::Retry(RetryScope::Limited),
        131049 => ErrorClass::RetryAfterDay,
        // 104: no access token reached Meta (an OAuth failure like 190, not the message's fault).
        190 | 104 | 0 | 3 | 10 | 200..=299 | 368 | 131031 | 131042 | 133010 | 131048 => {
            ErrorClass::HaltSender
        }
        132015 | 132016 => ErrorClass::TemplatePaused,
        _ => ErrorClass::Permanent,
    }
}

/// Meta's error body: `{"error": {"message", "type", "code", "error_data": {"details"}, "fbtrace_id"}}`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct GraphError {
    pub code: i64,
    #[serde(default)]
    pub message: String,
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub error_data: Option<ErrorData>,
    #[serde(default)]
    pub fbtrace_id: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ErrorData {
    #[serde(default)]
    pub details: Option<String>,
}

impl GraphError {
    pub fn details(&self) -> &str {
        self.error_data
            .as_ref()
            .and_then(|d| d.details.as_deref())
            .unwrap_or(&self.message)
    }
}

#[derive(Deserialize)]
struct ErrorEnvelope {
    error: GraphError,
}

/// A failed send.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SendError {
    /// Meta answered with an error body.
    #[error("WhatsApp error {} (HTTP {status}): {}", error.code, error.details())]
    Graph { status: u16, error: GraphError },
    /// An HTTP answer that is not a success and carries no Meta error body (a proxy's error
    /// page, a load balancer's 502, a wrong base URL's 404).
    #[error("HTTP {status} without a WhatsApp error body: {excerpt}")]
    Unexplained { status: u16, excerpt: String },
    /// No connection to send the request over: WhatsApp did not get it.
    #[error("transport error: {0}")]
    Transport(String),
    /// The request may have reached WhatsApp but no usable answer came back (a timeout, a
    /// connection lost mid-request, a success body without a message id): it may have been
    /// accepted.
    #[error("no answer to a request WhatsApp may have accepted: {0}")]
    InDoubt(String),
}

impl SendError {
    pub fn class(&self) -> ErrorClass {
        match self {
            SendError::Graph { error, .. } => classify(error.code),
            SendError::Unexplained { .. } | SendError::Transport(_) | SendError::InDoubt(_) => {
                ErrorClass::Retry(RetryScope::Unanswered)
            }
        }
    }

    pub fn code(&self) -> Option<i64> {
        match self {
            SendError::Graph { error, .. } => Some(error.code),
            SendError::Unexplained { .. } | SendError::Transport(_) | SendError::InDoubt(_) => None,
        }
    }

    /// Whether WhatsApp may have accepted the request although no acceptance came back.
    pub fn in_doubt(&self) -> bool {
        matches!(self, SendError::InDoubt(_))
    }

    /// The `code` label of `gridtalk_whatsapp_send_errors_total`: Meta's code, `http_<status>`
    /// for an answer without Meta's body, `transport` for no answer.
    pub fn label(&self) -> String {
        match self {
            SendError::Graph { error, .. } => error.code.to_string(),
            SendError::Unexplained { status, .. } => format!("http_{status}"),
            SendError::Transport(_) => "transport".into(),
            SendError::InDoubt(_) => "in_doubt".into(),
        }
    }
}

/// A message WhatsApp accepted (200): accepted, not yet delivered.
#[derive(Debug, Clone, PartialEq)]
pub struct Accepted {
    pub wamid: String,
    pub wa_id: String,
    pub message_status: String,
}

#[derive(Deserialize)]
struct SendResponse {
    #[serde(default)]
    contacts: Vec<ContactEntry>,
    messages: Vec<MessageEntry>,
}

#[derive(Deserialize)]
struct ContactEntry {
    #[serde(default)]
    wa_id: String,
}

#[derive(Deserialize)]
struct MessageEntry {
    id: String,
    #[serde(default)]
    message_status: Option<String>,
}

/// Sends messages for one business phone number.
#[derive(Debug, Clone)]
pub struct CloudApiClient {
    http: reqwest::Client,
    messages_url: String,
}

impl CloudApiClient {
    pub fn new(
        base_url: &str,
        api_version: &str,
        phone_number_id: &str,
        timeout: Duration,
    ) -> Self {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .expect("HTTP client with static settings");
        CloudApiClient {
            http,
            messages_url: format!(
                "{}/{}/{}/messages",
                base_url.trim_end_matches('/'),
                api_version,
                phone_number_id
            ),
        }
    }

    /// POSTs `body` to the messages endpoint. A request that may have reached WhatsApp without
    /// an answer coming back is [`SendError::InDoubt`]; one that never left, `Transport`.
    async fn post_messages(&self, token: &Secret, body: &str) -> Result<Vec<u8>, SendError> {
        let response = self
            .http
            .post(&self.messages_url)
            .bearer_auth(token.expose())
            .header("Content-Type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| {
                if e.is_connect() || e.is_builder() {
                    SendError::Transport(e.to_string())
                } else {
                    SendError::InDoubt(e.to_string())
                }
            })?;
        success_body(response).await.map_err(|e| match e {
            // A 2xx whose body broke off: it was accepted, but which wamid is unknown.
            SendError::Transport(detail) => SendError::InDoubt(detail),
            other => other,
        })
    }

    /// POSTs a mark-as-read request ([`mark_read_with_typing`]); Meta answers `{"success": true}`.
    pub async fn mark_read(&self, token: &Secret, body: &str) -> Result<(), SendError> {
        let bytes = self.post_messages(token, body).await?;
        let answer: Value = serde_json::from_slice(&bytes)
            .map_err(|e| SendError::Transport(format!("unreadable success body: {e}")))?;
        if answer.get("success").and_then(Value::as_bool) == Some(true) {
            Ok(())
        } else {
            Err(SendError::Transport(format!(
                "answer without success: {answer}"
            )))
        }
    }

    /// POSTs one rendered request body.
    pub async fn send(&self, token: &Secret, body: &str) -> Result<Accepted, SendError> {
        let bytes = self.post_messages(token, body).await?;
        let parsed: SendResponse = serde_json::from_slice(&bytes)
            .map_err(|e| SendError::InDoubt(format!("unreadable success body: {e}")))?;
        let message = parsed
            .messages
            .into_iter()
            .next()
            .ok_or_else(|| SendError::InDoubt("success body without a message id".into()))?;
        Ok(Accepted {
            wamid: message.id,
            wa_id: parsed
                .contacts
                .into_iter()
                .next()
                .map(|c| c.wa_id)
                .unwrap_or_default(),
            message_status: message.message_status.unwrap_or_else(|| "accepted".into()),
        })
    }
}

/// The body of a 2xx answer; any other answer as Meta's error (its Graph error body) or, without
/// one, a transport error.
async fn success_body(response: reqwest::Response) -> Result<Vec<u8>, SendError> {
    let status = response.status().as_u16();
    let bytes = response
        .bytes()
        .await
        .map_err(|e| SendError::Transport(e.to_string()))?;
    if (200..300).contains(&status) {
        return Ok(bytes.to_vec());
    }
    match serde_json::from_slice::<ErrorEnvelope>(&bytes) {
        Ok(envelope) => Err(SendError::Graph {
            status,
            error: envelope.error,
        }),
        Err(_) => Err(SendError::Unexplained {
            status,
            excerpt: excerpt(&bytes),
        }),
    }
}

/// The start of an unexplained answer's body, on one line, for the log and the alert.
fn excerpt(bytes: &[u8]) -> String {
    const MAX_CHARS: usize = 120;
    let text = String::from_utf8_lossy(bytes);
    let one_line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.is_empty() {
        return "(empty body)".into();
    }
    let mut cut: String = one_line.chars().take(MAX_CHARS).collect();
    if one_line.chars().count() > MAX_CHARS {
        cut.push('…');
    }
    cut
}

/// The Groups endpoints (Meta's Groups API, for Official Business Accounts): create a group and
/// fetch its invite link. A created group's id comes later, in the `group_lifecycle_update`
/// webhook, which the converse stage logs.
#[derive(Debug, Clone)]
pub struct GroupsClient {
    http: reqwest::Client,
    base: String,
}

impl GroupsClient {
    pub fn new(base_url: &str, api_version: &str, timeout: Duration) -> Self {
        GroupsClient {
            http: reqwest::Client::builder()
                .timeout(timeout)
                .build()
                .expect("HTTP client with static settings"),
            base: format!("{}/{}", base_url.trim_end_matches('/'), api_version),
        }
    }

    /// `POST /{phone-number-id}/groups`; returns Meta's request id (the group id and invite link
    /// follow in the `group_lifecycle_update` webhook that names it).
    pub async fn create(
        &self,
        token: &Secret,
        phone_number_id: &str,
        subject: &str,
        description: &str,
        approval_required: bool,
    ) -> Result<String, SendError> {
        let body = json!({
            "messaging_product": "whatsapp",
            "subject": subject,
            "description": description,
            "join_approval_mode": if approval_required { "approval_required" } else { "auto_approve" },
        });
        let answer = self
            .post(
                token,
                &format!("{}/{phone_number_id}/groups", self.base),
                &body,
            )
            .await?;
        answer
            .get("request_id")
            .and_then(Value::as_str)
            .map(String::from)
            .ok_or_else(|| SendError::Transport("answer without request_id".into()))
    }

    /// `POST /{group-id}/invite_link`: the link people join the group by.
    pub async fn invite_link(&self, token: &Secret, group_id: &str) -> Result<String, SendError> {
        let body = json!({"messaging_product": "whatsapp"});
        let answer = self
            .post(
                token,
                &format!("{}/{group_id}/invite_link", self.base),
                &body,
            )
            .await?;
        answer
            .get("invite_link")
            .and_then(Value::as_str)
            .map(String::from)
            .ok_or_else(|| SendError::Transport("answer without invite_link".into()))
    }

    async fn post(&self, token: &Secret, url: &str, body: &Value) -> Result<Value, SendError> {
        let response = self
            .http
            .post(url)
            .bearer_auth(token.expose())
            .json(body)
            .send()
            .await
            .map_err(|e| SendError::Transport(e.to_string()))?;
        let bytes = success_body(response).await?;
        serde_json::from_slice(&bytes)
            .map_err(|e| SendError::Transport(format!("unreadable success body: {e}")))
    }
}

/// Normalises a phone number to WhatsApp's `to` form: E.164 digits without `+`. Spaces, dashes,
/// dots and parentheses are dropped; anything else, or a length outside 8..=15 digits, is invalid.
pub fn normalize_phone(input: &str) -> Result<String, String> {
    let trimmed = input.trim();
    let body = trimmed.strip_prefix('+').unwrap_or(trimmed);
    let mut digits = String::with_capacity(body.len());
    for c in body.chars() {
        match c {
            '0'..='9' => digits.push(c),
            ' ' | '-' | '.' | '(' | ')' => {}
            other => return Err(format!("phone number contains {other:?}")),
        }
    }
    if digits.starts_with('0') {
        return Err("phone number must start with a country code, not 0".into());
    }
    if !(8..=15).contains(&digits.len()) {
        return Err(format!(
            "phone number has {} digits, expected 8 to 15",
            digits.len()
        ));
    }
    Ok(digits)
}

/// A template message with positional body parameters and quick-reply button payloads.
pub fn template_message(
    to: &str,
    template: &str,
    language: &str,
    body_parameters: &[String],
    quick_reply_payloads: &[String],
) -> Value {
    let mut components = vec![json!({
        "type": "body",
        "parameters": body_parameters.iter().map(|p| json!({"type": "text", "text": p})).collect::<Vec<_>>(),
    })];
    for (index, payload) in quick_reply_payloads.iter().enumerate() {
        components.push(json!({
            "type": "button",
            "sub_type": "quick_reply",
            "index": index.to_string(),
            "parameters": [{"type": "payload", "payload": payload}],
        }));
    }
    json!({
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": to,
        "type": "template",
        "template": {"name": template, "language": {"code": language}, "components": components},
    })
}

/// The Cloud API request that marks inbound message `message_id` read (with it every earlier
/// one) and shows the typing indicator until the reply, or for at most 25 seconds.
pub fn mark_read_with_typing(message_id: &str) -> Value {
    json!({
        "messaging_product": "whatsapp",
        "status": "read",
        "message_id": message_id,
        "typing_indicator": {"type": "text"},
    })
}

/// The Cloud API request for a free-form text message (only inside the customer service window).
pub fn text_message(to: &str, body: &str) -> Value {
    json!({
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": to,
        "type": "text",
        "text": {"preview_url": false, "body": body},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_map_to_the_documented_actions() {
        assert_eq!(classify(130429), ErrorClass::Retry(RetryScope::Number));
        assert_eq!(classify(131056), ErrorClass::Retry(RetryScope::Recipient));
        assert_eq!(classify(131000), ErrorClass::Retry(RetryScope::Limited));
        // Being upgraded to 1,000 mps: the number waits; the marketing cap: a day's wait.
        assert_eq!(classify(131057), ErrorClass::Retry(RetryScope::Number));
        assert_eq!(classify(131049), ErrorClass::RetryAfterDay);
        assert_eq!(classify(132015), ErrorClass::TemplatePaused);
        assert_eq!(classify(132016), ErrorClass::TemplatePaused);
        for halt in [
            190, 104, 0, 3, 10, 200, 299, 368, 131031, 131042, 133010, 131048,
        ] {
            assert_eq!(classify(halt), ErrorClass::HaltSender, "{halt}");
        }
        for permanent in [
            131047, 131026, 131050, 130497, 131062, 132000, 132001, 132005, 132007, 132008, 132012,
            100, 131008, 131009, 131030,
        ] {
            assert_eq!(classify(permanent), ErrorClass::Permanent, "{permanent}");
        }
    }

    #[test]
    fn answers_without_metas_body_are_unanswered_and_say_what_came() {
        let proxy = SendError::Unexplained {
            status: 502,
            excerpt: excerpt(b"<html>\n  <body>Bad   Gateway</body>\n</html>"),
        };
        assert_eq!(proxy.class(), ErrorClass::Retry(RetryScope::Unanswered));
        assert_eq!(proxy.label(), "http_502");
        assert_eq!(
            proxy.to_string(),
            "HTTP 502 without a WhatsApp error body: <html> <body>Bad Gateway</body> </html>"
        );
        assert_eq!(excerpt(b""), "(empty body)");
        assert_eq!(excerpt("é".repeat(200).as_bytes()).chars().count(), 121);
        let silence = SendError::Transport("timed out".into());
        assert_eq!(silence.class(), ErrorClass::Retry(RetryScope::Unanswered));
        assert_eq!(silence.label(), "transport");
    }

    #[test]
    fn phone_numbers_are_normalised_or_refused() {
        assert_eq!(normalize_phone("+1 (555) 123-4567").unwrap(), "15551234567");
        assert_eq!(normalize_phone("4915112345678").unwrap(), "4915112345678");
        assert!(normalize_phone("0151 1234567").is_err());
        assert!(normalize_phone("+1555").is_err());
        assert!(normalize_phone("+1555CALLNOW").is_err());
        assert!(normalize_phone("+1234567890123456").is_err());
    }

    #[test]
    fn graph_errors_parse() {
        let body = r#"{"error":{"message":"(#130429) Rate limit hit","type":"OAuthException","code":130429,"error_data":{"messaging_product":"whatsapp","details":"too many"},"fbtrace_id":"Az8"}}"#;
        let e: ErrorEnvelope = serde_json::from_str(body).unwrap();
        assert_eq!(e.error.code, 130429);
        assert_eq!(e.error.details(), "too many");
    }
}
