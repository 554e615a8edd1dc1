//! The JetStream implementation of [`EventLog`].

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer, stream};
use async_trait::async_trait;
use backon::{ExponentialBuilder, Retryable as _};
use futures::{FutureExt, StreamExt};

use crate::error::{Error, Result};
use crate::log::{Ack, Append, DurableConsumer, EventLog, Record, RecordStream, StreamKind};
use crate::subject::Streams;

/// Stream settings for [`JetStreamLog`].
#[derive(Debug, Clone)]
pub struct JetStreamConfig {
    /// How long JetStream remembers message ids for deduplication.
    pub duplicate_window: Duration,
    /// How long heartbeat batches are kept. Restart recovery only needs the last beat of each
    /// live instance, so this only has to cover the longest `ratio x TTL`.
    pub heartbeat_max_age: Duration,
    /// Upper bound on the heartbeat stream's size, in bytes.
    pub heartbeat_max_bytes: i64,
    /// Stream replicas (1 for a single server, 3 for a cluster).
    pub replicas: usize,
    /// How long a publish waits for JetStream's acknowledgement.
    pub ack_timeout: Duration,
}

impl Default for JetStreamConfig {
    fn default() -> Self {
        JetStreamConfig {
            duplicate_window: Duration::from_secs(120),
            heartbeat_max_age: Duration::from_secs(15 * 60),
            heartbeat_max_bytes: 1 << 30,
            replicas: 1,
            ack_timeout: Duration::from_secs(5),
        }
    }
}

/// How many publishes may await their acknowledgement at once, over all callers. The client
/// holds a permit per unacknowledged publish and blocks the next publish when none is left.
const MAX_ACKS_IN_FLIGHT: usize = 4096;

/// How many publishes one `append_many` sends before awaiting their acknowledgements.
const ACK_WINDOW: usize = 1024;

/// [`EventLog`] on NATS JetStream. Cheap to clone.
#[derive(Debug, Clone)]
pub struct JetStreamLog {
    client: async_nats::Client,
    context: jetstream::Context,
    /// Our count of the client's ack permits. A window takes all of its permits at once before
    /// it sends anything, so callers never hold some permits each while waiting for more and
    /// starve each other forever (a single batch larger than the client's limit did). One
    /// exception, bounded: a caller dropped mid-window hands its unawaited acknowledgements to
    /// the client, which keeps their permits until they arrive or time out (`ack_timeout`)
    /// while ours are already free, so a publish may briefly wait inside the client.
    acks_in_flight: Arc<tokio::sync::Semaphore>,
    streams: Streams,
    config: JetStreamConfig,
}

/// The server's "error creating store for stream" (10049): it reports some passing failures
/// only this way (the cause goes to its own log), and the same request usually succeeds a
/// moment later. Seen once in CI on a private nats-server 2.9.10.
fn store_creation_failed(error: &jetstream::context::CreateStreamError) -> bool {
    matches!(
        error.kind(),
        jetstream::context::CreateStreamErrorKind::JetStream(error)
            if error.error_code() == jetstream::ErrorCode::STREAM_CREATE
    )
}

fn unavailable(error: impl std::fmt::Display) -> Error {
    Error::Unavailable(error.to_string())
}

impl JetStreamLog {
    /// Connects to `url` (retrying in the background after the first connection is lost).
    pub async fn connect(url: &str, streams: Streams, config: JetStreamConfig) -> Result<Self> {
        let client = async_nats::ConnectOptions::new()
            .name("registry")
            .connection_timeout(Duration::from_secs(2))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connect(url)
            .await
            .map_err(unavailable)?;
        // `retry_on_initial_connect` returns before the first connection; wait for it briefly so
        // that a wrong URL is reported at start-up instead of as failing calls.
        let log = JetStreamLog::with_client(client, streams, config);
        log.wait_connected(Duration::from_secs(5)).await?;
        Ok(log)
    }

    /// Wraps an existing connection.
    pub fn with_client(
        client: async_nats::Client,
        streams: Streams,
        config: JetStreamConfig,
    ) -> Self {
        let context = jetstream::ContextBuilder::new()
            .timeout(config.ack_timeout)
            .max_ack_inflight(MAX_ACKS_IN_FLIGHT)
            .build(client.clone());
        JetStreamLog {
            client,
            context,
            acks_in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_ACKS_IN_FLIGHT)),
            streams,
            config,
        }
    }

    /// The underlying NATS connection.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// Waits until the connection is up, at most `limit`.
    pub async fn wait_connected(&self, limit: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + limit;
        while !self.is_connected() {
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Unavailable("NATS is not reachable".into()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// True while the connection to NATS is up.
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    fn stream_name(&self, stream: StreamKind) -> String {
        match stream {
            StreamKind::Events => self.streams.events_stream(),
            StreamKind::Heartbeats => self.streams.heartbeats_stream(),
        }
    }

    fn stream_config(&self, kind: StreamKind) -> stream::Config {
        let common = stream::Config {
            name: self.stream_name(kind),
            storage: stream::StorageType::File,
            num_replicas: self.config.replicas,
            duplicate_window: self.config.duplicate_window,
            allow_direct: true,
            ..Default::default()
        };
        match kind {
            StreamKind::Events => stream::Config {
                subjects: self.streams.events_subjects(),
                description: Some("Service registry: instance and engine events".into()),
                deny_delete: true,
                deny_purge: false,
                ..common
            },
            StreamKind::Heartbeats => stream::Config {
                subjects: self.streams.heartbeats_subjects(),
                description: Some("Service registry: heartbeat batches".into()),
                max_age: self.config.heartbeat_max_age,
                max_bytes: self.config.heartbeat_max_bytes,
                discard: stream::DiscardPolicy::Old,
                ..common
            },
        }
    }

    async fn stream(&self, kind: StreamKind) -> Result<stream::Stream> {
        let name = self.stream_name(kind);
        self.context
            .get_stream(&name)
            .await
            .map_err(|error| match error.kind() {
                jetstream::context::GetStreamErrorKind::JetStream(inner)
                    if inner.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
                {
                    Error::StreamNotFound(name)
                }
                _ => unavailable(error),
            })
    }

    fn publish_message(append: Append) -> (String, jetstream::message::PublishMessage) {
        let mut headers = HeaderMap::new();
        for (name, value) in &append.headers {
            headers.append(name.as_str(), value.as_str());
        }
        let mut message = jetstream::message::PublishMessage::build()
            .payload(append.payload)
            .headers(headers);
        if let Some(id) = &append.msg_id {
            message = message.message_id(id);
        }
        if let Some(expected) = append.expected_last_subject_sequence {
            message = message.expected_last_subject_sequence(expected);
        }
        (append.subject, message)
    }

    fn map_publish_error(
        error: jetstream::context::PublishError,
        subject: &str,
        expected: Option<u64>,
    ) -> Error {
        use jetstream::context::PublishErrorKind as Kind;
        match error.kind() {
            Kind::WrongLastSequence => Error::Conflict {
                subject: subject.to_owned(),
                expected: expected.unwrap_or(0),
            },
            Kind::StreamNotFound => {
                Error::StreamNotFound(format!("no stream for subject {subject}"))
            }
            Kind::MaxPayloadExceeded => Error::Rejected(error.to_string()),
            _ => unavailable(error),
        }
    }
}

fn record_from_message(message: &async_nats::Message, sequence: u64, stored_at_ms: i64) -> Record {
    let headers = message
        .headers
        .as_ref()
        .map(|headers| {
            headers
                .iter()
                .flat_map(|(name, values)| {
                    values
                        .iter()
                        .map(move |value| (name.to_string(), value.as_str().to_owned()))
                })
                .collect()
        })
        .unwrap_or_default();
    Record {
        sequence,
        subject: message.subject.to_string(),
        payload: message.payload.clone(),
        headers,
        stored_at_ms,
    }
}

fn jetstream_record(message: &jetstream::Message) -> Result<Record> {
    let info = message
        .info()
        .map_err(|e| Error::Malformed(format!("ack subject: {e}")))?;
    let stored_at_ms = (info.published.unix_timestamp_nanos() / 1_000_000) as i64;
    Ok(record_from_message(
        &message.message,
        info.stream_sequence,
        stored_at_ms,
    ))
}

#[async_trait]
impl EventLog for JetStreamLog {
    fn streams(&self) -> &Streams {
        &self.streams
    }

    async fn ensure_streams(&self) -> Result<()> {
        for kind in [StreamKind::Events, StreamKind::Heartbeats] {
            let config = self.stream_config(kind);
            let name = self.stream_name(kind);
            (|| self.context.create_or_update_stream(config.clone()))
                .retry(
                    ExponentialBuilder::default()
                        .with_min_delay(Duration::from_millis(50))
                        .with_max_delay(Duration::from_secs(1))
                        .with_max_times(6)
                        .with_jitter(),
                )
                .when(store_creation_failed)
                .notify(|error, delay| {
                    tracing::warn!(stream = %name, %error, retry_in_ms = delay.as_millis() as u64,
                        "JetStream could not create the stream's store; retrying");
                })
                .await
                .map_err(|e| Error::Rejected(format!("stream {name}: {e}")))?;
        }
        Ok(())
    }

    async fn append(&self, stream: StreamKind, append: Append) -> Result<Ack> {
        let mut results = self.append_many(stream, vec![append]).await;
        results
            .pop()
            .unwrap_or_else(|| Err(Error::Unavailable("no acknowledgement".into())))
    }

    async fn append_many(&self, _stream: StreamKind, appends: Vec<Append>) -> Vec<Result<Ack>> {
        if !self.is_connected() {
            // Fail fast: the client would otherwise buffer and wait out the ack timeout.
            return appends
                .iter()
                .map(|_| Err(unavailable("not connected to NATS")))
                .collect();
        }
        // Publish a window, then await its acknowledgements together: one round trip per
        // window instead of one per message, in order.
        let mut results = Vec::with_capacity(appends.len());
        let mut appends = appends.into_iter().peekable();
        while appends.peek().is_some() {
            let window: Vec<Append> = appends.by_ref().take(ACK_WINDOW).collect();
            let permits = u32::try_from(window.len()).unwrap_or(u32::MAX);
            let Ok(_permits) = self.acks_in_flight.acquire_many(permits).await else {
                // The semaphore is never closed; answer rather than panic if it were.
                results.extend(window.iter().map(|_| Err(unavailable("publisher closed"))));
                continue;
            };
            let mut pending = Vec::with_capacity(window.len());
            for append in window {
                let subject_and_expected = (
                    append.subject.clone(),
                    append.expected_last_subject_sequence,
                );
                let (subject, message) = JetStreamLog::publish_message(append);
                let sent = self.context.send_publish(subject, message).await;
                pending.push((subject_and_expected, sent));
            }
            // Awaited together, in order: each acknowledgement's timeout starts when it is first
            // polled, so a window whose replies were lost (a reconnect) fails after one
            // `ack_timeout`, not one per message.
            let acknowledged = futures::future::join_all(pending.into_iter().map(
                |((subject, expected), sent)| async move {
                    match sent {
                        Err(error) => {
                            Err(JetStreamLog::map_publish_error(error, &subject, expected))
                        }
                        Ok(ack_future) => match ack_future.await {
                            Ok(ack) => Ok(Ack {
                                sequence: ack.sequence,
                                duplicate: ack.duplicate,
                            }),
                            Err(error) => {
                                Err(JetStreamLog::map_publish_error(error, &subject, expected))
                            }
                        },
                    }
                },
            ))
            .await;
            results.extend(acknowledged);
        }
        results
    }

    async fn replay(
        &self,
        stream: StreamKind,
        from_sequence: u64,
        filter: Option<&str>,
    ) -> Result<RecordStream> {
        let stream = self.stream(stream).await?;
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                deliver_policy: deliver_from(from_sequence),
                filter_subject: filter.unwrap_or_default().to_owned(),
                ..Default::default()
            })
            .await
            .map_err(unavailable)?;
        let messages = consumer.messages().await.map_err(unavailable)?;
        Ok(messages
            .map(|message| match message {
                Ok(message) => jetstream_record(&message),
                Err(error) => Err(unavailable(error)),
            })
            .boxed())
    }

    async fn durable(
        &self,
        stream: StreamKind,
        name: &str,
        filter: Option<&str>,
        from_sequence: u64,
    ) -> Result<Box<dyn DurableConsumer>> {
        let stream = self.stream(stream).await?;
        // Resume exactly after the acknowledged position. JetStream would only redeliver what an
        // earlier incarnation had in flight once its ack wait ran out, which would stall a
        // restarted projector; recreating the consumer at its ack floor delivers it at once.
        // This assumes one owner per durable name, which is how the registry uses them.
        let start = match stream.consumer_info(name).await {
            Ok(info) => {
                stream.delete_consumer(name).await.map_err(unavailable)?;
                if info.ack_floor.stream_sequence > 0 {
                    consumer::DeliverPolicy::ByStartSequence {
                        start_sequence: info.ack_floor.stream_sequence + 1,
                    }
                } else {
                    info.config.deliver_policy
                }
            }
            Err(error) if error.kind() == jetstream::context::ConsumerInfoErrorKind::NotFound => {
                deliver_from(from_sequence)
            }
            Err(error) => match error.kind() {
                jetstream::context::ConsumerInfoErrorKind::JetStream(inner)
                    if inner.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND =>
                {
                    deliver_from(from_sequence)
                }
                _ => return Err(unavailable(error)),
            },
        };
        let consumer = stream
            .create_consumer(consumer::pull::Config {
                durable_name: Some(name.to_owned()),
                deliver_policy: start,
                ack_policy: consumer::AckPolicy::All,
                ack_wait: Duration::from_secs(60),
                max_ack_pending: 100_000,
                filter_subject: filter.unwrap_or_default().to_owned(),
                ..Default::default()
            })
            .await
            .map_err(unavailable)?;
        let messages = consumer.messages().await.map_err(unavailable)?;
        Ok(Box::new(JetStreamConsumer {
            messages,
            delivered: VecDeque::new(),
            highest: 0,
        }))
    }

    async fn last_sequence(&self, stream: StreamKind) -> Result<u64> {
        let mut stream = self.stream(stream).await?;
        let info = stream.info().await.map_err(unavailable)?;
        Ok(info.state.last_sequence)
    }

    async fn last_for_subject(&self, stream: StreamKind, subject: &str) -> Result<Option<Record>> {
        let stream = self.stream(stream).await?;
        match stream.direct_get_last_for_subject(subject).await {
            Ok(message) => {
                let headers = message
                    .headers
                    .iter()
                    .flat_map(|(name, values)| {
                        values
                            .iter()
                            .map(move |v| (name.to_string(), v.as_str().to_owned()))
                    })
                    .filter(|(name, _)| !name.starts_with("Nats-"))
                    .collect();
                Ok(Some(Record {
                    sequence: message.sequence,
                    subject: message.subject.to_string(),
                    payload: message.payload,
                    headers,
                    stored_at_ms: (message.time.unix_timestamp_nanos() / 1_000_000) as i64,
                }))
            }
            Err(error) if error.kind() == stream::DirectGetErrorKind::NotFound => Ok(None),
            Err(error) => Err(unavailable(error)),
        }
    }
}

fn deliver_from(from_sequence: u64) -> consumer::DeliverPolicy {
    if from_sequence <= 1 {
        consumer::DeliverPolicy::All
    } else {
        consumer::DeliverPolicy::ByStartSequence {
            start_sequence: from_sequence,
        }
    }
}

struct JetStreamConsumer {
    messages: consumer::pull::Stream,
    /// Delivered, not yet acknowledged: (stream sequence, acker).
    delivered: VecDeque<(u64, jetstream::message::Acker)>,
    /// Highest sequence delivered by this handle: a redelivery at or below it (after an ack
    /// wait ran out) is dropped, so callers always see strictly increasing sequences.
    highest: u64,
}

impl std::fmt::Debug for JetStreamConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamConsumer")
            .field("unacked", &self.delivered.len())
            .finish()
    }
}

impl JetStreamConsumer {
    fn take(&mut self, message: jetstream::Message) -> Result<Option<Record>> {
        let record = jetstream_record(&message)?;
        if record.sequence <= self.highest {
            return Ok(None);
        }
        self.highest = record.sequence;
        let (_, acker) = message.split();
        self.delivered.push_back((record.sequence, acker));
        Ok(Some(record))
    }
}

#[async_trait]
impl DurableConsumer for JetStreamConsumer {
    async fn fetch(&mut self, max: usize, wait: Duration) -> Result<Vec<Record>> {
        let mut batch = Vec::new();
        let deadline = tokio::time::Instant::now() + wait;
        while batch.is_empty() {
            let message = match tokio::time::timeout_at(deadline, self.messages.next()).await {
                Err(_) => return Ok(batch),
                Ok(None) => return Err(unavailable("consumer closed")),
                Ok(Some(Err(error))) => return Err(unavailable(error)),
                Ok(Some(Ok(message))) => message,
            };
            batch.extend(self.take(message)?);
        }
        while batch.len() < max {
            match self.messages.next().now_or_never() {
                Some(Some(Ok(message))) => batch.extend(self.take(message)?),
                Some(Some(Err(error))) => return Err(unavailable(error)),
                Some(None) | None => break,
            }
        }
        Ok(batch)
    }

    async fn ack_through(&mut self, sequence: u64) -> Result<()> {
        // With AckPolicy::All, acknowledging the newest delivered record at or below `sequence`
        // acknowledges everything before it. `delivered` is in stream order.
        let through = self
            .delivered
            .partition_point(|(delivered, _)| *delivered <= sequence);
        if through == 0 {
            return Ok(());
        }
        if let Some((_, acker)) = self.delivered.get(through - 1) {
            // Confirmed by the server: a plain ack is only sent, and a consumer reopened right
            // after could still be handed the acknowledged records again. Forgotten only once
            // confirmed, so a caller retrying after a failure acknowledges them for real.
            acker.double_ack().await.map_err(unavailable)?;
        }
        self.delivered.drain(..through);
        Ok(())
    }
}
