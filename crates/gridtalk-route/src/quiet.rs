//! Quiet hours: whether a message waits for its recipient's business hours, and until when.
//! Pure.
//!
//! A message waits when `route.quiet_hours` is on, its event is not urgent (its severity is not in
//! `route.urgent_severities`, its type not in `route.urgent_event_types`), and its contact (or the
//! contact's partner) has business hours that are closed now. It is then handed to the decide
//! stage as a [`ClockCommand::Defer`] keyed by the contact, held durably and released to the
//! outbox when the window opens, in the order it arrived.

use gridtalk_clock::{ClockCommand, DeferredMessage, TimeSource};
use gridtalk_config::{ClockConfig, Config};
use gridtalk_contract::OutboxMessage;
use gridtalk_directory::Directory;

/// The time the request clocks and quiet hours run on.
pub fn time_source(clock: &ClockConfig) -> TimeSource {
    if *clock == ClockConfig::default() {
        TimeSource::wall()
    } else {
        TimeSource::scaled(clock.speed, clock.anchor_ms, clock.start_ms)
    }
}

/// Whether an event of `severity` and `event_type` is urgent: its messages never wait.
pub fn is_urgent(config: &Config, severity: &str, event_type: &str) -> bool {
    config.route.urgent_severities.iter().any(|s| s == severity)
        || config
            .route
            .urgent_event_types
            .iter()
            .any(|t| t == event_type)
}

/// When `message` may go, if not now: the opening of its contact's business hours.
pub fn release_at(
    config: &Config,
    directory: &Directory,
    message: &OutboxMessage,
    urgent: bool,
    now_ms: i64,
) -> Option<i64> {
    if !config.route.quiet_hours || urgent {
        return None;
    }
    let contact = directory.contact(&message.contact_id)?;
    directory.business_hours(contact)?.next_open(now_ms)
}

/// The command that holds `message` until `release_at_ms`.
pub fn defer(message: &OutboxMessage, release_at_ms: i64, now_ms: i64) -> ClockCommand {
    ClockCommand::Defer(DeferredMessage {
        key: format!("defer:{}", message.contact_id),
        message_id: message.message_id.clone(),
        contact_id: message.contact_id.clone(),
        deferred_at_ms: now_ms,
        release_at_ms,
        sequence: 0,
        message: serde_json::to_string(message).expect("an outbox message serialises"),
    })
}
