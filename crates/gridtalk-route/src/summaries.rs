//! The route stage's part of the computed summaries (flow h): what an input event tells each
//! configured summary, and the messages of a summary that is due (rendered here, sent by the
//! decide stage that keeps the tallies).
//!
//! - An event that tells a summary something becomes one [`Observed`] record per summary, keyed
//!   by the summary's scope (`summary:<name>:<partner or all>`), on the decisions topic, after
//!   the event's messages: one owner keeps each scope's tally.
//! - A due summary goes to its audience (the scope partner's contacts of `partner_roles`, and
//!   `internal_roles`, groups included: a summary asks for no answer) with its template, which
//!   reads `/summary/…`. Message ids derive from the fire's id, so a fire repeated after a crash
//!   is sent once.

use serde_json::{json, Value};

use gridtalk_config::Config;
use gridtalk_contract::{EventView, OutboxMessage};
use gridtalk_directory::Directory;
use gridtalk_summary::{Measure, Observed, SummaryFire};

use crate::render::{receives, render, RouteFailure};

/// What `view` tells each configured summary, one record per summary scope.
pub fn observations(config: &Config, view: &EventView, now_ms: i64) -> Vec<Observed> {
    per_summary(
        config,
        view.partner_id(),
        now_ms,
        gridtalk_summary::from_event(view.event_type(), &view.json),
    )
}

/// `observations` of a record of `partner_id`, one record for each configured summary, keyed by
/// the scope it counts in (the route stage's events and the converse stages' responses alike).
pub fn per_summary(
    config: &Config,
    partner_id: &str,
    at_ms: i64,
    observations: Vec<gridtalk_summary::Observation>,
) -> Vec<Observed> {
    if observations.is_empty() {
        return Vec::new();
    }
    config
        .summaries
        .iter()
        .map(|s| Observed {
            summary: s.name.clone(),
            scope: s.scope(partner_id).to_string(),
            at_ms,
            observations: observations.clone(),
        })
        .collect()
}

/// The messages of a due summary; none when the summary is no longer configured.
pub fn render_summary(
    fire: &SummaryFire,
    config: &Config,
    directory: &Directory,
    now_ms: i64,
) -> Result<Vec<OutboxMessage>, RouteFailure> {
    let Some(summary) = config.summaries.iter().find(|s| s.name == fire.summary) else {
        tracing::warn!(summary = %fire.summary, "a summary is no longer configured; nothing sent");
        return Ok(Vec::new());
    };
    let Some(template) = config.templates.iter().find(|t| t.name == summary.template) else {
        return Ok(Vec::new());
    };
    let partner = summary.per_partner.then_some(fire.scope.as_str());
    let scope_name = match partner {
        Some(id) => directory
            .partner(id)
            .map_or_else(|| id.to_string(), |p| p.name.clone()),
        None => "all partners".to_string(),
    };
    let kind = match fire.kind.strip_prefix("threshold:") {
        None => "Daily".to_string(),
        Some(measure) => format!("Alert ({})", measure.replace('_', " ")),
    };
    let mut figures = serde_json::Map::new();
    figures.insert("kind".into(), json!(kind));
    figures.insert("scope".into(), json!(scope_name));
    figures.insert("key".into(), json!(fire.fire_id()));
    for measure in Measure::ALL {
        figures.insert(
            measure.name().into(),
            json!(fire.counts.get(&measure).copied().unwrap_or(0)),
        );
    }
    let view = EventView {
        json: json!({
            "event_id": fire.fire_id(),
            "event_type": "gridtalk.summary",
            "occurred_at": fire.at_ms,
            "correlation_id": gridtalk_summary::tally_key(&fire.summary, &fire.scope),
            "severity": "INFO",
            "partner": {"partner_id": partner.unwrap_or("")},
            "payload": Value::Object(Default::default()),
            "summary": Value::Object(figures),
        }),
    };
    let mut contacts = Vec::new();
    let audience = &summary.audience;
    if let Some(partner) = partner {
        contacts.extend(directory.with_roles(Some(partner), &audience.partner_roles));
    }
    contacts.extend(directory.with_roles(None, &audience.internal_roles));
    let mut seen = std::collections::HashSet::new();
    let mut messages = Vec::new();
    for contact in contacts.into_iter().filter(|c| receives(c, template)) {
        if seen.insert(contact.id.clone()) {
            messages.push(render(
                &view,
                config,
                &format!("summary:{}", summary.name),
                template,
                contact,
                None,
                now_ms,
            )?);
        }
    }
    Ok(messages)
}
