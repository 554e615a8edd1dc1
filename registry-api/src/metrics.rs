//! The registry's metrics: OpenTelemetry instruments, and the HTTP endpoint that serves them in
//! Prometheus text format.
//!
//! Instruments come from the global meter provider, which `registryd` sets up (with a Prometheus
//! reader, see [`crate::telemetry`]); without one they are no-ops, so library users and tests
//! pay nothing. Names follow OpenTelemetry conventions; the Prometheus exporter turns dots into
//! underscores and appends units and `_total`:
//!
//! | instrument | Prometheus | what |
//! |---|---|---|
//! | `rpc.server.call.duration` | `rpc_server_call_duration_seconds` | per RPC, by `rpc_method` and `rpc_grpc_status_code` (streams: their whole life) |
//! | `registry.heartbeats.received` | `registry_heartbeats_received_total` | beats by `outcome` (`recorded`, `not_found`, `invalid`) |
//! | `registry.watchers` | `registry_watchers` | open Watch streams |
//! | `registry.event_log.append.duration` | `registry_event_log_append_duration_seconds` | append to acknowledgement, by `stream` and `outcome` |
//! | `registry.leases` | `registry_leases` | leases by `state` (`healthy`, `unhealthy`) |
//! | `registry.leases.at_risk` | `registry_leases_at_risk` | healthy leases whose next beat is their last chance |
//! | `registry.leases.held` | `registry_leases_held` | unhealthy decisions held back by self-preservation |
//! | `registry.self_preservation` | `registry_self_preservation` | 1 while self-preservation is active |
//! | `registry.transitions` | `registry_transitions_total` | transitions this engine appended, by `kind` |
//! | `registry.projector.lag.events` | `registry_projector_lag_events` | events stored and not yet in PostgreSQL |
//! | `registry.projector.lag` | `registry_projector_lag_seconds` | age of the oldest event not yet in PostgreSQL |
//! | `registry.projector.applied_sequence` | `registry_projector_applied_sequence` | the tables' checkpoint |

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, Meter, UpDownCounter};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Instrumentation scope of the registry's instruments.
pub const SCOPE: &str = "registry";

/// Bucket boundaries, in seconds, for latencies from a fraction of a millisecond to seconds.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.000_25, 0.0005, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The meter all of the registry's instruments come from.
pub fn meter() -> Meter {
    opentelemetry::global::meter(SCOPE)
}

/// A latency histogram in seconds.
pub fn latency_histogram(name: &'static str, description: &'static str) -> Histogram<f64> {
    meter()
        .f64_histogram(name)
        .with_unit("s")
        .with_description(description)
        .with_boundaries(LATENCY_BUCKETS.to_vec())
        .build()
}

/// The API's own instruments. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ApiMetrics {
    heartbeats: Counter<u64>,
    watchers: UpDownCounter<i64>,
}

impl Default for ApiMetrics {
    fn default() -> Self {
        ApiMetrics::new()
    }
}

impl ApiMetrics {
    /// Instruments from the global meter provider.
    pub fn new() -> ApiMetrics {
        let meter = meter();
        ApiMetrics {
            heartbeats: meter
                .u64_counter("registry.heartbeats.received")
                .with_description("Heartbeats received, by outcome (recorded, not_found, invalid)")
                .build(),
            watchers: meter
                .i64_up_down_counter("registry.watchers")
                .with_description("Watch streams open")
                .build(),
        }
    }

    /// Counts beats: recorded in the log, for unknown instances, and invalid.
    pub fn heartbeats(&self, recorded: u64, not_found: u64, invalid: u64) {
        for (count, outcome) in [
            (recorded, "recorded"),
            (not_found, "not_found"),
            (invalid, "invalid"),
        ] {
            if count > 0 {
                self.heartbeats
                    .add(count, &[KeyValue::new("outcome", outcome)]);
            }
        }
    }

    /// Counts an open watcher until the guard is dropped.
    pub fn watcher(&self) -> WatcherGuard {
        self.watchers.add(1, &[]);
        WatcherGuard {
            watchers: self.watchers.clone(),
        }
    }
}

/// One open Watch stream; dropping it counts it closed.
#[derive(Debug)]
pub struct WatcherGuard {
    watchers: UpDownCounter<i64>,
}

impl Drop for WatcherGuard {
    fn drop(&mut self) {
        self.watchers.add(-1, &[]);
    }
}

/// Registers gauges and counters read from the health engine's statistics at each collection.
pub fn observe_engine(handle: health_engine::Handle) {
    let meter = meter();
    let leases = handle.clone();
    meter
        .u64_observable_gauge("registry.leases")
        .with_description("Leases held by the health engine, by state (healthy, unhealthy)")
        .with_callback(move |observer| {
            let counts = leases.stats().counts;
            observer.observe(counts.healthy, &[KeyValue::new("state", "healthy")]);
            observer.observe(counts.unhealthy, &[KeyValue::new("state", "unhealthy")]);
        })
        .build();
    let at_risk = handle.clone();
    meter
        .u64_observable_gauge("registry.leases.at_risk")
        .with_description("Healthy leases whose next heartbeat is their last chance (overdue)")
        .with_callback(move |observer| observer.observe(at_risk.stats().counts.overdue, &[]))
        .build();
    let held = handle.clone();
    meter
        .u64_observable_gauge("registry.leases.held")
        .with_description("Leases past their deadline that self-preservation keeps from expiring")
        .with_callback(move |observer| observer.observe(held.stats().counts.held, &[]))
        .build();
    let preservation = handle.clone();
    meter
        .u64_observable_gauge("registry.self_preservation")
        .with_description("1 while the health engine is in self-preservation, else 0")
        .with_callback(move |observer| {
            observer.observe(
                u64::from(preservation.stats().counts.self_preservation),
                &[],
            );
        })
        .build();
    meter
        .u64_observable_counter("registry.transitions")
        .with_description("Transitions appended by this health engine, by kind")
        .with_callback(move |observer| {
            let counts = handle.stats().transitions_by_kind;
            for (count, kind) in [
                (counts.turned_unhealthy, "turned_unhealthy"),
                (counts.turned_healthy, "turned_healthy"),
                (counts.expired, "expired"),
                (
                    counts.self_preservation_entered,
                    "self_preservation_entered",
                ),
                (counts.self_preservation_exited, "self_preservation_exited"),
            ] {
                observer.observe(count, &[KeyValue::new("kind", kind)]);
            }
        })
        .build();
}

/// Registers gauges read from the projector's progress at each collection.
pub fn observe_projector(handle: store::ProjectorHandle) {
    let meter = meter();
    let events = handle.clone();
    meter
        .u64_observable_gauge("registry.projector.lag.events")
        .with_description("Events stored in the stream and not yet applied to PostgreSQL")
        .with_callback(move |observer| observer.observe(events.progress().lag_events, &[]))
        .build();
    let age = handle.clone();
    meter
        .f64_observable_gauge("registry.projector.lag")
        .with_unit("s")
        .with_description("Age of the oldest event not yet applied to PostgreSQL")
        .with_callback(move |observer| observer.observe(age.progress().lag.as_secs_f64(), &[]))
        .build();
    meter
        .u64_observable_gauge("registry.projector.applied_sequence")
        .with_description("Stream sequence of the last event applied to PostgreSQL")
        .with_callback(move |observer| {
            observer.observe(handle.progress().applied_sequence, &[]);
        })
        .build();
}

/// The HTTP endpoint serving `GET /metrics` in Prometheus text format.
#[derive(Debug)]
pub struct Endpoint {
    listener: TcpListener,
    registry: prometheus::Registry,
}

impl Endpoint {
    /// Binds the endpoint; it serves what is gathered from `registry`.
    pub async fn bind(
        address: SocketAddr,
        registry: prometheus::Registry,
    ) -> std::io::Result<Self> {
        Ok(Endpoint {
            listener: TcpListener::bind(address).await?,
            registry,
        })
    }

    /// The address actually listened on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown`. Each connection is served on its own task (HTTP/1.1).
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            let accepted = tokio::select! {
                () = shutdown.cancelled() => return,
                accepted = self.listener.accept() => accepted,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "metrics endpoint: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let registry = self.registry.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| {
                    let registry = registry.clone();
                    async move { Ok::<_, Infallible>(respond(&request, &registry)) }
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service);
                tokio::select! {
                    () = shutdown.cancelled() => {}
                    result = connection => {
                        if let Err(error) = result {
                            tracing::debug!(%error, "metrics endpoint: connection failed");
                        }
                    }
                }
            });
        }
    }
}

fn respond(request: &Request<Incoming>, registry: &prometheus::Registry) -> Response<Full<Bytes>> {
    let plain = |status: StatusCode, text: &'static str| {
        let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
        *response.status_mut() = status;
        response
    };
    if request.uri().path() != "/metrics" {
        return plain(StatusCode::NOT_FOUND, "not found: try /metrics\n");
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "GET /metrics\n");
    }
    let mut body = String::new();
    match prometheus::TextEncoder::new().encode_utf8(&registry.gather(), &mut body) {
        Ok(()) => {
            let mut response = Response::new(Full::new(Bytes::from(body)));
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        Err(error) => {
            tracing::warn!(%error, "metrics endpoint: encoding failed");
            plain(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n")
        }
    }
}
