//! `registryd`'s process-wide telemetry: log lines, the metrics pipeline and spans.
//!
//! * **Logs**: `tracing` events as text or JSON lines on stderr, filtered by `RUST_LOG`
//!   (default `info`). Spans never reach the log lines: they cost nothing unless exported.
//! * **Metrics**: the global OpenTelemetry meter provider, read by a Prometheus exporter into a
//!   registry that [`crate::metrics::Endpoint`] serves.
//! * **Spans**: [`rpc_span`] for every gRPC call; consumers of the event log make their own (see
//!   `health-engine`, `store` and [`crate::read_model`]).

use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use tracing::Span;
use tracing_subscriber::Layer as _;
use tracing_subscriber::filter::{EnvFilter, FilterExt as _, filter_fn};
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
}

/// The running pipelines; [`Telemetry::shutdown`] flushes them.
#[derive(Debug)]
pub struct Telemetry {
    prometheus: prometheus::Registry,
    meters: SdkMeterProvider,
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
    tracing_subscriber::registry()
        .with(lines.with_filter(levels.and(only_events)))
        .try_init()
        .map_err(|error| Error::Logging(error.to_string()))?;
    Ok(Telemetry { prometheus, meters })
}

impl Telemetry {
    /// The registry the `/metrics` endpoint serves.
    pub fn prometheus(&self) -> prometheus::Registry {
        self.prometheus.clone()
    }

    /// Flushes and stops the pipelines. Their shutdown blocks, so it runs on a blocking thread.
    pub async fn shutdown(self) {
        let meters = self.meters;
        let stopped = tokio::task::spawn_blocking(move || meters.shutdown()).await;
        if let Ok(Err(error)) = stopped {
            tracing::debug!(%error, "metrics pipeline shutdown");
        }
    }
}

/// The span of one gRPC call (disabled, hence free, unless spans are collected).
pub fn rpc_span(method: &'static str, _headers: &http::HeaderMap) -> Span {
    let (service, name) = method.split_once('/').unwrap_or(("", method));
    tracing::info_span!(
        "rpc",
        otel.name = method,
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = name,
        rpc.grpc.status_code = tracing::field::Empty,
    )
}
