//! PostgreSQL projections of the registry's event stream.
//!
//! Operators query, report on and join the tables this crate maintains, so they must always equal
//! what the event stream says. The crate owns:
//!
//! * the **schema** ([`migrate`], refinery migrations under `migrations/`) in the PostgreSQL
//!   schema [`SCHEMA`]: `instance` (soft-deleted through `deleted_at`), `health_check`,
//!   `instance_metadata`, the `service_summary` view and `projector_checkpoint`;
//! * the **projector** ([`Projector`], [`ProjectorHandle`]): a durable JetStream consumer that
//!   applies events in stream order, in batches, one transaction per batch with the checkpoint
//!   in it, through the canonical [`event_log::fold::Fold`], exactly once across crashes and
//!   outages (the [`projector`] module documents how, and the choices on heartbeats and
//!   undecodable events); each event it applies gets a span in the trace its
//!   headers carry (W3C trace context), open until its batch commits;
//! * **rebuild** ([`rebuild()`]): the whole stream into fresh tables, swapped in atomically;
//! * the **consistency check** ([`check()`]): an independent fold of the stream compared with the
//!   tables, listing every difference.
//!
//! It is the only crate that knows SQL. It knows nothing of protobuf, gRPC or leases.

#![forbid(unsafe_code)]

pub mod check;
mod config;
pub mod error;
pub mod projector;
pub mod rebuild;
mod replay;
mod rows;
mod schema;
mod writer;

#[cfg(feature = "test-util")]
pub mod workload;

pub use check::{Difference, Report, check};
pub use config::Config;
pub use error::{Error, Result};
pub use projector::{Progress, Projector, ProjectorHandle, Status};
pub use rebuild::{RebuildSummary, rebuild};
pub use schema::{SCHEMA, migrate};
