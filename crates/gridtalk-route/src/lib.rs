//! The route stage: Trading Grid events in, rendered WhatsApp messages out on the outbox topic.
//!
//! For each input record, in partition order: decode (either wire format) → validate → drop if
//! its event id was routed within the dedupe window → resolve the partner and the audience of
//! every matching rule in the directory → render the templates → produce to the outbox keyed by the
//! sending phone-number id. Anything that cannot be routed goes to the dead-letter topic with its
//! reason.
//!
//! Guarantees: an input offset is stored only after every record it caused (outbox messages or
//! the dead letter) is acknowledged by the broker, so a crash replays and never loses. Messages
//! about one document keep their order: the input is keyed by correlation key (one partition per
//! document), records are produced in consumption order by an idempotent producer, and the
//! outbox is keyed by sending number. A produce that fails after the producer's own retries
//! stops the stage with an error (the process restarts and replays), never skips.
//!
//! One bad record parks only its own partition: a schema id the registry cannot serve is retried
//! with backoff while the driver pauses that partition (every other partition and topic keeps
//! routing) and is dead-lettered as `registry_unavailable` after `route.registry_wait_max_secs`.

mod clocks;
mod dedupe;
mod lint;
mod quiet;
mod render;
mod stage;
mod strategy;
mod summaries;

pub use clocks::{clock_commands, policy_kind, render_fire};
pub use dedupe::DedupeWindow;
pub use gridtalk_directory::{Contact, Directory, DirectoryFile, Partner, SharedDirectory};
pub use lint::pointer_problems;
pub use quiet::{defer, is_urgent, release_at, time_source};
pub use render::{plan, RouteFailure, RoutePlan};
pub use stage::{run, RouteError};
pub use summaries::{per_summary, render_summary};
