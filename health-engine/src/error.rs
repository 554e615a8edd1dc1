//! Errors of the health engine, and how a caller should handle each.

use event_log::StreamKind;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why the engine could not be built or stopped running.
///
/// Transient log failures (NATS unreachable, a timed-out acknowledgement) never surface here:
/// the engine retries them with a capped backoff for as long as it runs, because dropping a
/// transition is never an option. What does surface needs a person.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is out of range. Fix the configuration; nothing was started.
    #[error("invalid health-engine configuration: {0}")]
    InvalidConfig(String),
    /// The log refused an operation for a reason retrying will not fix (missing stream, bad
    /// stream configuration, permissions). Fix the deployment and restart the engine.
    #[error("event log: {0}")]
    Log(#[source] event_log::Error),
    /// A record on one of the streams cannot be decoded (unknown event type, newer schema
    /// version, corrupt bytes). The engine stops rather than skip something that may change a
    /// lease: upgrade the engine (newer writer) or inspect the record at `sequence`.
    #[error("undecodable record {sequence} on the {stream:?} stream: {source}")]
    Undecodable {
        /// The stream.
        stream: StreamKind,
        /// Its sequence.
        sequence: u64,
        /// The decoding error.
        #[source]
        source: event_log::Error,
    },
    /// A decodable event that should change a lease cannot (for example a registration whose
    /// instance id is not an instance id). A writer broke the event contract: fix it.
    #[error("invalid event: {0}")]
    InvalidEvent(#[from] crate::leases::InvalidEvent),
}
