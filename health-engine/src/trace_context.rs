//! The W3C trace context that an event carries in its record headers (`traceparent`,
//! `tracestate`, set by whoever appended it), so that the span handling the event joins the trace
//! of the command that caused it.
//!
//! Costs nothing when spans are not collected (the span is disabled and nothing is parsed); a
//! missing or malformed `traceparent` leaves the span where it is.

use event_log::Record;
use opentelemetry::propagation::Extractor;
use opentelemetry::trace::TraceContextExt as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

struct Headers<'a>(&'a Record);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.header(key)
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .headers
            .iter()
            .map(|(name, _)| name.as_str())
            .collect()
    }
}

/// Makes `span` a child of the context `record` carries, if any.
pub(crate) fn follow(span: &tracing::Span, record: &Record) {
    if span.is_disabled() || record.header(event_log::headers::TRACEPARENT).is_none() {
        return;
    }
    let context = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&Headers(record))
    });
    if context.span().span_context().is_valid() {
        // Fails only if the span already started, which a fresh span has not.
        let _ = span.set_parent(context);
    }
}
