//! Following the registry's event stream, for downstream consumers (load balancers, mesh
//! control planes, audit, alerting): every registration, status change, health transition and
//! removal, typed with the `event-log` contract ([`event_log::Envelope`], [`event_log::Event`]).
//!
//! Built on [`event_log::JetStreamLog`]: [`Events::follow`] replays the stream from a sequence
//! with an ephemeral ordered consumer, then follows new events; [`Events::durable`] opens a
//! named durable consumer that resumes after its last acknowledged event across restarts.
//!
//! An event this build cannot read (unknown type, newer schema version, malformed) is reported
//! as an [`EventsErrorKind::Decode`] error naming its sequence, never skipped silently; the
//! caller decides whether to stop or go on.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use event_log::{
    DurableConsumer, Envelope, EventLog, JetStreamConfig, JetStreamLog, Record, RecordStream,
    StreamKind, Streams,
};
use futures::Stream;

use crate::error::{Error, EventsError, EventsErrorKind};

/// The NATS URL `cargo xtask up` uses when `NATS_URL` is not set.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";

/// The stream prefix of a default `registryd` (`--stream-prefix`).
pub const DEFAULT_STREAM_PREFIX: &str = "registry";

/// Which events to follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every event, including engine-wide ones (self-preservation).
    All,
    /// The instance events of one namespace.
    Namespace(String),
    /// The instance events of one service.
    Service {
        /// Namespace.
        namespace: String,
        /// Service.
        service: String,
    },
}

impl Scope {
    /// The instance events of one service.
    ///
    /// ```
    /// let scope = sdk::Scope::service("default", "echo");
    /// assert_eq!(scope, sdk::Scope::Service { namespace: "default".into(), service: "echo".into() });
    /// ```
    pub fn service(namespace: impl Into<String>, service: impl Into<String>) -> Scope {
        Scope::Service {
            namespace: namespace.into(),
            service: service.into(),
        }
    }

    fn filter(&self, streams: &Streams) -> Option<String> {
        match self {
            Scope::All => None,
            Scope::Namespace(namespace) => Some(streams.namespace_filter(namespace)),
            Scope::Service { namespace, service } => {
                Some(streams.service_filter(namespace, service))
            }
        }
    }
}

/// Where to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    /// The first event in the stream.
    Beginning,
    /// The event at this stream sequence (or the first after it that matches the scope).
    Sequence(u64),
    /// Only events appended from now on.
    New,
}

/// One event as stored in the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRecord {
    /// Stream sequence: increases by one per stored event; resume after it.
    pub sequence: u64,
    /// The subject it was stored on (`<prefix>.evt.<ns>.<svc>.<id>` or `<prefix>.sys.<kind>`).
    pub subject: String,
    /// When JetStream stored it, Unix milliseconds.
    pub stored_at_ms: i64,
    /// The decoded event.
    pub envelope: Envelope,
}

fn decode(record: &Record) -> Result<EventRecord, EventsError> {
    match record.decode() {
        Ok(envelope) => Ok(EventRecord {
            sequence: record.sequence,
            subject: record.subject.clone(),
            stored_at_ms: record.stored_at_ms,
            envelope,
        }),
        Err(error) => Err(EventsError::from(error).with_sequence(record.sequence)),
    }
}

/// Access to the registry's event stream in NATS JetStream. Cheap to clone.
///
/// ```no_run
/// # async fn demo() -> Result<(), sdk::EventsError> {
/// use futures::StreamExt;
/// use sdk::{Events, Scope, StartAt};
///
/// let events = Events::connect("nats://127.0.0.1:4222", "registry").await?;
/// let mut stream = events.follow(Scope::service("default", "echo"), StartAt::Beginning).await?;
/// while let Some(event) = stream.next().await {
///     let event = event?;
///     println!("#{} {} {}", event.sequence, event.envelope.event_type(), event.envelope.instance_id);
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Events {
    log: JetStreamLog,
}

impl Events {
    /// Connects to NATS at `nats_url` (comma-separated for a cluster) for the registry whose
    /// `registryd --stream-prefix` is `stream_prefix`. Fails with
    /// [`EventsErrorKind::Unavailable`] when NATS cannot be reached within a few seconds.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), sdk::EventsError> {
    /// let events = sdk::Events::connect(sdk::DEFAULT_NATS_URL, sdk::DEFAULT_STREAM_PREFIX).await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect(nats_url: &str, stream_prefix: &str) -> Result<Events, EventsError> {
        let log = JetStreamLog::connect(
            nats_url,
            Streams::new(stream_prefix),
            JetStreamConfig::default(),
        )
        .await?;
        Ok(Events { log })
    }

    /// Uses an existing event log connection.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// let log = event_log::JetStreamLog::connect(
    ///     "nats://127.0.0.1:4222",
    ///     event_log::Streams::new("registry"),
    ///     Default::default(),
    /// )
    /// .await?;
    /// let events = sdk::Events::from_log(log);
    /// # Ok(()) }
    /// ```
    pub fn from_log(log: JetStreamLog) -> Events {
        Events { log }
    }

    /// The stream and subject names in use.
    pub fn streams(&self) -> &Streams {
        self.log.streams()
    }

    /// Sequence of the newest event in the stream (0 when empty).
    ///
    /// ```no_run
    /// # async fn demo(events: sdk::Events) -> Result<(), sdk::EventsError> {
    /// println!("{} events so far", events.last_sequence().await?);
    /// # Ok(()) }
    /// ```
    pub async fn last_sequence(&self) -> Result<u64, EventsError> {
        Ok(self.log.last_sequence(StreamKind::Events).await?)
    }

    async fn start_sequence(&self, start: StartAt) -> Result<u64, EventsError> {
        Ok(match start {
            StartAt::Beginning => 1,
            StartAt::Sequence(sequence) => sequence.max(1),
            StartAt::New => self.last_sequence().await? + 1,
        })
    }

    /// Follows the events of `scope` from `start`, in stream order, without end. The stream
    /// survives NATS reconnects by itself. Nothing is remembered between runs: note the last
    /// sequence you processed and start after it next time, or use [`Events::durable`].
    ///
    /// ```no_run
    /// # async fn demo(events: sdk::Events) -> Result<(), sdk::EventsError> {
    /// use futures::StreamExt;
    /// let mut stream = events.follow(sdk::Scope::All, sdk::StartAt::Sequence(42)).await?;
    /// if let Some(first) = stream.next().await {
    ///     assert!(first?.sequence >= 42);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn follow(&self, scope: Scope, start: StartAt) -> Result<EventStream, EventsError> {
        let from = self.start_sequence(start).await?;
        let filter = scope.filter(self.log.streams());
        let records = self
            .log
            .replay(StreamKind::Events, from, filter.as_deref())
            .await?;
        Ok(EventStream { records })
    }

    /// Opens (or creates) the durable consumer `name`: a new one starts at `start`; an
    /// existing one resumes after the last event acknowledged with
    /// [`DurableEvents::ack_through`], whatever `start` says. One process should own a
    /// durable name at a time.
    ///
    /// ```no_run
    /// # async fn demo(events: sdk::Events) -> Result<(), sdk::EventsError> {
    /// use std::time::Duration;
    /// let mut audit = events.durable("audit", sdk::Scope::All, sdk::StartAt::Beginning).await?;
    /// loop {
    ///     let batch = audit.next_batch(100, Duration::from_secs(5)).await?;
    ///     for event in &batch {
    ///         println!("#{} {}", event.sequence, event.envelope.event_type());
    ///     }
    ///     if let Some(last) = batch.last() {
    ///         audit.ack_through(last.sequence).await?;
    ///     }
    /// }
    /// # }
    /// ```
    pub async fn durable(
        &self,
        name: &str,
        scope: Scope,
        start: StartAt,
    ) -> Result<DurableEvents, EventsError> {
        let valid = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid {
            return Err(Error::new(
                EventsErrorKind::InvalidArgument,
                format!("durable name {name:?} must be letters, digits, '-' or '_'"),
            ));
        }
        let from = self.start_sequence(start).await?;
        let filter = scope.filter(self.log.streams());
        let consumer = self
            .log
            .durable(StreamKind::Events, name, filter.as_deref(), from)
            .await?;
        Ok(DurableEvents {
            consumer,
            pending: VecDeque::new(),
        })
    }
}

/// An endless stream of events in order, from [`Events::follow`]. Each item is an event, or an
/// error: [`EventsErrorKind::Decode`] for one event this build cannot read (the stream goes on
/// after it), [`EventsErrorKind::Unavailable`] for a transport problem.
pub struct EventStream {
    records: RecordStream,
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStream").finish_non_exhaustive()
    }
}

impl Stream for EventStream {
    type Item = Result<EventRecord, EventsError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.records.as_mut().poll_next(cx).map(|next| {
            next.map(|record| match record {
                Ok(record) => decode(&record),
                Err(error) => Err(EventsError::from(error)),
            })
        })
    }
}

/// A durable, acknowledged cursor over the event stream, from [`Events::durable`].
#[derive(Debug)]
pub struct DurableEvents {
    consumer: Box<dyn DurableConsumer>,
    /// Delivered records not yet handed out (those after an undecodable one).
    pending: VecDeque<Record>,
}

impl DurableEvents {
    /// Waits up to `wait` for events, then returns what is ready, at most `max`, in order
    /// (empty after `wait` with nothing new). When an event cannot be decoded, the events
    /// before it are returned first and the next call fails with
    /// [`EventsErrorKind::Decode`] naming its sequence; acknowledge through that sequence to
    /// skip it deliberately, and the calls after go on with the rest.
    ///
    /// ```no_run
    /// # async fn demo(mut durable: sdk::DurableEvents) -> Result<(), sdk::EventsError> {
    /// use std::time::Duration;
    /// match durable.next_batch(100, Duration::from_secs(1)).await {
    ///     Ok(batch) => println!("{} events", batch.len()),
    ///     Err(e) if e.kind() == sdk::EventsErrorKind::Decode => {
    ///         eprintln!("cannot read event {:?}: {e}", e.sequence());
    ///     }
    ///     Err(e) => return Err(e),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn next_batch(
        &mut self,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<EventRecord>, EventsError> {
        let max = max.max(1);
        if self.pending.is_empty() {
            self.pending.extend(self.consumer.fetch(max, wait).await?);
        }
        let mut batch = Vec::new();
        while batch.len() < max {
            let Some(record) = self.pending.front() else {
                break;
            };
            match decode(record) {
                Ok(event) => {
                    batch.push(event);
                    self.pending.pop_front();
                }
                Err(error) if batch.is_empty() => {
                    self.pending.pop_front();
                    return Err(error);
                }
                // Hand out what came before it; the error is the next call's answer.
                Err(_) => break,
            }
        }
        Ok(batch)
    }

    /// Acknowledges every event up to and including `sequence`: after a restart the durable
    /// consumer resumes after it.
    ///
    /// ```no_run
    /// # async fn demo(mut durable: sdk::DurableEvents) -> Result<(), sdk::EventsError> {
    /// durable.ack_through(42).await?;
    /// # Ok(()) }
    /// ```
    pub async fn ack_through(&mut self, sequence: u64) -> Result<(), EventsError> {
        Ok(self.consumer.ack_through(sequence).await?)
    }
}
