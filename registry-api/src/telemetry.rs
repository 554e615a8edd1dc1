//! `registryd`'s process-wide telemetry: log lines, the metrics pipeline and spans.
//!
//! * **Logs**: `tracing` events as text or JSON lines on stderr, filtered by `RUST_LOG`
//!   (default `info`). Spans never reach the log lines: they cost nothing unless exported.
//! * **Metrics**: the global OpenTelemetry meter provider, read by a Prometheus exporter into a
//!   registry that [`crate::metrics::Endpoint`] serves.
//! * **Spans**: only when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) is set and
//!   `OTEL_TRACES_EXPORTER` is not `none`: then spans of the registry's crates (level INFO) go
//!   to an OTLP/gRPC collector through a batch processor, and the W3C TraceContext propagator
//!   is installed. [`rpc_span`] continues a caller's `traceparent`; appends carry the context in
//!   their NATS headers ([`inject`], used by [`crate::instrumented_log`]); consumers continue it
//!   ([`follow`], shared with `health-engine` and `store` through `event_log::trace_context`). Without
//!   the variables no exporter, no propagator and no span exists: `info_span!` returns a
//!   disabled span and nothing is parsed or allocated.

use opentelemetry::propagation::Extractor;
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::Layer as _;
use tracing_subscriber::filter::{EnvFilter, FilterExt as _, LevelFilter, Targets, filter_fn};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::settings::LogFormat;

/// The service name when `OTEL_SERVICE_NAME` (or `service.name` in `OTEL_RESOURCE_ATTRIBUTES`)
/// does not give one.
pub const DEFAULT_SERVICE_NAME: &str = "registryd";

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The metrics pipeline could not be built.
    #[error("metrics: {0}")]
    Metrics(String),
    /// A global subscriber was already installed (telemetry initialised twice).
    #[error("logging: {0}")]
    Logging(String),
    /// The OTLP exporter could not be built (e.g. an invalid endpoint).
    #[error("tracing: {0}")]
    Tracing(String),
}

/// The running pipelines; [`Telemetry::shutdown`] flushes them.
#[derive(Debug)]
pub struct Telemetry {
    prometheus: prometheus::Registry,
    meters: SdkMeterProvider,
    tracer: Option<SdkTracerProvider>,
}

/// The crates whose spans are exported.
const TRACED_CRATES: &[&str] = &[
    "registry_api",
    "registryd",
    "health_engine",
    "store",
    "event_log",
];

fn variable(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .map(|value| value.trim().to_owned())
        .filter(|value| !value.is_empty())
}

/// Whether the standard variables ask for span export.
pub fn tracing_requested() -> bool {
    let endpoint = variable("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .or_else(|| variable("OTEL_EXPORTER_OTLP_ENDPOINT"))
        .is_some();
    let disabled = variable("OTEL_TRACES_EXPORTER").is_some_and(|exporter| exporter == "none");
    endpoint && !disabled
}

/// The OTLP/gRPC span pipeline (endpoint, headers, timeout, sampler from the variables).
fn tracer_provider(resource: Resource) -> Result<SdkTracerProvider, Error> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
        .map_err(|error| Error::Tracing(error.to_string()))?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// The resource describing this process: the standard variables, else service name
/// [`DEFAULT_SERVICE_NAME`].
fn resource() -> Resource {
    let named = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|name| !name.trim().is_empty())
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES")
            .is_ok_and(|attributes| attributes.contains("service.name="));
    let builder = Resource::builder();
    if named {
        builder.build()
    } else {
        builder.with_service_name(DEFAULT_SERVICE_NAME).build()
    }
}

/// Installs the global subscriber (log lines) and meter provider. Call once, at start-up, inside
/// the Tokio runtime.
pub fn init(format: LogFormat) -> Result<Telemetry, Error> {
    let resource = resource();
    let tracer = if tracing_requested() {
        Some(tracer_provider(resource.clone())?)
    } else {
        None
    };
    let prometheus = prometheus::Registry::new();
    let exporter = opentelemetry_prometheus::exporter()
        .with_registry(prometheus.clone())
        .build()
        .map_err(|error| Error::Metrics(error.to_string()))?;
    let meters = SdkMeterProvider::builder()
        .with_reader(exporter)
        .with_resource(resource)
        .build();
    opentelemetry::global::set_meter_provider(meters.clone());

    let levels = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let only_events = filter_fn(|metadata| metadata.is_event());
    let lines = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let lines = match format {
        LogFormat::Text => lines.boxed(),
        LogFormat::Json => lines.json().boxed(),
    };
    let spans = tracer.as_ref().map(|provider| {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        opentelemetry::global::set_tracer_provider(provider.clone());
        let targets = TRACED_CRATES.iter().fold(Targets::new(), |targets, name| {
            targets.with_target(*name, LevelFilter::INFO)
        });
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("registryd"))
            .with_filter(targets)
    });
    let subscriber =
        tracing_subscriber::registry().with(lines.with_filter(levels.and(only_events)));
    // Not `.with(Option<Layer>)`: an absent optional layer declares interest in every
    // callsite, so every span would be built and recorded for nobody (measured at 12-15 µs
    // per RPC). Without the span layer no filter wants a span and `info_span!` is free.
    match spans {
        Some(spans) => subscriber.with(spans).try_init(),
        None => subscriber.try_init(),
    }
    .map_err(|error| Error::Logging(error.to_string()))?;
    if tracer.is_some() {
        tracing::info!("exporting spans over OTLP/gRPC");
    }
    Ok(Telemetry {
        prometheus,
        meters,
        tracer,
    })
}

impl Telemetry {
    /// The registry the `/metrics` endpoint serves.
    pub fn prometheus(&self) -> prometheus::Registry {
        self.prometheus.clone()
    }

    /// Flushes and stops the pipelines. Their shutdown blocks, so it runs on a blocking thread.
    pub async fn shutdown(self) {
        let (meters, tracer) = (self.meters, self.tracer);
        let stopped = tokio::task::spawn_blocking(move || {
            // Spans still open are exported when they end: by now every component has stopped.
            let traces = tracer.map(|tracer| tracer.shutdown());
            (meters.shutdown(), traces)
        })
        .await;
        if let Ok((metrics, traces)) = stopped {
            if let Err(error) = metrics {
                tracing::debug!(%error, "metrics pipeline shutdown");
            }
            if let Some(Err(error)) = traces {
                tracing::warn!(%error, "span export at shutdown failed");
            }
        }
    }
}

/// The span of one gRPC call (disabled, hence free, unless spans are collected), a child of the
/// caller's span when the request carries a valid `traceparent`.
pub fn rpc_span(method: &'static str, headers: &http::HeaderMap) -> Span {
    let (service, name) = method.split_once('/').unwrap_or(("", method));
    let span = tracing::info_span!(
        "rpc",
        otel.name = method,
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = name,
        rpc.grpc.status_code = tracing::field::Empty,
    );
    if !span.is_disabled() && headers.contains_key("traceparent") {
        let context = opentelemetry::global::get_text_map_propagator(|propagator| {
            propagator.extract(&HttpHeaders(headers))
        });
        if context.span().span_context().is_valid() {
            let _ = span.set_parent(context);
        }
    }
    span
}

struct HttpHeaders<'a>(&'a http::HeaderMap);

impl Extractor for HttpHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

pub use event_log::trace_context::{follow, inject};
