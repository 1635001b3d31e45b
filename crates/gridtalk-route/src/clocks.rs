//! What the reminder policies make of an event, and how a fired step is rendered. Pure.
//!
//! - An event a policy opens a clock for (e.g. `tg.po.received`), once its messages are planned,
//!   becomes a [`ClockCommand::Open`]: the request's key (`<kind>:<request id>`, the key its
//!   answers' decision candidates carry), its due time (the policy's `due_path`, else
//!   `default_due_hours` after the event occurred), the times of its steps, the contacts it asked,
//!   and the event's view for rendering the steps.
//! - An event a policy is `closed_by` (e.g. `tg.po.acknowledged`) becomes a [`ClockCommand::Close`].
//! - An upstream overdue event (e.g. `tg.po.ack_overdue`) is routed by the rules as before, but
//!   its messages carry the ids of the step it names ([`step_message_id`], the ids the clock's
//!   own fire of that step has), and it becomes a [`ClockCommand::Upstream`] so the clock counts
//!   the step as fired. Whichever comes first, the step reaches each person once: the send
//!   stage's index drops the second copy. Without the decide stage (an outbound-only
//!   deployment) the upstream event works exactly as before.
//!
//! A fired step ([`render_fire`]) is rendered from the stored view with a `/reminder` object
//! added (step, steps, hours_overdue, due_at, what, request_id, reminders_sent) and message ids
//! derived from the request, the step and the contact, the same however often the step is fired:
//! the send stage's index sends it once.

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use gridtalk_clock::{ClockCommand, Fire, OpenClock};
use gridtalk_config::{Config, ReminderPolicyConfig};
use gridtalk_contract::{request_kind_of, EventView, OutboxMessage};
use gridtalk_directory::Directory;

use crate::render::{audience, receives, render, scalar_text, RouteFailure};

/// The clock commands an event makes; `planned` are the messages route planned for it.
pub fn clock_commands(
    view: &EventView,
    config: &Config,
    planned: &[OutboxMessage],
) -> Vec<ClockCommand> {
    let event_type = view.event_type();
    let mut commands = Vec::new();
    for policy in &config.reminders {
        let Some((key, request_id)) = request_key(view, policy) else {
            continue;
        };
        if policy.event_types.iter().any(|t| t == event_type) {
            if let Some(open) = open_clock(view, config, policy, key, request_id, planned) {
                commands.push(ClockCommand::Open(open));
            }
        } else if policy.closed_by.iter().any(|t| t == event_type) {
            commands.push(ClockCommand::Close {
                key,
                reason: event_type.to_string(),
            });
        } else if let Some(step) = upstream_step_of(view, policy) {
            commands.push(ClockCommand::Upstream {
                key,
                policy: policy.name.clone(),
                step,
                notified: planned.iter().map(|m| m.contact_id.clone()).collect(),
            });
        }
    }
    commands
}

/// The step of `policy` an upstream overdue event names, if it is one of the policy's.
fn upstream_step_of(view: &EventView, policy: &ReminderPolicyConfig) -> Option<u32> {
    if !policy
        .upstream_overdue
        .iter()
        .any(|t| t == view.event_type())
    {
        return None;
    }
    let number = |pointer: &str| view.json.pointer(pointer).and_then(Value::as_i64);
    Some(gridtalk_clock::upstream_step(
        &policy.step_offsets_ms(),
        policy.escalate_after_hours.is_some(),
        number("/payload/escalation_level").unwrap_or(0) > 0,
        number("/payload/hours_overdue").unwrap_or(0),
    ))
}

/// The id of a step's message to one contact, whichever path sends it (the clock's fire or an
/// upstream overdue event routed by the rules): the send stage's index sends it once.
pub fn step_message_id(key: &str, step: u32, contact_id: &str) -> String {
    let digest = Sha256::digest(format!("reminder\u{1f}{key}\u{1f}{step}\u{1f}{contact_id}"));
    hex::encode(&digest[..16])
}

/// Gives the messages of an upstream overdue event the ids of the step it names (see
/// [`step_message_id`]), so that a step the clock already sent is not sent again.
pub fn key_upstream_messages(view: &EventView, config: &Config, messages: &mut [OutboxMessage]) {
    for policy in &config.reminders {
        let Some(step) = upstream_step_of(view, policy) else {
            continue;
        };
        let Some((key, _)) = request_key(view, policy) else {
            continue;
        };
        for message in messages.iter_mut() {
            message.message_id = step_message_id(&key, step, &message.contact_id);
        }
    }
}

/// The clock key (`<kind>:<request id>`) and the request id `policy` reads in the event.
fn request_key(view: &EventView, policy: &ReminderPolicyConfig) -> Option<(String, String)> {
    let request_id = view
        .json
        .pointer(&policy.request_path)
        .and_then(scalar_text)?;
    Some((format!("{}:{request_id}", policy_kind(policy)), request_id))
}

/// The request kind of a policy's requests (that of the events that open its clocks).
pub fn policy_kind(policy: &ReminderPolicyConfig) -> &'static str {
    policy
        .event_types
        .first()
        .map_or("notice", |t| request_kind_of(t))
}

fn open_clock(
    view: &EventView,
    config: &Config,
    policy: &ReminderPolicyConfig,
    key: String,
    request_id: String,
    planned: &[OutboxMessage],
) -> Option<OpenClock> {
    // The contacts asked: those whose message carries buttons (the request itself), or all.
    let asks = |m: &&OutboxMessage| {
        config
            .templates
            .iter()
            .any(|t| Some(&t.name) == m.template_name.as_ref() && !t.buttons.is_empty())
    };
    let mut recipients: Vec<String> = planned
        .iter()
        .filter(asks)
        .map(|m| m.contact_id.clone())
        .collect();
    if recipients.is_empty() {
        recipients = planned.iter().map(|m| m.contact_id.clone()).collect();
    }
    recipients.dedup();
    if recipients.is_empty() {
        return None;
    }
    let occurred = view.occurred_at_ms().unwrap_or(0);
    let due_at_ms = policy
        .due_path
        .as_deref()
        .and_then(|p| view.json.pointer(p))
        .and_then(Value::as_i64)
        .unwrap_or(occurred + (policy.default_due_hours * 3_600_000.0).round() as i64);
    Some(OpenClock {
        key,
        kind: policy_kind(policy).to_string(),
        request_id,
        policy: policy.name.clone(),
        correlation_id: view.correlation_id().to_string(),
        event_id: view.event_id().to_string(),
        partner_id: view.partner_id().to_string(),
        due_at_ms,
        steps_at_ms: policy
            .step_offsets_ms()
            .into_iter()
            .map(|o| due_at_ms + o)
            .collect(),
        escalation_last: policy.escalate_after_hours.is_some(),
        recipients,
        view: view.json.to_string(),
    })
}

/// How a request kind reads in a message ("purchase order PO-1 …").
fn what(kind: &str) -> &'static str {
    match kind {
        "po" => "Purchase order",
        "approval" => "Approval",
        "onboarding" => "Onboarding",
        "invoice" => "Invoice correction",
        "shipment" => "Shipment exception",
        _ => "Request",
    }
}

/// The messages of a fired step and the contacts they go to: the reminder to the request's
/// recipients (still in the directory and opted in), or the escalation to the policy's audience.
/// A policy no longer configured renders nothing.
pub fn render_fire(
    fire: &Fire,
    config: &Config,
    directory: &Directory,
    button_secret: Option<&[u8]>,
    now_ms: i64,
) -> Result<Vec<OutboxMessage>, RouteFailure> {
    let clock = &fire.clock;
    let Some(policy) = config.reminders.iter().find(|p| p.name == clock.policy) else {
        tracing::warn!(policy = %clock.policy, request = %clock.key, "a clock's reminder policy is no longer configured; its step sends nothing");
        return Ok(Vec::new());
    };
    let mut json: Value = serde_json::from_str(&clock.view).unwrap_or_else(|_| json!({}));
    let reminders = clock.steps() - u32::from(clock.escalation_last);
    if let Some(object) = json.as_object_mut() {
        object.insert(
            "event_id".into(),
            Value::String(format!("{}:reminder:{}", clock.event_id, fire.step)),
        );
        object.insert(
            "reminder".into(),
            json!({
                "step": fire.step,
                "steps": clock.steps(),
                "hours_overdue": fire.hours_overdue(),
                "due_at": clock.due_at_ms,
                "what": what(&clock.kind),
                "request_id": clock.request_id,
                "reminders_sent": fire.step.min(reminders),
                "policy": clock.policy,
            }),
        );
    }
    let view = EventView { json };
    let (template_name, contacts) = if fire.is_escalation() {
        let (Some(template), Some(audience_config)) =
            (&policy.escalation_template, &policy.escalation_audience)
        else {
            return Ok(Vec::new());
        };
        (
            template,
            audience(audience_config, &policy.name, &view, directory),
        )
    } else {
        (
            &policy.reminder_template,
            clock
                .recipients
                .iter()
                .filter_map(|id| directory.contact(id))
                .collect(),
        )
    };
    let Some(template) = config.templates.iter().find(|t| &t.name == template_name) else {
        return Ok(Vec::new());
    };
    let mut messages = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for contact in contacts.into_iter().filter(|c| receives(c, template)) {
        if seen.insert(contact.id.clone()) {
            let mut message = render(
                &view,
                config,
                &format!("reminder:{}", policy.name),
                template,
                contact,
                button_secret,
                now_ms,
            )?;
            message.message_id = step_message_id(&clock.key, fire.step, &contact.id);
            messages.push(message);
        }
    }
    Ok(messages)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::load(None, Vec::new()).expect("defaults load")
    }

    fn po_view(due: i64) -> EventView {
        EventView {
            json: json!({
                "event_id": "e-1", "event_type": "tg.po.received", "occurred_at": 1_000,
                "correlation_id": "ACME|850|PO-1", "severity": "INFO",
                "partner": {"partner_id": "ACME"},
                "payload_type": "PurchaseOrderReceived",
                "payload": {"po_number": "PO-1", "ack_due_at": due, "po_date": 1_000,
                            "buyer_name": "Northwind", "line_count": 2, "total": null},
            }),
        }
    }

    fn message(contact: &str, template: &str) -> OutboxMessage {
        OutboxMessage {
            message_id: "m".into(),
            event_id: "e-1".into(),
            event_type: "tg.po.received".into(),
            correlation_id: "ACME|850|PO-1".into(),
            document_key: "PO-1".into(),
            partner_id: "ACME".into(),
            phone_number_id: "1".into(),
            contact_id: contact.into(),
            recipient: "15550100001".into(),
            template_name: Some(template.into()),
            language: "en_US".into(),
            request_json: "{}".into(),
            rule: "r".into(),
            created_at: 0,
            fallback_request_json: None,
        }
    }

    #[test]
    fn a_purchase_order_opens_a_clock_for_the_contacts_it_asked() {
        let h = 3_600_000;
        let commands = clock_commands(
            &po_view(10 * h),
            &config(),
            &[
                message("acme-order-desk", "po_ack_request"),
                message("buyer-maria", "po_large_order_notice"),
            ],
        );
        let [ClockCommand::Open(open)] = commands.as_slice() else {
            panic!("one open: {commands:?}");
        };
        assert_eq!(open.key, "po:PO-1");
        assert_eq!(open.due_at_ms, 10 * h);
        assert_eq!(open.steps_at_ms, vec![10 * h, 14 * h, 34 * h]);
        assert!(open.escalation_last);
        assert_eq!(open.recipients, vec!["acme-order-desk".to_string()]);
    }

    #[test]
    fn an_acknowledgement_closes_and_an_upstream_overdue_event_names_its_step() {
        let config = config();
        let mut view = po_view(0);
        view.json["event_type"] = json!("tg.po.acknowledged");
        assert_eq!(
            clock_commands(&view, &config, &[]),
            vec![ClockCommand::Close {
                key: "po:PO-1".into(),
                reason: "tg.po.acknowledged".into()
            }]
        );
        view.json["event_type"] = json!("tg.po.ack_overdue");
        view.json["payload"] = json!({"po_number": "PO-1", "ack_due_at": 0, "hours_overdue": 30, "escalation_level": 1});
        let commands = clock_commands(&view, &config, &[]);
        assert!(matches!(
            commands.as_slice(),
            [ClockCommand::Upstream { key, step: 3, .. }] if key == "po:PO-1"
        ));
        let mut messages = vec![message("buyer-maria", "po_ack_overdue")];
        key_upstream_messages(&view, &config, &mut messages);
        assert_eq!(
            messages[0].message_id,
            step_message_id("po:PO-1", 3, "buyer-maria")
        );
        // Events no policy names make no command.
        view.json["event_type"] = json!("tg.asn.sent");
        assert!(clock_commands(&view, &config, &[]).is_empty());
    }
}
