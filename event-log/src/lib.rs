//! The registry's event contract and the log it lives in.
//!
//! Every command the registry accepts (register, heartbeat, status change, deregister) and every
//! decision the health engine takes becomes an [`Envelope`] appended to an [`EventLog`]. This crate
//! owns three things and nothing else:
//!
//! * the **domain events** ([`event`]): past-tense, versioned serde types inside an envelope, with
//!   their JSON encoding, which is the public contract for downstream consumers;
//! * the **subject layout** ([`subject`]): how namespaces, services and instances map onto NATS
//!   subjects so that a consumer can filter by namespace and service, whatever characters the
//!   names contain;
//! * the **log abstraction** ([`EventLog`]) with a JetStream implementation ([`JetStreamLog`]) and an
//!   in-memory one for the embedded mode ([`MemoryLog`]), both held to one conformance suite
//!   (`conformance`, behind the `test-util` feature).
//!
//! It also holds the canonical [`fold`] of instance events into instance state.
//!
//! It knows nothing of protobuf, SQL or leases.

#![forbid(unsafe_code)]

pub mod error;
pub mod event;
pub mod fold;
pub mod id;
mod jetstream;
mod log;
mod memory;
pub mod subject;
pub mod trace_context;

#[cfg(feature = "test-util")]
pub mod conformance;

pub use error::{Error, Result};
pub use event::{Envelope, Event, EventType};
pub use id::instance_id;
pub use jetstream::{JetStreamConfig, JetStreamLog};
pub use log::{Ack, Append, DurableConsumer, EventLog, Record, RecordStream, StreamKind, headers};
pub use memory::{MemoryConfig, MemoryLog};
pub use subject::Streams;
