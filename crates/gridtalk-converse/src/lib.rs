//! The converse stage: what people send back, made into typed records for workflow systems.
//!
//! It is one consumer group over two co-partitioned topics, both keyed by the contact's WhatsApp
//! id: the sent log (what gridtalk sent, written by the send stage) and the webhook topic (what
//! Meta reported, written by the ingest stage). The range assignor gives a process the same
//! partition numbers of both, so every contact's messages and replies meet in one process and the
//! join is local. The sent log is read from its start on every assignment (its offsets are never
//! committed) and rebuilds the conversation state; webhook items are committed once everything
//! they caused is acknowledged by the broker.
//!
//! For each webhook item, in partition order:
//! - a **status** is joined with the sent message and published as a `DeliveryStatus` on the
//!   response topic, only if it moves the message forward (sent → delivered → read; failed with
//!   Meta's code), so out-of-order statuses end in the right state;
//! - a **button** (template quick reply, interactive button or list row) counts only if its token
//!   verifies, names the request of the quoted message, comes from a contact the directory
//!   authorises. A deciding action is a candidate on the decisions topic, keyed by request, and
//!   the one owner of that key's partition settles it (`settle`, its own group): the first
//!   candidate wins, across every converse process. The decision is published and confirmed to
//!   the person through the outbox (free-form text inside the customer service window, the
//!   confirmation template outside it); a later decision gets a polite "already answered" reply;
//! - **text** quoting a message is attached to that message's request; unquoted text to the
//!   contact's single open request, otherwise it opens a case.
//!
//! Every refusal (bad token, unauthorised contact, second decision, reply to an unknown message)
//! is an `AuditRecord` on the audit topic and a `gridtalk_refusals_total` count, never a response.
//! A redelivered webhook item (same item id) is dropped. An item that refers to a message the sent
//! log has not shown yet waits for it up to `converse.join_wait_ms` (at most `converse.max_waiting`
//! items at once; one beyond is judged at once).
//!
//! State is bounded: what the process holds about a partition's contacts leaves with the
//! partition, and sent messages (with the requests and contacts only they keep) are evicted after
//! the longer of the button lifetime and the sent-index retention.

mod conversation;
mod overdue;
mod settle;
mod settle_strategy;
mod stage;
mod strategy;
mod wording;

pub use conversation::{
    Candidate, Conversations, Handled, Outcome, RequestKind, RequestRef, Settings,
    COMMENT_RESPONSE_TYPE,
};
pub use settle::Settlements;
pub use stage::{run, ConverseError};
