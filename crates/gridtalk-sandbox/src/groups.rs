//! The Cloud API's Groups endpoints as the reference describes them (Meta's Groups API, open to
//! Official Business Accounts since June 2026).
//!
//! - `POST /{version}/{phone-number-id}/groups` with `subject` (required, at most 128
//!   characters), `description` (at most 2,048) and `join_approval_mode` (`auto_approve` or
//!   `approval_required`) answers `{"messaging_product":"whatsapp","request_id":…}`; the group id
//!   and its invite link come afterwards in a `group_lifecycle_update` webhook, as Meta sends
//!   them. At most 10,000 groups per number.
//! - `POST /{version}/{group-id}/invite_link` answers the group's invite link.
//! - People join by the link only (invite-only, at most 8 participants): [`Sandbox::join_group`]
//!   (or `POST /_sandbox/groups/{group-id}/join`) is a person following it, and posts the
//!   `group_participants_update` webhook.
//! - Sending to a group (`recipient_type: group`, `to: <group id>`) is checked in the messages
//!   endpoint: the group must be one of the number's, and nothing interactive goes to a group (no
//!   reply buttons, lists or quick replies). Statuses: one group-level `sent`, then `delivered`
//!   and `read` per participant with `recipient_participant_id`.
//!
//! What the reference leaves open is chosen strictly: the webhook's field layout follows Meta's
//! other webhooks (`value.groups[]`), a group send's answer carries no `contacts` entry, and an
//! unknown group or an interactive message to a group is refused with 131009.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::{invalid, reject, Inner, Rejection, Sandbox};

/// Participants a group may have at most.
pub const MAX_PARTICIPANTS: usize = 8;
/// Groups one business number may have at most.
const MAX_GROUPS_PER_NUMBER: usize = 10_000;

/// A group the sandbox's business created.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Group {
    pub id: String,
    pub phone_number_id: String,
    pub subject: String,
    pub description: String,
    pub join_approval_mode: String,
    pub invite_link: String,
    /// Who joined (phone digits), in joining order.
    pub participants: Vec<String>,
    pub created_at_ms: i64,
}

/// A Meta-shaped group id: base64 of `capi_group:<number>:<serial>`, as Meta's samples look.
fn group_id(phone_number_id: &str, serial: u64) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!(
        "capi_group:{phone_number_id}:{:018}",
        120_363_000_000_000_000 + serial
    ))
}

/// Validates a create request and records the group. Returns the request id and the group.
fn create(
    inner: &mut Inner,
    phone_number_id: &str,
    body: &[u8],
) -> Result<(String, Group), Rejection> {
    let request: Value = serde_json::from_slice(body)
        .map_err(|e| invalid(&format!("request body is not JSON: {e}")))?;
    if request.get("messaging_product").and_then(Value::as_str) != Some("whatsapp") {
        return Err(invalid("messaging_product must be \"whatsapp\""));
    }
    let subject = request
        .get("subject")
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| invalid("The parameter subject is required."))?;
    if subject.chars().count() > 128 {
        return Err(reject(
            StatusCode::BAD_REQUEST,
            131009,
            "Parameter value is not valid",
            "subject is longer than 128 characters",
        ));
    }
    let description = request
        .get("description")
        .and_then(Value::as_str)
        .unwrap_or("");
    if description.chars().count() > 2048 {
        return Err(reject(
            StatusCode::BAD_REQUEST,
            131009,
            "Parameter value is not valid",
            "description is longer than 2048 characters",
        ));
    }
    let mode = request
        .get("join_approval_mode")
        .and_then(Value::as_str)
        .unwrap_or("auto_approve");
    if !matches!(mode, "auto_approve" | "approval_required") {
        return Err(reject(
            StatusCode::BAD_REQUEST,
            131009,
            "Parameter value is not valid",
            "join_approval_mode must be auto_approve or approval_required",
        ));
    }
    let existing = inner
        .groups
        .iter()
        .filter(|g| g.phone_number_id == phone_number_id)
        .count();
    if existing >= MAX_GROUPS_PER_NUMBER {
        return Err(reject(
            StatusCode::BAD_REQUEST,
            131009,
            "Parameter value is not valid",
            "the number has 10000 groups, the most it may have",
        ));
    }
    let serial = inner.next_id;
    inner.next_id += 1;
    let id = group_id(phone_number_id, serial);
    let group = Group {
        invite_link: format!(
            "https://chat.whatsapp.com/{}",
            &id[id.len().saturating_sub(22)..]
        ),
        id,
        phone_number_id: phone_number_id.to_string(),
        subject: subject.to_string(),
        description: description.to_string(),
        join_approval_mode: mode.to_string(),
        participants: Vec::new(),
        created_at_ms: chrono::Utc::now().timestamp_millis(),
    };
    inner.groups.push(group.clone());
    Ok((format!("group-request-{serial}"), group))
}

/// Checks a message to a group: the group is one of the number's, and the message shows nothing
/// to tap. Returns the group id (the message's `to`).
pub(crate) fn check_group_send(
    inner: &Inner,
    phone_number_id: &str,
    request: &Value,
) -> Result<String, Rejection> {
    let to = request
        .get("to")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let known = inner
        .groups
        .iter()
        .any(|g| g.id == to && g.phone_number_id == phone_number_id);
    if !known {
        return Err(reject(
            StatusCode::BAD_REQUEST,
            131009,
            "Parameter value is not valid",
            &format!("to: {to:?} is not a group of this business phone number"),
        ));
    }
    let kind = request
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("text");
    let quick_replies = request
        .pointer("/template/components")
        .and_then(Value::as_array)
        .is_some_and(|components| {
            components.iter().any(|c| {
                c.get("type")
                    .and_then(Value::as_str)
                    .is_some_and(|t| t.eq_ignore_ascii_case("button"))
            })
        });
    if kind == "interactive" || quick_replies {
        return Err(reject(
            StatusCode::BAD_REQUEST,
            131009,
            "Parameter value is not valid",
            "interactive messages and buttons are not supported in groups",
        ));
    }
    Ok(to.to_string())
}

impl Sandbox {
    /// Creates a group on `phone_number_id` as a create request would, without the webhook: for
    /// a demo or a test that starts with a group the operator made earlier.
    pub fn create_group(&self, phone_number_id: &str, subject: &str) -> Result<Group, String> {
        let body = json!({"messaging_product": "whatsapp", "subject": subject}).to_string();
        let mut inner = self.inner.lock().expect("sandbox");
        create(&mut inner, phone_number_id, body.as_bytes())
            .map(|(_, group)| group)
            .map_err(|(code, _)| format!("refused with {code}"))
    }

    /// The group `id`, if the business created it.
    pub fn group(&self, id: &str) -> Option<Group> {
        let inner = self.inner.lock().expect("sandbox");
        inner.groups.iter().find(|g| g.id == id).cloned()
    }

    /// The groups created so far.
    pub fn groups(&self) -> Vec<Group> {
        self.inner.lock().expect("sandbox").groups.clone()
    }

    /// The person at `phone` follows the group's invite link and joins; the
    /// `group_participants_update` webhook goes to gridtalk.
    pub async fn join_group(&self, group_id: &str, phone: &str) -> Result<(), String> {
        let (url, secret, phone_number_id) = {
            let mut inner = self.inner.lock().expect("sandbox");
            let url = inner.config.webhook_url.clone();
            let secret = inner.config.app_secret.clone();
            let group = inner
                .groups
                .iter_mut()
                .find(|g| g.id == group_id)
                .ok_or_else(|| format!("no group {group_id}"))?;
            if group.participants.iter().any(|p| p == phone) {
                return Ok(());
            }
            if group.participants.len() >= MAX_PARTICIPANTS {
                return Err(format!("group {group_id} has {MAX_PARTICIPANTS} participants, the most a group may have"));
            }
            group.participants.push(phone.to_string());
            (url, secret, group.phone_number_id.clone())
        };
        if let Some(url) = url {
            let value = json!({
                "messaging_product": "whatsapp",
                "metadata": {"display_phone_number": "15550783881", "phone_number_id": phone_number_id},
                "groups": [{"timestamp": chrono::Utc::now().timestamp().to_string(), "group_id": group_id,
                            "type": "group_participants_add",
                            "added_participants": [{"input": phone, "wa_id": phone}]}],
            });
            self.post_webhook_field(&url, &secret, "group_participants_update", value)
                .await;
        }
        Ok(())
    }

    /// Participants of `to` if it is a group (empty otherwise).
    pub(crate) fn participants_of(&self, to: &str) -> Option<Vec<String>> {
        let inner = self.inner.lock().expect("sandbox");
        inner
            .groups
            .iter()
            .find(|g| g.id == to)
            .map(|g| g.participants.clone())
    }
}

/// `POST /{version}/{phone-number-id}/groups`.
pub(crate) async fn create_group(
    State(sandbox): State<Sandbox>,
    Path((_version, phone_number_id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let created = {
        let mut inner = sandbox.inner.lock().expect("sandbox");
        inner.stats.requests += 1;
        let result = crate::authorize(&inner, &phone_number_id, &headers)
            .and_then(|()| create(&mut inner, &phone_number_id, &body));
        if let Err((code, _)) = &result {
            *inner.stats.errors.entry(code.to_string()).or_default() += 1;
        }
        result
    };
    match created {
        Ok((request_id, group)) => {
            let (url, secret) = {
                let inner = sandbox.inner.lock().expect("sandbox");
                (
                    inner.config.webhook_url.clone(),
                    inner.config.app_secret.clone(),
                )
            };
            if let Some(url) = url {
                let sandbox = sandbox.clone();
                let request_id = request_id.clone();
                tokio::spawn(async move {
                    let value = json!({
                        "messaging_product": "whatsapp",
                        "metadata": {"display_phone_number": "15550783881", "phone_number_id": group.phone_number_id},
                        "groups": [{"timestamp": chrono::Utc::now().timestamp().to_string(),
                                    "group_id": group.id, "type": "group_create", "request_id": request_id,
                                    "subject": group.subject, "description": group.description,
                                    "invite_link": group.invite_link,
                                    "join_approval_mode": group.join_approval_mode}],
                    });
                    sandbox
                        .post_webhook_field(&url, &secret, "group_lifecycle_update", value)
                        .await;
                });
            }
            Json(json!({"messaging_product": "whatsapp", "request_id": request_id})).into_response()
        }
        Err((_, response)) => response,
    }
}

/// `POST /{version}/{group-id}/invite_link`.
pub(crate) async fn invite_link(
    State(sandbox): State<Sandbox>,
    Path((_version, group_id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let inner = sandbox.inner.lock().expect("sandbox");
    let Some(group) = inner.groups.iter().find(|g| g.id == group_id) else {
        return crate::graph_error(
            StatusCode::BAD_REQUEST,
            100,
            "Invalid parameter",
            &format!("Unsupported post request. Object with ID '{group_id}' does not exist"),
        );
    };
    if let Err((_, response)) = crate::authorize(&inner, &group.phone_number_id, &headers) {
        return response;
    }
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if request.get("messaging_product").and_then(Value::as_str) != Some("whatsapp") {
        return invalid("messaging_product must be \"whatsapp\"").1;
    }
    Json(json!({"messaging_product": "whatsapp", "invite_link": group.invite_link})).into_response()
}

#[derive(Deserialize)]
pub(crate) struct Join {
    phone: String,
}

/// `POST /_sandbox/groups/{group-id}/join` with `{"phone": "<digits>"}`.
pub(crate) async fn join(
    State(sandbox): State<Sandbox>,
    Path(group_id): Path<String>,
    Json(join): Json<Join>,
) -> Response {
    match sandbox.join_group(&group_id, &join.phone).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, Json(json!({"error": e}))).into_response(),
    }
}

/// `GET /_sandbox/groups`.
pub(crate) async fn list(State(sandbox): State<Sandbox>) -> Json<Vec<Group>> {
    Json(sandbox.groups())
}
