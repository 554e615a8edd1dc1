//! The registry's gRPC naming API (`registry.v1`) and the pieces of the `registryd` server.
//!
//! A call is validated ([`validate`]), turned into one event appended to the event log, and
//! answered once the log acknowledged it and the in-memory [`read_model`] has applied it.
//! Heartbeats are group-committed ([`heartbeats`]). Reads are served from the read model.
//! Errors map to gRPC status codes in one place ([`error`]).
//!
//! Observability: every call passes through [`rpc`] (a span and the call-duration histogram),
//! [`metrics`] holds the instruments and the Prometheus endpoint, [`instrumented_log`] measures
//! appends, [`telemetry`] sets up logs, metrics and traces for `registryd`, whose layered
//! configuration is [`settings`].

#![forbid(unsafe_code)]

pub mod convert;
pub mod error;
pub mod heartbeats;
pub mod instrumented_log;
pub mod metrics;
pub mod read_model;
pub mod rpc;
pub mod server;
pub mod service;
pub mod settings;
pub mod telemetry;
pub mod validate;

pub use error::{Error, Result};
pub use server::{Config, Server};
