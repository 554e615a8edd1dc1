//! The registry's gRPC naming API (`registry.v1`) and the pieces of the `registryd` server.
//!
//! A call is validated ([`validate`]), turned into one event appended to the event log, and
//! answered once the log acknowledged it and the in-memory [`read_model`] has applied it.
//! Heartbeats are group-committed ([`heartbeats`]). Reads are served from the read model.
//! Errors map to gRPC status codes in one place ([`error`]).

#![forbid(unsafe_code)]

pub mod convert;
pub mod error;
pub mod heartbeats;
pub mod read_model;
pub mod server;
pub mod service;
pub mod settings;
pub mod validate;

pub use error::{Error, Result};
pub use server::{Config, Server};
