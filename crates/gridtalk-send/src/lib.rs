//! The send stage: rendered messages from the outbox topic to the WhatsApp Cloud API, within
//! Meta's limits, with the sent log as the record of what WhatsApp accepted.
//!
//! Guarantees:
//! - **Within limits.** One throughput limiter for the sending number (the outbox is keyed by
//!   number, so one consumer owns all of a number's sends) and one pair limiter per recipient,
//!   both a configured margin below Meta's limits. A message that must wait, waits; nothing is
//!   dropped for being early.
//! - **Order per recipient, and no recipient blocks another.** Messages to one recipient are sent
//!   one at a time in outbox order (so messages about one document reach a person in event order;
//!   coalescing, below, may reorder messages about different documents);
//!   different recipients are worked concurrently. A message waiting for its recipient's pair
//!   limit, a retry backoff or a halted number holds none of the `send.max_in_flight` places on
//!   the wire, so one busy person never slows the number's others. At most `send.max_queued`
//!   messages wait in memory; beyond that, and while the number is halted, the stage pushes back
//!   and the driver pauses the outbox partitions (the consumer keeps polling and stays in its
//!   group).
//! - **Bursts coalesced, requests never.** With `send.coalesce.window_ms` set, a recipient gets
//!   at most one informational message (one without buttons) per window: the first of a burst
//!   goes at once, the informational messages that come up within the window after it go as one
//!   digest (an approved template) when it ends, in outbox order. A message with buttons asks for
//!   an answer and always goes on its own, ahead of a held digest unless that holds an earlier
//!   message about its document: no message is moved ahead of an earlier one about the same
//!   document (messages about different documents may change order). Each
//!   merged message gets its own sent-log record and sent-index entry (with the digest's wamid),
//!   so a replay of any of them is not sent again. A digest WhatsApp refuses for good is sent as
//!   its messages one by one.
//! - **Nothing sent twice by a rebalance.** A request already on the wire when its partition is
//!   revoked is waited for (up to `kafka.delivery_timeout_ms`) and recorded in the sent index before
//!   the partition moves; nothing of a revoked partition is sent after the revoke began.
//! - **Nothing lost.** An outbox offset is stored only after the message was accepted by WhatsApp
//!   and its sent-log record acknowledged, or after it was dead-lettered. Offsets move only up to
//!   the lowest unfinished message.
//! - **Errors by class.** Retryable errors back off with jitter (the pair limit only delays that
//!   recipient); permanent ones are dead-lettered with Meta's code; sender-fatal ones (expired
//!   token, blocked account) halt every send of the number, raise `gridtalk_send_halted`, and one
//!   message probes periodically (re-reading the token file) until sending works again.
//!
//! - **No replays.** The sent index (partition-local, backed by the compacted `topics.send_index`
//!   changelog, restored before a partition's first record) remembers every accepted message id;
//!   an outbox record replayed after a crash or a rebalance is skipped, not sent again.
//!
//! The one possible duplicate is a send in flight when the process dies: WhatsApp accepted it but
//! the sent index never heard (WhatsApp has no idempotency key). At most `send.max_in_flight`.

mod coalesce;
mod in_doubt;
mod index;
mod limits;
mod stage;
mod strategy;
mod windows;

pub use limits::SendLimits;
pub use stage::{run, SendError};
