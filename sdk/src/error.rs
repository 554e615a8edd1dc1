//! Errors of the SDK: one [`Error`] type, parameterised by a kind enum per operation, so that a
//! caller can `match err.kind()` over exactly the outcomes that operation can have.
//!
//! | operation                                   | error                |
//! |---------------------------------------------|----------------------|
//! | [`Client::new`](crate::Client::new)          | [`BuildError`]       |
//! | registering (client and provider)           | [`RegisterError`]    |
//! | deregistering                               | [`DeregisterError`]  |
//! | status changes (`update_instance`)          | [`UpdateError`]      |
//! | reads (`get_instance`, listings)             | [`QueryError`]       |
//! | discovery and subscriptions                 | [`DiscoverError`]    |
//! | the event stream ([`Events`](crate::Events)) | [`EventsError`]      |
//!
//! The SDK never panics on what a server sends: a malformed or unexpected answer is a
//! `Protocol` kind, a server-side failure a `Server` kind.

use std::fmt;

use tonic::{Code, Status};

/// One broken input rule reported by the server (from `google.rpc.BadRequest`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The offending field, e.g. `port` or `metadata["k"]`.
    pub field: String,
    /// The rule it breaks, in words.
    pub description: String,
}

/// An SDK error: what went wrong (`kind`), a message, and where it is known, the server's
/// field violations or the event sequence concerned.
#[derive(Debug, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct Error<K>
where
    K: fmt::Debug + fmt::Display,
{
    kind: K,
    message: String,
    violations: Vec<Violation>,
    sequence: Option<u64>,
    code: Option<Code>,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl<K> Error<K>
where
    K: fmt::Debug + fmt::Display + Copy,
{
    /// An error of `kind` with `message`.
    pub fn new(kind: K, message: impl Into<String>) -> Error<K> {
        Error {
            kind,
            message: message.into(),
            violations: Vec::new(),
            sequence: None,
            code: None,
            source: None,
        }
    }

    /// What went wrong; see the kind's documentation for how to react.
    pub fn kind(&self) -> K {
        self.kind
    }

    /// The human-readable detail (without the kind).
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The fields the server refused and why (for `InvalidArgument` kinds; empty otherwise).
    pub fn violations(&self) -> &[Violation] {
        &self.violations
    }

    /// The stream sequence of the event concerned (for [`EventsErrorKind::Decode`]).
    pub fn sequence(&self) -> Option<u64> {
        self.sequence
    }

    /// The gRPC status code the server answered with, when the error came from one.
    pub fn code(&self) -> Option<Code> {
        self.code
    }

    pub(crate) fn with_source(
        mut self,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Error<K> {
        self.source = Some(Box::new(source));
        self
    }

    pub(crate) fn with_sequence(mut self, sequence: u64) -> Error<K> {
        self.sequence = Some(sequence);
        self
    }
}

/// How the SDK classifies a gRPC answer before mapping it to an operation's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    Invalid,
    NotFound,
    Conflict,
    Unavailable,
    Rejected,
    Server,
}

impl Class {
    pub(crate) fn of(code: Code) -> Class {
        match code {
            Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => Class::Invalid,
            Code::NotFound => Class::NotFound,
            Code::Aborted | Code::AlreadyExists => Class::Conflict,
            // Transport failures, a server going away mid-call and timeouts: another attempt
            // (possibly on another server) may succeed.
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
                Class::Unavailable
            }
            Code::ResourceExhausted | Code::PermissionDenied | Code::Unauthenticated => {
                Class::Rejected
            }
            Code::Ok | Code::Internal | Code::Unimplemented | Code::DataLoss => Class::Server,
        }
    }
}

/// Implemented by every per-operation kind: how a gRPC answer maps onto it.
pub(crate) trait Kind:
    fmt::Debug + fmt::Display + Copy + PartialEq + Send + Sync + 'static
{
    fn from_class(class: Class) -> Self;
    fn unavailable() -> Self;
    fn protocol() -> Self;
}

/// The error of operation kind `K` for a gRPC status.
pub(crate) fn from_status<K: Kind>(status: Status) -> Error<K> {
    let kind = K::from_class(Class::of(status.code()));
    let violations = bad_request(&status);
    let mut error = Error::new(kind, format!("{:?}: {}", status.code(), status.message()));
    error.violations = violations;
    error.code = Some(status.code());
    error
}

/// An `Unavailable` error of operation kind `K`.
pub(crate) fn unavailable<K: Kind>(message: impl Into<String>) -> Error<K> {
    Error::new(K::unavailable(), message)
}

/// A `Protocol` error of operation kind `K`: the server's answer made no sense.
pub(crate) fn protocol<K: Kind>(message: impl Into<String>) -> Error<K> {
    Error::new(K::protocol(), message)
}

fn bad_request(status: &Status) -> Vec<Violation> {
    use tonic_types::StatusExt;
    status
        .get_details_bad_request()
        .map(|bad| {
            bad.field_violations
                .into_iter()
                .map(|v| Violation {
                    field: v.field,
                    description: v.description,
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Error of [`Client::new`](crate::Client::new): the configuration cannot work.
pub type BuildError = Error<BuildErrorKind>;
/// Error of registering an instance.
pub type RegisterError = Error<RegisterErrorKind>;
/// Error of deregistering an instance.
pub type DeregisterError = Error<DeregisterErrorKind>;
/// Error of a status change (`update_instance`).
pub type UpdateError = Error<UpdateErrorKind>;
/// Error of a read (`get_instance`, `list_namespaces`, `list_services`).
pub type QueryError = Error<QueryErrorKind>;
/// Error of discovery and subscriptions.
pub type DiscoverError = Error<DiscoverErrorKind>;
/// Error of following the event stream.
pub type EventsError = Error<EventsErrorKind>;

/// Result alias with the SDK's error type for operation kind `K`.
pub type Result<T, K> = std::result::Result<T, Error<K>>;

/// Why a configuration was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum BuildErrorKind {
    /// No server address was given. Configure at least one endpoint.
    #[error("no endpoints")]
    NoEndpoints,
    /// An endpoint is not a valid URI (`http://host:port` or `host:port`). Fix the address.
    #[error("invalid endpoint")]
    InvalidEndpoint,
    /// A setting is out of range (a zero timeout, say). The message names it.
    #[error("invalid configuration")]
    InvalidConfig,
}

/// Why a registration failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum RegisterErrorKind {
    /// The server refused the instance description; [`Error::violations`] names the fields.
    /// Retrying the same request cannot succeed: fix it.
    #[error("invalid instance")]
    InvalidArgument,
    /// No configured server accepted the registration before the retry timeout (all were
    /// unreachable, or their event log was). Retry later; the registration is idempotent.
    #[error("registry unavailable")]
    Unavailable,
    /// The server refused the request for a reason retrying will not fix (too large, not
    /// permitted).
    #[error("rejected")]
    Rejected,
    /// The server failed internally. Retrying may help; report it if it persists.
    #[error("server error")]
    Server,
    /// The server's answer did not make sense (a server bug or a different protocol version).
    #[error("protocol error")]
    Protocol,
    /// The provider has been shut down.
    #[error("provider closed")]
    Closed,
}

/// Why a deregistration failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum DeregisterErrorKind {
    /// The instance is not registered (already deregistered or expired). Usually nothing to do.
    #[error("instance not found")]
    NotFound,
    /// The reference is malformed; [`Error::violations`] says why.
    #[error("invalid reference")]
    InvalidArgument,
    /// Concurrent writes to the instance kept winning. Retry.
    #[error("conflict")]
    Conflict,
    /// No server could be reached before the retry timeout. The instance will expire with its
    /// lease if it is ephemeral; retry to remove it now.
    #[error("registry unavailable")]
    Unavailable,
    /// The server refused the request for a reason retrying will not fix.
    #[error("rejected")]
    Rejected,
    /// The server failed internally.
    #[error("server error")]
    Server,
    /// The server's answer did not make sense.
    #[error("protocol error")]
    Protocol,
    /// The provider has been shut down before it could deregister.
    #[error("provider closed")]
    Closed,
}

/// Why a status change failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum UpdateErrorKind {
    /// The change is malformed; [`Error::violations`] names the fields.
    #[error("invalid update")]
    InvalidArgument,
    /// The instance is not registered.
    #[error("instance not found")]
    NotFound,
    /// The instance changed since `expected_revision` (optimistic concurrency). Re-read it
    /// with `get_instance` and retry with the new revision.
    #[error("conflict")]
    Conflict,
    /// No server could be reached before the retry timeout. Retry later.
    #[error("registry unavailable")]
    Unavailable,
    /// The server refused the request for a reason retrying will not fix.
    #[error("rejected")]
    Rejected,
    /// The server failed internally.
    #[error("server error")]
    Server,
    /// The server's answer did not make sense.
    #[error("protocol error")]
    Protocol,
}

/// Why a read failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum QueryErrorKind {
    /// The request is malformed (a bad name, say); [`Error::violations`] says why.
    #[error("invalid request")]
    InvalidArgument,
    /// The instance is not registered.
    #[error("not found")]
    NotFound,
    /// No server could be reached before the retry timeout.
    #[error("registry unavailable")]
    Unavailable,
    /// The server refused the request for a reason retrying will not fix.
    #[error("rejected")]
    Rejected,
    /// The server failed internally.
    #[error("server error")]
    Server,
    /// The server's answer did not make sense.
    #[error("protocol error")]
    Protocol,
}

/// Why discovery failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum DiscoverErrorKind {
    /// The namespace or service name is invalid; [`Error::violations`] says why.
    #[error("invalid service name")]
    InvalidArgument,
    /// Nothing is cached for the service yet and no server answered within the consumer's
    /// initial wait. Once a service has been seen, discovery keeps answering from the cache
    /// (with its staleness) instead of failing.
    #[error("registry unavailable")]
    Unavailable,
    /// The server refused the request for a reason retrying will not fix.
    #[error("rejected")]
    Rejected,
    /// The server failed internally.
    #[error("server error")]
    Server,
    /// The server's answer did not make sense.
    #[error("protocol error")]
    Protocol,
    /// The consumer has been shut down.
    #[error("consumer closed")]
    Closed,
}

/// Why following the event stream failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum EventsErrorKind {
    /// NATS could not be reached or did not answer in time. Retry; an open stream recovers by
    /// itself when NATS returns.
    #[error("event log unavailable")]
    Unavailable,
    /// The registry's stream does not exist under this prefix: wrong prefix, or no registry
    /// server has started yet.
    #[error("stream not found")]
    StreamNotFound,
    /// One event could not be decoded: an unknown type or a newer schema version (upgrade the
    /// SDK), or malformed bytes. [`Error::sequence`] names it; it is never skipped silently.
    #[error("undecodable event")]
    Decode,
    /// A bad argument (durable name, filter).
    #[error("invalid argument")]
    InvalidArgument,
    /// NATS refused the request (permissions, configuration).
    #[error("rejected")]
    Rejected,
}

macro_rules! grpc_kind {
    ($kind:ident { $($class:ident => $variant:ident),* $(,)? }) => {
        impl Kind for $kind {
            fn from_class(class: Class) -> Self {
                match class {
                    $(Class::$class => $kind::$variant,)*
                }
            }
            fn unavailable() -> Self {
                $kind::Unavailable
            }
            fn protocol() -> Self {
                $kind::Protocol
            }
        }
    };
}

grpc_kind!(RegisterErrorKind {
    Invalid => InvalidArgument,
    // A registration cannot find nothing: a NOT_FOUND is a server misbehaving.
    NotFound => Protocol,
    // The server retries its own optimistic-concurrency conflicts; one reaching us is worth
    // another attempt.
    Conflict => Unavailable,
    Unavailable => Unavailable,
    Rejected => Rejected,
    Server => Server,
});

grpc_kind!(DeregisterErrorKind {
    Invalid => InvalidArgument,
    NotFound => NotFound,
    Conflict => Conflict,
    Unavailable => Unavailable,
    Rejected => Rejected,
    Server => Server,
});

grpc_kind!(UpdateErrorKind {
    Invalid => InvalidArgument,
    NotFound => NotFound,
    Conflict => Conflict,
    Unavailable => Unavailable,
    Rejected => Rejected,
    Server => Server,
});

grpc_kind!(QueryErrorKind {
    Invalid => InvalidArgument,
    NotFound => NotFound,
    Conflict => Server,
    Unavailable => Unavailable,
    Rejected => Rejected,
    Server => Server,
});

grpc_kind!(DiscoverErrorKind {
    Invalid => InvalidArgument,
    NotFound => Protocol,
    Conflict => Server,
    Unavailable => Unavailable,
    Rejected => Rejected,
    Server => Server,
});

impl From<event_log::Error> for EventsError {
    fn from(error: event_log::Error) -> EventsError {
        let kind = match &error {
            event_log::Error::Unavailable(_) => EventsErrorKind::Unavailable,
            event_log::Error::StreamNotFound(_) => EventsErrorKind::StreamNotFound,
            event_log::Error::UnknownEventType { .. }
            | event_log::Error::UnsupportedSchemaVersion { .. }
            | event_log::Error::Malformed(_) => EventsErrorKind::Decode,
            event_log::Error::Conflict { .. } | event_log::Error::Rejected(_) => {
                EventsErrorKind::Rejected
            }
        };
        Error::new(kind, error.to_string()).with_source(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_map_to_each_operations_kinds() {
        let not_found = Status::not_found("gone");
        assert_eq!(
            from_status::<DeregisterErrorKind>(not_found.clone()).kind(),
            DeregisterErrorKind::NotFound
        );
        assert_eq!(
            from_status::<RegisterErrorKind>(not_found).kind(),
            RegisterErrorKind::Protocol
        );
        assert_eq!(
            from_status::<UpdateErrorKind>(Status::aborted("moved on")).kind(),
            UpdateErrorKind::Conflict
        );
        assert_eq!(
            from_status::<DiscoverErrorKind>(Status::unavailable("down")).kind(),
            DiscoverErrorKind::Unavailable
        );
        assert_eq!(
            from_status::<QueryErrorKind>(Status::internal("bug")).kind(),
            QueryErrorKind::Server
        );
        let error = from_status::<RegisterErrorKind>(Status::resource_exhausted("big"));
        assert_eq!(error.kind(), RegisterErrorKind::Rejected);
        assert_eq!(error.code(), Some(Code::ResourceExhausted));
        assert_eq!(error.to_string(), "rejected: ResourceExhausted: big");
    }

    #[test]
    fn bad_request_details_become_violations() {
        use tonic_types::{ErrorDetails, StatusExt};
        let mut details = ErrorDetails::new();
        details.add_bad_request_violation("port", "must be 1..=65535");
        let status = Status::with_error_details(Code::InvalidArgument, "invalid request", details);
        let error = from_status::<RegisterErrorKind>(status);
        assert_eq!(error.kind(), RegisterErrorKind::InvalidArgument);
        assert_eq!(
            error.violations(),
            [Violation {
                field: "port".into(),
                description: "must be 1..=65535".into()
            }]
        );
    }

    #[test]
    fn event_log_errors_keep_their_meaning() {
        let error = EventsError::from(event_log::Error::UnknownEventType {
            event_type: "InstanceTeleported".into(),
        });
        assert_eq!(error.kind(), EventsErrorKind::Decode);
        assert!(std::error::Error::source(&error).is_some());
        assert_eq!(
            EventsError::from(event_log::Error::StreamNotFound("X".into())).kind(),
            EventsErrorKind::StreamNotFound
        );
    }
}
