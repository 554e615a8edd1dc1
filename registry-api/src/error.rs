//! API errors and their one mapping to gRPC status codes.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// Result alias of the API layer.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One broken input rule: the field (dotted path, e.g. `metadata["k"]` or `instances[3].id`) and
/// the rule in words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The offending field.
    pub field: String,
    /// The rule it breaks.
    pub description: String,
}

impl Violation {
    /// A violation of `field`.
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Violation {
        Violation {
            field: field.into(),
            description: description.into(),
        }
    }
}

/// What an API call can fail with. Each variant maps to exactly one gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input (INVALID_ARGUMENT, with a google.rpc.BadRequest detail). Nothing was recorded;
    /// fix the request.
    #[error("invalid request: {}", describe(.0))]
    Invalid(Vec<Violation>),
    /// The instance is not registered (NOT_FOUND). Heartbeat callers should register again.
    #[error("{0}")]
    NotFound(String),
    /// Another write to the instance came first (ABORTED). Re-read and retry.
    #[error("{0}")]
    Conflict(String),
    /// The event log is unreachable or timed out (UNAVAILABLE). Retry with backoff, with the
    /// same request id.
    #[error("{0}")]
    Unavailable(String),
    /// A request over a size limit (RESOURCE_EXHAUSTED).
    #[error("{0}")]
    TooLarge(String),
    /// A bug or an event the server cannot read (INTERNAL).
    #[error("{0}")]
    Internal(String),
}

fn describe(violations: &[Violation]) -> String {
    violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ")
}

impl Error {
    /// A single-field INVALID_ARGUMENT.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Error {
        Error::Invalid(vec![Violation::new(field, description)])
    }
}

impl From<event_log::Error> for Error {
    fn from(error: event_log::Error) -> Error {
        match error {
            event_log::Error::Unavailable(detail) => {
                Error::Unavailable(format!("event log unavailable: {detail}"))
            }
            event_log::Error::Conflict { subject, expected } => Error::Conflict(format!(
                "instance changed concurrently (subject {subject}, expected revision {expected}): \
                 re-read and retry"
            )),
            event_log::Error::StreamNotFound(stream) => Error::Unavailable(format!(
                "event stream {stream} missing; is the server set up?"
            )),
            event_log::Error::Rejected(detail) => Error::TooLarge(detail),
            other => Error::Internal(other.to_string()),
        }
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Status {
        let message = error.to_string();
        match error {
            Error::Invalid(violations) => {
                let mut details = ErrorDetails::new();
                for violation in violations {
                    details.add_bad_request_violation(violation.field, violation.description);
                }
                Status::with_error_details(Code::InvalidArgument, message, details)
            }
            Error::NotFound(_) => Status::not_found(message),
            Error::Conflict(_) => Status::aborted(message),
            Error::Unavailable(_) => Status::unavailable(message),
            Error::TooLarge(_) => Status::resource_exhausted(message),
            Error::Internal(_) => Status::internal(message),
        }
    }
}
