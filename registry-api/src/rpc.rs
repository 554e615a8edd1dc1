//! A tower layer around every gRPC call: one `rpc` span (when something collects spans) and the
//! `rpc.server.call.duration` histogram by method and gRPC status.
//!
//! The call lasts until its response body is finished or dropped, so a stream's duration is its
//! whole life and its status is the one in its trailers. Method names come from a fixed table:
//! a client calling made-up paths cannot grow the metric's label set (they count as `other`).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use http_body::{Body, Frame, SizeHint};
use opentelemetry::KeyValue;
use opentelemetry::metrics::Histogram;
use tracing::Span;

use crate::metrics;

/// Every method served, as `service/method` (the HTTP/2 path without its leading `/`).
pub const METHODS: &[&str] = &[
    "registry.v1.Registry/RegisterInstance",
    "registry.v1.Registry/DeregisterInstance",
    "registry.v1.Registry/Heartbeat",
    "registry.v1.Registry/BatchHeartbeat",
    "registry.v1.Registry/StreamHeartbeats",
    "registry.v1.Registry/UpdateInstance",
    "registry.v1.Registry/GetInstance",
    "registry.v1.Registry/Discover",
    "registry.v1.Registry/Watch",
    "registry.v1.Registry/ListNamespaces",
    "registry.v1.Registry/ListServices",
    "grpc.health.v1.Health/Check",
    "grpc.health.v1.Health/Watch",
    "grpc.health.v1.Health/List",
    "grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// The method of a request path, from [`METHODS`], or `other`.
pub fn method_of(path: &str) -> &'static str {
    let path = path.strip_prefix('/').unwrap_or(path);
    METHODS
        .iter()
        .find(|method| **method == path)
        .copied()
        .unwrap_or("other")
}

/// gRPC status codes that make a server span an error (OpenTelemetry's RPC conventions).
fn is_server_error(code: i64) -> bool {
    matches!(code, 2 | 4 | 12 | 13 | 14 | 15)
}

/// The layer. Cheap to clone.
#[derive(Debug, Clone)]
pub struct RpcLayer {
    duration: Histogram<f64>,
}

impl Default for RpcLayer {
    fn default() -> Self {
        RpcLayer::new()
    }
}

impl RpcLayer {
    /// The layer, with its histogram from the global meter provider.
    pub fn new() -> RpcLayer {
        RpcLayer {
            duration: metrics::latency_histogram(
                "rpc.server.call.duration",
                "gRPC calls from request to the end of the response, by method and status",
            ),
        }
    }
}

impl<S> tower_layer::Layer<S> for RpcLayer {
    type Service = RpcService<S>;

    fn layer(&self, inner: S) -> RpcService<S> {
        RpcService {
            inner,
            duration: self.duration.clone(),
        }
    }
}

/// The service the layer wraps around the routes.
#[derive(Debug, Clone)]
pub struct RpcService<S> {
    inner: S,
    duration: Histogram<f64>,
}

/// What is known of a call until its response ends.
#[derive(Debug)]
struct Call {
    method: &'static str,
    started: Instant,
    span: Span,
    duration: Histogram<f64>,
    /// From a trailers-only response's headers or the trailers.
    status: Option<i64>,
}

impl Call {
    fn finish(&mut self, status: i64) {
        let elapsed = self.started.elapsed().as_secs_f64();
        self.duration.record(
            elapsed,
            &[
                KeyValue::new("rpc.method", self.method),
                KeyValue::new("rpc.grpc.status_code", status),
            ],
        );
        if !self.span.is_disabled() {
            self.span.record("rpc.grpc.status_code", status);
            if is_server_error(status) {
                self.span.record("otel.status_code", "error");
            }
        }
    }
}

fn grpc_status(headers: &http::HeaderMap) -> Option<i64> {
    headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

impl<S, B, ResBody> tower_service::Service<http::Request<B>> for RpcService<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Send + 'static,
{
    type Response = http::Response<ObservedBody<ResBody>>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = method_of(request.uri().path());
        let span = crate::telemetry::rpc_span(method, request.headers());
        let started = Instant::now();
        let future = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        let mut call = Call {
            method,
            started,
            span,
            duration: self.duration.clone(),
            status: None,
        };
        Box::pin(async move {
            let result = {
                let span = call.span.clone();
                tracing::Instrument::instrument(future, span).await
            };
            match result {
                Ok(response) => {
                    call.status = grpc_status(response.headers());
                    Ok(response.map(|body| ObservedBody {
                        inner: body,
                        call: Some(call),
                    }))
                }
                Err(error) => {
                    // The transport failed the call before any gRPC status: UNKNOWN.
                    call.finish(2);
                    Err(error)
                }
            }
        })
    }
}

/// A response body that finishes its call's measurement when it ends or is dropped.
#[derive(Debug)]
pub struct ObservedBody<B> {
    inner: B,
    call: Option<Call>,
}

impl<B> ObservedBody<B> {
    fn finish(&mut self, status: Option<i64>) {
        if let Some(mut call) = self.call.take() {
            // A trailers-only response carried its status in the headers; a body that ends or is
            // dropped without any status was cut short (the client went away): CANCELLED.
            let status = status.or(call.status).unwrap_or(1);
            call.finish(status);
        }
    }
}

impl<B> Drop for ObservedBody<B> {
    fn drop(&mut self) {
        self.finish(None);
    }
}

impl<B> Body for ObservedBody<B>
where
    B: Body + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    let status = grpc_status(trailers);
                    self.finish(status);
                }
            }
            Poll::Ready(Some(Err(_))) => self.finish(Some(2)),
            Poll::Ready(None) => {
                let status = self.call.as_ref().and_then(|call| call.status);
                // Unary successes always end with trailers; reaching the end without them
                // means the status was in the headers (trailers-only), or OK.
                self.finish(Some(status.unwrap_or(0)));
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_served_method_is_in_the_table_and_nothing_else_is() {
        use prost::Message as _;
        let descriptors = prost_types::FileDescriptorSet::decode(sdk::proto::FILE_DESCRIPTOR_SET)
            .expect("descriptor set");
        let mut served = Vec::new();
        for file in &descriptors.file {
            for service in &file.service {
                for method in &service.method {
                    served.push(format!(
                        "{}.{}/{}",
                        file.package(),
                        service.name(),
                        method.name()
                    ));
                }
            }
        }
        assert!(!served.is_empty());
        for method in &served {
            assert_eq!(method_of(&format!("/{method}")), method.as_str());
        }
        assert_eq!(method_of("/registry.v1.Registry/MadeUp"), "other");
        assert_eq!(method_of("/"), "other");
        assert_eq!(method_of(""), "other");
    }

    #[test]
    fn server_errors_are_the_conventional_codes() {
        let errors: Vec<i64> = (0..=16).filter(|code| is_server_error(*code)).collect();
        assert_eq!(errors, [2, 4, 12, 13, 14, 15]);
    }
}
