//! Requests' clocks as the decide stage keeps them: which answers stop a clock, and what a fired
//! step publishes. Pure: no Kafka, no clock.
//!
//! - **An answer stops the clock.** A settled decision stops its request's clock where it is
//!   settled (the decide stage owns both). An answer the converse stage publishes itself (an
//!   acknowledgement by text, a promise, a new ETA) is followed by a
//!   [`ClockCommand::Close`] on the decisions topic, keyed like the request. Questions and comments
//!   (`NEED_INFO`, `NEED_HELP`, `COMMENT`, free text) keep the clock running: the request is still
//!   unanswered.
//! - **A fire** is its step's messages for the outbox (see [`gridtalk_route::render_fire`]) and one
//!   `wa.request.overdue` response (`response_id` `overdue:<kind>:<request>:<step>`), both with
//!   ids derived from the clock and the step, so a fire repeated after a crash is sent and
//!   published once.

use gridtalk_clock::{ClockCommand, Fire};
use gridtalk_config::Config;
use gridtalk_contract::{ResponseBody, WorkflowResponse};
use gridtalk_directory::Directory;

use crate::conversation::Outcome;

/// The request kind a response answers and whether it answers it (rather than asking or
/// commenting), as a clock's key: `<kind>:<request id>`.
fn answered_key(response: &WorkflowResponse) -> Option<String> {
    let (kind, action) = match &response.body {
        ResponseBody::PoAckDecision { decision, .. } => ("po", decision.as_str()),
        ResponseBody::ApprovalDecision { decision, .. } => ("approval", decision.as_str()),
        ResponseBody::OnboardingAcknowledgement { action, .. } => ("onboarding", action.as_str()),
        ResponseBody::CorrectionAnswer { answer, .. } => {
            let kind = match response.response_type.as_str() {
                "wa.shipment.exception_response" => "shipment",
                _ => "invoice",
            };
            (kind, answer.as_str())
        }
        _ => return None,
    };
    if matches!(action, "NEED_INFO" | "NEED_HELP" | "COMMENT" | "UNKNOWN") {
        return None;
    }
    Some(format!("{kind}:{}", response.request_id.as_deref()?))
}

/// `outcomes` with a clock close after every response that answers a request.
pub(crate) fn with_clock_closes(outcomes: Vec<Outcome>) -> Vec<Outcome> {
    let mut out = Vec::with_capacity(outcomes.len());
    for outcome in outcomes {
        let close = match &outcome {
            Outcome::Response(r) => answered_key(r).map(|key| ClockCommand::Close {
                key,
                reason: r.response_type.clone(),
            }),
            _ => None,
        };
        out.push(outcome);
        out.extend(close.map(|c| Outcome::Clock(Box::new(c))));
    }
    out
}

/// What a fired step publishes: its messages, then its `wa.request.overdue` record. A message
/// that cannot be rendered (a contact's phone gone bad) is logged and left out; the record says
/// who was notified.
pub(crate) fn fire_outcomes(
    fire: &Fire,
    config: &Config,
    directory: &Directory,
    button_secret: Option<&[u8]>,
    now_ms: i64,
) -> Vec<Outcome> {
    let messages = match gridtalk_route::render_fire(fire, config, directory, button_secret, now_ms)
    {
        Ok(messages) => messages,
        Err(failure) => {
            tracing::warn!(request = %fire.clock.key, step = fire.step, reason = failure.reason.as_str(), detail = %gridtalk_telemetry::redact(&failure.detail), "a reminder could not be rendered; its record is published without it");
            Vec::new()
        }
    };
    let notified = messages.iter().map(|m| m.contact_id.clone()).collect();
    let mut outcomes: Vec<Outcome> = messages
        .into_iter()
        .map(|m| Outcome::Outbox(Box::new(m)))
        .collect();
    outcomes.push(overdue_record(fire, notified));
    outcomes
}

/// A fired step's `wa.request.overdue` record, naming who was notified.
pub(crate) fn overdue_record(fire: &Fire, notified: Vec<String>) -> Outcome {
    let clock = &fire.clock;
    Outcome::Response(WorkflowResponse {
        response_id: format!("overdue:{}", fire.fire_id()),
        response_type: "wa.request.overdue".into(),
        correlation_id: clock.correlation_id.clone(),
        in_reply_to_event_id: Some(clock.event_id.clone()),
        request_id: Some(clock.request_id.clone()),
        contact_id: None,
        partner_id: Some(clock.partner_id.clone()),
        wa_message_id: String::new(),
        wa_context_message_id: None,
        received_at: fire.at_ms,
        body: ResponseBody::RequestOverdue {
            request_kind: clock.kind.clone(),
            policy: clock.policy.clone(),
            step: fire.step as i32,
            steps: clock.steps() as i32,
            escalation: fire.is_escalation(),
            due_at: clock.due_at_ms,
            hours_overdue: fire.hours_overdue().min(i32::MAX as i64) as i32,
            notified_contact_ids: notified,
            trigger: fire.trigger.as_str().into(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(response_type: &str, body: ResponseBody) -> WorkflowResponse {
        WorkflowResponse {
            response_id: "wamid.1".into(),
            response_type: response_type.into(),
            correlation_id: "c".into(),
            in_reply_to_event_id: None,
            request_id: Some("SH-1".into()),
            contact_id: None,
            partner_id: None,
            wa_message_id: "wamid.1".into(),
            wa_context_message_id: None,
            received_at: 0,
            body,
        }
    }

    #[test]
    fn answers_close_their_clock_and_questions_do_not() {
        let eta = response(
            "wa.shipment.exception_response",
            ResponseBody::CorrectionAnswer {
                document_key: "SH-1".into(),
                answer: "NEW_ETA".into(),
                new_eta: Some(1),
                comment: None,
            },
        );
        let comment = response(
            "wa.shipment.exception_response",
            ResponseBody::CorrectionAnswer {
                document_key: "SH-1".into(),
                answer: "COMMENT".into(),
                new_eta: None,
                comment: Some("looking".into()),
            },
        );
        let out = with_clock_closes(vec![
            Outcome::Response(comment),
            Outcome::Response(eta.clone()),
        ]);
        assert_eq!(out.len(), 3);
        assert_eq!(
            out[2],
            Outcome::Clock(Box::new(ClockCommand::Close {
                key: "shipment:SH-1".into(),
                reason: "wa.shipment.exception_response".into()
            }))
        );
        let status = response(
            "wa.message.status",
            ResponseBody::DeliveryStatus {
                status: "READ".into(),
                error_code: None,
                error_title: None,
            },
        );
        assert_eq!(with_clock_closes(vec![Outcome::Response(status)]).len(), 1);
    }
}
