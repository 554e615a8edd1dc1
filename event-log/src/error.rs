//! Errors of the event log and of event decoding.

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong when appending, reading or decoding events.
///
/// How a caller should react is documented per variant.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The log could not be reached or did not answer in time. Transient: retry with backoff;
    /// API callers should map it to UNAVAILABLE. Nothing was appended *as far as the caller can
    /// know*: retry with the same message id so that a late success is deduplicated.
    #[error("event log unavailable: {0}")]
    Unavailable(String),
    /// An optimistic-concurrency append found another event on the subject first. Re-read the
    /// state and retry the command (API callers: ABORTED).
    #[error("conflict on {subject}: expected last sequence {expected}, the log has moved on")]
    Conflict {
        /// The subject whose last sequence did not match.
        subject: String,
        /// The sequence the caller expected to be the last one on the subject.
        expected: u64,
    },
    /// The stream the operation needs does not exist; call [`crate::EventLog::ensure_streams`].
    #[error("stream {0} not found")]
    StreamNotFound(String),
    /// An event's type is not one this build knows. Stop and surface it; never skip silently.
    #[error("unknown event type {event_type:?}")]
    UnknownEventType {
        /// The type name found in the envelope.
        event_type: String,
    },
    /// An event has a newer schema version than this build understands. Upgrade the reader.
    #[error(
        "event type {event_type} has schema version {found}, this build reads up to {supported}"
    )]
    UnsupportedSchemaVersion {
        /// The event type.
        event_type: String,
        /// The version found in the envelope.
        found: u16,
        /// The newest version this build reads.
        supported: u16,
    },
    /// Bytes that are not a valid envelope (corrupt data or a foreign message on our subjects).
    #[error("malformed event: {0}")]
    Malformed(String),
    /// The server refused the request for a reason that retrying will not fix (bad stream
    /// configuration, permissions, a payload over the server's limit).
    #[error("event log refused the request: {0}")]
    Rejected(String),
}

impl Error {
    /// True when retrying the same operation later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Unavailable(_))
    }
}
