//! The health engine: TTL leases from heartbeats, and the transitions they cause.
//!
//! Two layers:
//!
//! * [`leases`], the pure core: a lease table and its timers as a plain state machine, fed with
//!   events, heartbeats and the current time. No IO, no clock, no runtime: every rule is tested
//!   with a virtual clock and against a reference model.
//! * [`HealthEngine`], the thin shell: it replays the events stream and the heartbeat stream of an
//!   [`event_log::EventLog`] into the core, wakes it precisely when its next timer is due, and
//!   appends the transitions it decides (pipelined, retried, deduplicated by deterministic event
//!   ids and guarded by expected subject sequences). [`Handle`] exposes its counts for metrics.
//!   Each event it applies gets a span that joins the trace the event's headers carry; each
//!   group of transitions it appends gets one.

#![forbid(unsafe_code)]

mod config;
mod engine;
pub mod error;
pub mod leases;

pub use config::{Config, SelfPreservation};
pub use engine::{Handle, HealthEngine, Stats, TransitionCounts};
pub use error::{Error, Result};
