//! An [`EventLog`] decorator that measures appends (`registry.event_log.append.duration`, by
//! stream and outcome) for every component of a `registryd` process, and traces appends to the
//! events stream: an `append` span, child of the caller's, whose W3C trace context goes into
//! the message headers so that every consumer's handling joins the caller's trace. Heartbeat
//! batches (many callers' beats) get no span and no context.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use event_log::{Ack, Append, DurableConsumer, EventLog, RecordStream, StreamKind, Streams};
use opentelemetry::KeyValue;
use opentelemetry::metrics::Histogram;
use tracing::Instrument as _;

use crate::metrics;

/// The decorated log. Everything but the appends passes straight through.
#[derive(Debug)]
pub struct InstrumentedLog {
    inner: Arc<dyn EventLog>,
    append_duration: Histogram<f64>,
}

impl InstrumentedLog {
    /// Wraps `inner`, with instruments from the global meter provider.
    pub fn new(inner: Arc<dyn EventLog>) -> InstrumentedLog {
        InstrumentedLog {
            inner,
            append_duration: metrics::latency_histogram(
                "registry.event_log.append.duration",
                "Event-log appends from publish to acknowledgement, by stream and outcome \
                 (a pipelined group counts each message with the group's time)",
            ),
        }
    }

    fn record(&self, stream: StreamKind, started: Instant, ok: bool, messages: usize) {
        let elapsed = started.elapsed().as_secs_f64();
        let attributes = [
            KeyValue::new("stream", stream_name(stream)),
            KeyValue::new("outcome", if ok { "ok" } else { "error" }),
        ];
        for _ in 0..messages {
            self.append_duration.record(elapsed, &attributes);
        }
    }
}

/// The span of an append to the events stream (disabled for heartbeats or when spans are not
/// collected).
fn append_span(stream: StreamKind, subject: &str, messages: usize) -> tracing::Span {
    if stream != StreamKind::Events {
        return tracing::Span::none();
    }
    tracing::info_span!(
        "append",
        otel.kind = "producer",
        messaging.system = "nats",
        messaging.operation.type = "publish",
        messaging.destination.name = subject,
        messaging.batch.message_count = messages,
    )
}

fn stream_name(stream: StreamKind) -> &'static str {
    match stream {
        StreamKind::Events => "events",
        StreamKind::Heartbeats => "heartbeats",
    }
}

#[async_trait]
impl EventLog for InstrumentedLog {
    fn streams(&self) -> &Streams {
        self.inner.streams()
    }

    async fn ensure_streams(&self) -> event_log::Result<()> {
        self.inner.ensure_streams().await
    }

    async fn append(&self, stream: StreamKind, mut append: Append) -> event_log::Result<Ack> {
        let started = Instant::now();
        let span = append_span(stream, &append.subject, 1);
        crate::telemetry::inject(&span, &mut append.headers);
        let result = self.inner.append(stream, append).instrument(span).await;
        self.record(stream, started, result.is_ok(), 1);
        result
    }

    async fn append_many(
        &self,
        stream: StreamKind,
        mut appends: Vec<Append>,
    ) -> Vec<event_log::Result<Ack>> {
        let started = Instant::now();
        let subject = appends.first().map_or("", |append| append.subject.as_str());
        let span = append_span(stream, subject, appends.len());
        for append in &mut appends {
            crate::telemetry::inject(&span, &mut append.headers);
        }
        let results = self
            .inner
            .append_many(stream, appends)
            .instrument(span)
            .await;
        let ok = results.iter().filter(|result| result.is_ok()).count();
        self.record(stream, started, true, ok);
        self.record(stream, started, false, results.len() - ok);
        results
    }

    async fn replay(
        &self,
        stream: StreamKind,
        from_sequence: u64,
        filter: Option<&str>,
    ) -> event_log::Result<RecordStream> {
        self.inner.replay(stream, from_sequence, filter).await
    }

    async fn durable(
        &self,
        stream: StreamKind,
        name: &str,
        filter: Option<&str>,
        from_sequence: u64,
    ) -> event_log::Result<Box<dyn DurableConsumer>> {
        self.inner
            .durable(stream, name, filter, from_sequence)
            .await
    }

    async fn last_sequence(&self, stream: StreamKind) -> event_log::Result<u64> {
        self.inner.last_sequence(stream).await
    }

    async fn last_for_subject(
        &self,
        stream: StreamKind,
        subject: &str,
    ) -> event_log::Result<Option<event_log::Record>> {
        self.inner.last_for_subject(stream, subject).await
    }
}

/// The decorator is an event log like any other.
#[cfg(test)]
mod conformance {
    use super::*;

    async fn make() -> (InstrumentedLog, ()) {
        let memory = event_log::MemoryLog::new(Streams::new("conformance"));
        (InstrumentedLog::new(Arc::new(memory)), ())
    }

    event_log::conformance_suite!(make);
}
