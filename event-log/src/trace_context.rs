//! The W3C trace context an event carries in its headers (`traceparent`, `tracestate`).
//!
//! Whoever appends an event writes the context of the span that caused it ([`inject`]); whoever
//! handles the event makes its span a child of that context ([`follow`]), so one trace follows a
//! command from the API through the log to every consumer. Both cost nothing when spans are not
//! collected (the span is disabled and nothing is parsed or written); a missing or malformed
//! `traceparent` leaves the span where it is.

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TraceContextExt as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::log::Record;

struct RecordHeaders<'a>(&'a Record);

impl Extractor for RecordHeaders<'_> {
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

struct AppendHeaders<'a>(&'a mut Vec<(String, String)>);

impl Injector for AppendHeaders<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.retain(|(name, _)| !name.eq_ignore_ascii_case(key));
        self.0.push((key.to_owned(), value));
    }
}

/// Writes `span`'s trace context into an append's headers (nothing for a disabled span).
pub fn inject(span: &tracing::Span, headers: &mut Vec<(String, String)>) {
    if span.is_disabled() {
        return;
    }
    let context = span.context();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut AppendHeaders(headers));
    });
}

/// Makes `span` a child of the context `record` carries, if any.
pub fn follow(span: &tracing::Span, record: &Record) {
    if span.is_disabled() || record.header(crate::headers::TRACEPARENT).is_none() {
        return;
    }
    let context = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&RecordHeaders(record))
    });
    if context.span().span_context().is_valid() {
        // Fails only if the span already started, which a fresh span has not.
        let _ = span.set_parent(context);
    }
}
