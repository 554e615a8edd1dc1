//! Errors of the store: what went wrong and how a caller should react to each.

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong while migrating, projecting, rebuilding or checking.
///
/// [`Error::is_retryable`] tells transient failures (the projector retries them with backoff)
/// from the ones that need a person.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// PostgreSQL could not be reached, dropped the connection or failed a statement. Transient:
    /// the projector retries with capped backoff; a one-shot caller (`migrate`, `check`,
    /// `rebuild`) should report it and may run again later.
    #[error("PostgreSQL: {0}")]
    Database(#[from] tokio_postgres::Error),
    /// The schema migrations failed or the database holds migrations this build does not know
    /// (a newer build migrated it). Not retried: run the matching build or fix the schema.
    #[error("schema migration: {0}")]
    Migration(#[from] refinery::Error),
    /// The event log failed (unreachable, stream missing). Transient when
    /// [`event_log::Error::is_transient`] says so; the projector retries those.
    #[error("event log: {0}")]
    Log(#[source] event_log::Error),
    /// The event stored at `sequence` cannot be decoded: an unknown event type, a schema version
    /// newer than this build reads, or corrupt bytes. The projector stops here (everything before
    /// `sequence` is applied and checkpointed) instead of skipping it, because every later event
    /// of the same instance would then apply to the wrong state. Upgrade the build, or repair the
    /// stream, then start again.
    #[error("event at stream sequence {sequence} cannot be decoded: {source}")]
    Undecodable {
        /// Stream sequence of the event.
        sequence: u64,
        /// Why decoding failed.
        #[source]
        source: event_log::Error,
    },
    /// The tables are at `applied` but the next event the stream still holds is `found`: the
    /// events in between were removed (a purge) and the tables can no longer equal a fold of the
    /// stream. Not retried: `rebuild` from what the stream holds.
    #[error(
        "events {} to {} are no longer in the stream; the tables (at sequence {applied}) cannot be \
         brought up to date: rebuild them",
        applied + 1,
        found - 1
    )]
    Gap {
        /// Last sequence applied to the tables.
        applied: u64,
        /// First sequence the stream still holds after it.
        found: u64,
    },
    /// The tables claim a position beyond the end of the stream: they were projected from another
    /// stream (or the stream was deleted and recreated). Not retried: point the projector at the
    /// right stream, or `rebuild`.
    #[error(
        "the tables are at sequence {checkpoint} but the event stream ends at {stream_last}: \
         wrong stream, or the stream was recreated; rebuild the tables"
    )]
    AheadOfStream {
        /// The tables' checkpoint.
        checkpoint: u64,
        /// The stream's last sequence.
        stream_last: u64,
    },
    /// A stored row holds something no event could have produced (edited by hand?). Not
    /// retried: run `check`, then `rebuild`.
    #[error("row of instance {instance_id:?} is invalid: {detail}")]
    InvalidRow {
        /// The instance whose rows are invalid.
        instance_id: String,
        /// What is wrong.
        detail: String,
    },
    /// Another rebuild is running against the same database. Wait for it.
    #[error("another rebuild is running on this database")]
    RebuildInProgress,
    /// The configuration is unusable (e.g. an unparsable database URL or a zero batch size).
    #[error("invalid store configuration: {0}")]
    Config(String),
}

impl Error {
    /// True when the same operation may succeed later without anyone changing anything: the
    /// projector retries these with capped backoff and stops on every other error.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Database(_) => true,
            Error::Log(error) => {
                error.is_transient() || matches!(error, event_log::Error::StreamNotFound(_))
            }
            _ => false,
        }
    }
}

impl From<event_log::Error> for Error {
    fn from(error: event_log::Error) -> Error {
        Error::Log(error)
    }
}
