//! The `EventLog` abstraction: an append-only, sequenced, subject-addressed log.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

use crate::error::{Error, Result};
use crate::event::{Envelope, UnixMillis};
use crate::subject::Streams;

/// Header names the registry sets on every message.
pub mod headers {
    /// JetStream's deduplication header: a message id seen within the duplicate window is
    /// stored once.
    pub const MSG_ID: &str = "Nats-Msg-Id";
    /// The envelope's event type, so consumers can route without decoding the body.
    pub const EVENT_TYPE: &str = "Registry-Event-Type";
    /// The envelope's schema version.
    pub const SCHEMA_VERSION: &str = "Registry-Schema-Version";
    /// W3C trace context of the command that caused the event.
    pub const TRACEPARENT: &str = "traceparent";
    /// W3C trace state accompanying `traceparent`.
    pub const TRACESTATE: &str = "tracestate";
}

/// Which of the registry's two streams an operation addresses (see [`crate::subject`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamKind {
    /// Instance and engine events: the replayable history.
    Events,
    /// Heartbeat batches: high volume, bounded retention.
    Heartbeats,
}

/// A message to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Append {
    /// Subject to publish on; must belong to the addressed stream.
    pub subject: String,
    /// Message body.
    pub payload: Bytes,
    /// Deduplication id: a second append with the same id inside the duplicate window returns
    /// the first one's sequence with [`Ack::duplicate`] set and stores nothing.
    pub msg_id: Option<String>,
    /// Optimistic concurrency: append only if the last message on `subject` has this sequence
    /// (0: no message on the subject yet); otherwise fail with [`Error::Conflict`].
    pub expected_last_subject_sequence: Option<u64>,
    /// Further headers (trace context, event type).
    pub headers: Vec<(String, String)>,
}

impl Append {
    /// A plain append of `payload` on `subject`.
    pub fn new(subject: impl Into<String>, payload: impl Into<Bytes>) -> Append {
        Append {
            subject: subject.into(),
            payload: payload.into(),
            msg_id: None,
            expected_last_subject_sequence: None,
            headers: Vec::new(),
        }
    }

    /// The append of an envelope on its instance subject (or `subject` when given), with the
    /// event id as message id and the type headers set.
    pub fn event(streams: &Streams, envelope: &Envelope) -> Result<Append> {
        let subject = streams.instance_subject(
            &envelope.namespace,
            &envelope.service,
            &envelope.instance_id,
        );
        Append::event_on(subject, envelope)
    }

    /// The append of an envelope on an explicit subject.
    pub fn event_on(subject: impl Into<String>, envelope: &Envelope) -> Result<Append> {
        let event_type = envelope.event_type();
        let mut append = Append::new(subject, envelope.encode()?);
        append.msg_id = Some(envelope.event_id.clone());
        append.headers.push((
            headers::EVENT_TYPE.to_owned(),
            event_type.as_str().to_owned(),
        ));
        append.headers.push((
            headers::SCHEMA_VERSION.to_owned(),
            event_type.schema_version().to_string(),
        ));
        Ok(append)
    }

    /// Sets the deduplication id.
    pub fn with_msg_id(mut self, msg_id: impl Into<String>) -> Append {
        self.msg_id = Some(msg_id.into());
        self
    }

    /// Sets the expected last sequence on the subject.
    pub fn expecting_last_subject_sequence(mut self, sequence: u64) -> Append {
        self.expected_last_subject_sequence = Some(sequence);
        self
    }

    /// Adds a header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Append {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// The log's acknowledgement of an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// Stream sequence of the stored message (of the original, for a duplicate).
    pub sequence: u64,
    /// True when the message id had been seen and nothing new was stored.
    pub duplicate: bool,
}

/// A stored message, as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Stream sequence: 1 for the first message, increasing by one per stored message.
    pub sequence: u64,
    /// Subject it was appended on.
    pub subject: String,
    /// Body.
    pub payload: Bytes,
    /// Headers, in the order they were set (the message id among them when one was given).
    pub headers: Vec<(String, String)>,
    /// When the log stored it, by the log's clock.
    pub stored_at_ms: UnixMillis,
}

impl Record {
    /// First value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Decodes the body as an event envelope.
    pub fn decode(&self) -> Result<Envelope> {
        Envelope::decode(&self.payload).map_err(|error| match error {
            Error::Malformed(detail) => {
                Error::Malformed(format!("sequence {}: {detail}", self.sequence))
            }
            other => other,
        })
    }
}

/// An endless, ordered stream of records: it yields what is stored, then follows new appends.
pub type RecordStream = BoxStream<'static, Result<Record>>;

/// An append-only log of the registry's events. Implemented over JetStream
/// ([`crate::JetStreamLog`]) and in memory ([`crate::MemoryLog`]); both pass the suite in
/// `conformance`.
#[async_trait]
pub trait EventLog: Send + Sync + std::fmt::Debug + 'static {
    /// The stream and subject names this log uses.
    fn streams(&self) -> &Streams;

    /// Creates the streams, or brings their configuration up to date. Idempotent.
    async fn ensure_streams(&self) -> Result<()>;

    /// Appends one message and returns only once the log has durably acknowledged it.
    async fn append(&self, stream: StreamKind, append: Append) -> Result<Ack>;

    /// Appends several messages with their acknowledgements in flight together, returning one
    /// result per message in order. Messages are stored in order; with no message id or
    /// expected sequence they all succeed or fail independently.
    async fn append_many(&self, stream: StreamKind, appends: Vec<Append>) -> Vec<Result<Ack>>;

    /// Reads the stream in order from `from_sequence` (1 or 0: the start), restricted to subjects
    /// matching `filter` when given, then keeps following new appends.
    async fn replay(
        &self,
        stream: StreamKind,
        from_sequence: u64,
        filter: Option<&str>,
    ) -> Result<RecordStream>;

    /// Opens (or creates) the durable consumer `name`. A new consumer starts at `from_sequence`
    /// (0: the start); an existing one resumes after its acknowledged position, and whatever it
    /// delivered but was never acknowledged is delivered again.
    async fn durable(
        &self,
        stream: StreamKind,
        name: &str,
        filter: Option<&str>,
        from_sequence: u64,
    ) -> Result<Box<dyn DurableConsumer>>;

    /// Sequence of the last stored message in the stream (0 when empty).
    async fn last_sequence(&self, stream: StreamKind) -> Result<u64>;

    /// The last message on `subject`, if any.
    async fn last_for_subject(&self, stream: StreamKind, subject: &str) -> Result<Option<Record>>;
}

/// A durable, acknowledged cursor over a stream.
#[async_trait]
pub trait DurableConsumer: Send + std::fmt::Debug {
    /// Waits up to `wait` for the next record, then returns it with whatever else is ready
    /// right away, at most `max` records, in stream order. Empty after `wait` with nothing new.
    async fn fetch(&mut self, max: usize, wait: Duration) -> Result<Vec<Record>>;

    /// Acknowledges every delivered record up to and including `sequence`. Returns once the
    /// log has recorded it: a consumer of the same name opened afterwards starts after it.
    async fn ack_through(&mut self, sequence: u64) -> Result<()>;
}
