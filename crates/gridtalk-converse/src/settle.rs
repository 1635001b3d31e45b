//! Settling decisions: the first deciding tap on a request wins, across every converse process.
//!
//! The converse stage is partitioned by contact, so two people asked the same request may be
//! served by two processes. Neither decides: each forwards a [`Candidate`] to the decisions topic,
//! keyed by the request, and the one owner of that key's partition settles it here. Pure: no
//! Kafka, no clock (see `settle_strategy` for the stage around it).
//!
//! What it guarantees, given the candidates of a partition in order:
//! - the first candidate of a request wins: its decision is published and its person told "is
//!   recorded"; every later one is audited `already_decided` and its person told which answer
//!   stands;
//! - a candidate offered again (a replay after a crash, a redelivery) gets the same outcomes with
//!   the same ids, which the response consumers and the send stage drop as duplicates;
//! - the settlements survive restarts and moves: each is a state change for the changelog
//!   (`settled:<request>` → action, contact, winning item), restored with the partition.

use std::collections::HashMap;

use gridtalk_contract::{AuditRecord, WorkflowResponse};

use crate::conversation::{
    body_for, reply, title_case, Addressee, Candidate, Outcome, RequestKind, Settings,
};

/// The winning candidate of a request.
#[derive(Debug, Clone, PartialEq)]
struct Settled {
    action: String,
    by_contact: String,
    item_id: String,
    partition: i32,
    at_ms: i64,
}

/// The settled requests of the decisions partitions this process owns.
#[derive(Debug)]
pub struct Settlements {
    settings: Settings,
    settled: HashMap<String, Settled>,
    changes: Vec<(String, String)>,
}

/// The changelog keys of settlements (the converse stage's own keys share the topic).
pub(crate) const KEY_PREFIX: &str = "settled:";

impl Settlements {
    pub fn new(settings: Settings) -> Self {
        Settlements {
            settings,
            settled: HashMap::new(),
            changes: Vec::new(),
        }
    }

    /// The settlements made since the last call, as changelog entries (key, value).
    pub fn take_changes(&mut self) -> Vec<(String, String)> {
        std::mem::take(&mut self.changes)
    }

    /// Applies the changelog entries of decisions `partition` (see [`Settlements::take_changes`]).
    pub fn restore(
        &mut self,
        partition: i32,
        entries: impl IntoIterator<Item = (String, String)>,
        now_ms: i64,
    ) {
        for (key, value) in entries {
            let Some(request) = key.strip_prefix(KEY_PREFIX) else {
                continue;
            };
            let mut parts = value.splitn(3, '\u{1f}');
            let (Some(action), Some(by_contact), Some(item_id)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            self.settled
                .entry(request.to_string())
                .or_insert_with(|| Settled {
                    action: action.into(),
                    by_contact: by_contact.into(),
                    item_id: item_id.into(),
                    partition,
                    at_ms: now_ms,
                });
        }
    }

    /// Forgets the settlements of `partition` (revoked: its new owner restores them).
    pub fn drop_partition(&mut self, partition: i32) {
        self.settled.retain(|_, s| s.partition != partition);
    }

    /// Forgets settlements older than `retention_ms`: their buttons have expired, so no
    /// candidate can come for them any more.
    pub fn evict(&mut self, now_ms: i64) {
        let horizon = now_ms.saturating_sub(self.settings.retention_ms);
        self.settled.retain(|_, s| s.at_ms >= horizon);
    }

    pub fn len(&self) -> usize {
        self.settled.len()
    }

    /// Whether the request `key` (`<kind>:<request id>`) is settled.
    pub fn is_settled(&self, key: &str) -> bool {
        self.settled.contains_key(key)
    }

    pub fn is_empty(&self) -> bool {
        self.settled.is_empty()
    }

    /// Settles one candidate read from decisions `partition`: what to publish, in order.
    pub fn settle(&mut self, partition: i32, candidate: &Candidate, now_ms: i64) -> Vec<Outcome> {
        let key = candidate.request_key();
        let winner = self.settled.entry(key.clone()).or_insert_with(|| {
            self.changes.push((
                format!("{KEY_PREFIX}{key}"),
                format!(
                    "{}\u{1f}{}\u{1f}{}",
                    candidate.action, candidate.contact_id, candidate.item_id
                ),
            ));
            Settled {
                action: candidate.action.clone(),
                by_contact: candidate.contact_id.clone(),
                item_id: candidate.item_id.clone(),
                partition,
                at_ms: now_ms,
            }
        });
        if winner.item_id == candidate.item_id {
            decided(&self.settings, candidate, now_ms)
        } else {
            refused(&self.settings, candidate, &winner.clone(), now_ms)
        }
    }
}

fn kind_of(candidate: &Candidate) -> RequestKind {
    RequestKind::from_code(&candidate.request.kind).unwrap_or(RequestKind::Case)
}

fn addressee(candidate: &Candidate) -> Addressee<'_> {
    Addressee {
        item_id: &candidate.item_id,
        wa_id: &candidate.wa_id,
        phone_number_id: candidate.phone_number_id.as_deref(),
        contact_id: &candidate.contact_id,
        language: candidate.contact_language.as_deref(),
        inside_window: candidate.inside_window,
    }
}

/// The winner: its decision on the response topic, and "is recorded" to the person.
fn decided(settings: &Settings, c: &Candidate, now_ms: i64) -> Vec<Outcome> {
    let kind = kind_of(c);
    let request = &c.request;
    let response = WorkflowResponse {
        response_id: c.item_id.clone(),
        response_type: kind.response_type().into(),
        correlation_id: request.correlation_id.clone(),
        in_reply_to_event_id: Some(request.event_id.clone()),
        request_id: Some(request.id.clone()),
        contact_id: Some(c.contact_id.clone()),
        partner_id: Some(request.partner_id.clone()),
        wa_message_id: c.item_id.clone(),
        wa_context_message_id: c.context.clone(),
        received_at: c.at_ms,
        body: body_for(kind, &request.id, Some(&c.action), None, false),
    };
    let title = &c.title;
    let confirmation = reply(
        settings,
        &addressee(c),
        request,
        "recorded",
        crate::wording::words(
            c.contact_language.as_deref(),
            crate::wording::Wording::Recorded {
                title,
                id: &request.id,
            },
        ),
        now_ms,
    );
    vec![Outcome::Response(response), Outcome::Reply(confirmation)]
}

/// A later candidate: audited `already_decided`, and told which answer stands.
fn refused(settings: &Settings, c: &Candidate, winner: &Settled, now_ms: i64) -> Vec<Outcome> {
    let request = &c.request;
    let audit = AuditRecord {
        audit_id: format!("{}:already_decided", c.item_id),
        reason: "already_decided".into(),
        stage: "converse".into(),
        detail: format!(
            "{} was already decided ({} by {}); {} not recorded",
            request.id, winner.action, winner.by_contact, c.action
        ),
        wa_id: Some(c.wa_id.clone()),
        contact_id: Some(c.contact_id.clone()),
        request_id: Some(request.id.clone()),
        action: Some(c.action.clone()),
        correlation_id: Some(request.correlation_id.clone()),
        wa_message_id: Some(c.item_id.clone()),
        at: c.at_ms,
    };
    let (title, standing) = (&c.title, title_case(&winner.action));
    let note = reply(
        settings,
        &addressee(c),
        request,
        "already_decided",
        crate::wording::words(
            c.contact_language.as_deref(),
            crate::wording::Wording::AlreadyAnswered {
                title,
                id: &request.id,
                standing: &standing,
            },
        ),
        now_ms,
    );
    vec![Outcome::Audit(audit), Outcome::Reply(note)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conversation::RequestRef;

    const NOW: i64 = 1_795_514_400_000;

    fn settings() -> Settings {
        Settings {
            button_secret: b"s".to_vec(),
            service_window_ms: 24 * 3_600_000,
            confirmation_template: "answer_confirmation".into(),
            confirmation_languages: vec!["en_US".into()],
            phone_number_id: "106540352242922".into(),
            remembered_items: 100,
            retention_ms: 8 * 24 * 3_600_000,
        }
    }

    fn tap(item: &str, contact: &str, wa_id: &str, action: &str) -> Candidate {
        Candidate {
            request: RequestRef {
                kind: "approval".into(),
                id: "APR-1".into(),
                correlation_id: "ACME|APR|APR-1".into(),
                event_id: "e1".into(),
                partner_id: "ACME".into(),
            },
            action: action.into(),
            title: action.to_lowercase(),
            contact_id: contact.into(),
            contact_language: None,
            context: Some("wamid.OUT".into()),
            inside_window: true,
            item_id: item.into(),
            wa_id: wa_id.into(),
            phone_number_id: None,
            at_ms: NOW,
        }
    }

    #[test]
    fn the_first_candidate_wins_and_the_others_are_refused_with_the_standing_answer() {
        let mut s = Settlements::new(settings());
        let maria = tap("in-1", "buyer-maria", "14155550101", "APPROVE");
        let jo = tap("in-2", "warehouse-jo", "14155550104", "REJECT");
        let won = s.settle(0, &maria, NOW);
        assert!(
            matches!(&won[0], Outcome::Response(r) if r.response_type == "wa.approval.decided"
            && r.contact_id.as_deref() == Some("buyer-maria"))
        );
        assert!(
            matches!(&won[1], Outcome::Reply(o) if o.recipient == "14155550101"
            && o.request_json.contains("is recorded"))
        );
        let lost = s.settle(0, &jo, NOW);
        assert!(
            matches!(&lost[0], Outcome::Audit(a) if a.reason == "already_decided"
            && a.contact_id.as_deref() == Some("warehouse-jo"))
        );
        assert!(
            matches!(&lost[1], Outcome::Reply(o) if o.recipient == "14155550104"
            && o.request_json.contains("already answered (Approve)"))
        );
        // Offered again (a replay): the same outcomes, with the same ids.
        assert_eq!(s.settle(0, &maria, NOW), won);
        assert_eq!(s.settle(0, &jo, NOW), lost);
        assert_eq!(s.take_changes().len(), 1, "one settlement");
    }

    #[test]
    fn settlements_survive_a_restore_and_leave_with_their_partition() {
        let mut first = Settlements::new(settings());
        first.settle(
            3,
            &tap("in-1", "buyer-maria", "14155550101", "APPROVE"),
            NOW,
        );
        let changes = first.take_changes();

        let mut next = Settlements::new(settings());
        next.restore(3, changes, NOW);
        let late = next.settle(
            3,
            &tap("in-9", "warehouse-jo", "14155550104", "REJECT"),
            NOW,
        );
        assert!(matches!(&late[0], Outcome::Audit(a) if a.reason == "already_decided"));
        assert!(next.take_changes().is_empty());
        next.drop_partition(3);
        assert!(next.is_empty());
    }
}
