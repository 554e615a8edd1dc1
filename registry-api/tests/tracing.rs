//! One trace from a gRPC call through the JetStream append to every consumer's handling, seen by
//! an in-process OTLP receiver that a real `registryd` (API, health engine and projector over
//! real NATS and PostgreSQL) exports to because `OTEL_EXPORTER_OTLP_ENDPOINT` names it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod daemon;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use daemon::Registryd;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use sdk::proto;
use sdk::proto::registry_client::RegistryClient;
use tokio::sync::watch;
use xtask::harness::TestEnv;

/// Longest wait for the spans (they are exported every 100 ms here).
const WAIT: Duration = Duration::from_secs(30);

/// An OTLP trace collector keeping every span it is sent, with the resource's service name.
#[derive(Clone)]
struct Receiver {
    spans: Arc<Mutex<Vec<(String, Span)>>>,
    received: watch::Sender<usize>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|resource| &resource.attributes)
                .find(|attribute| attribute.key == "service.name")
                .and_then(
                    |attribute| match attribute.value.as_ref()?.value.as_ref()? {
                        Value::StringValue(name) => Some(name.clone()),
                        _ => None,
                    },
                )
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                spans.extend(scope.spans.into_iter().map(|span| (service.clone(), span)));
            }
        }
        self.received.send_replace(spans.len());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Receiver {
    async fn start() -> (Receiver, std::net::SocketAddr) {
        let receiver = Receiver {
            spans: Arc::default(),
            received: watch::channel(0).0,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let service = TraceServiceServer::new(receiver.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
        (receiver, address)
    }

    /// Waits until `found` finds what it looks for among the spans received, each time a
    /// batch arrives; at most [`WAIT`].
    async fn wait_for<T>(
        &self,
        what: &str,
        mut found: impl FnMut(&[(String, Span)]) -> Option<T>,
    ) -> T {
        let mut received = self.received.subscribe();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(result) = found(&self.spans.lock().unwrap()) {
                return result;
            }
            let arrived = tokio::time::timeout_at(deadline, received.changed()).await;
            assert!(
                matches!(arrived, Ok(Ok(()))),
                "{what}: not received within {WAIT:?}; spans: {:#?}",
                self.summary()
            );
        }
    }

    fn summary(&self) -> Vec<String> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .map(|(_, span)| {
                format!(
                    "{} trace {} span {} parent {}",
                    span.name,
                    hex::encode(&span.trace_id),
                    hex::encode(&span.span_id),
                    hex::encode(&span.parent_span_id)
                )
            })
            .collect()
    }
}

fn attribute<'a>(span: &'a Span, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|attribute| attribute.key == key)?
        .value
        .as_ref()?
        .value
        .as_ref()
}

fn event_type(span: &Span) -> Option<&str> {
    match attribute(span, "event.type")? {
        Value::StringValue(value) => Some(value.as_str()),
        _ => None,
    }
}

/// The caller's trace: a W3C `traceparent` the test makes up.
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN_ID: &str = "00f067aa0ba902b7";

fn registration(port: u32, traceparent: &str) -> tonic::Request<proto::RegisterInstanceRequest> {
    let mut request = tonic::Request::new(proto::RegisterInstanceRequest {
        namespace: "default".into(),
        service: "traced".into(),
        host: "10.0.0.1".into(),
        port,
        health_check: Some(proto::HealthCheck { ttl_ms: 1000 }),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("traceparent", traceparent.parse().unwrap());
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_from_the_call_through_the_log_to_every_consumer() {
    let (receiver, collector) = Receiver::start().await;
    let env = TestEnv::new().await.expect("NATS and PostgreSQL");
    let endpoint = format!("http://{collector}");
    let server = Registryd::start(
        &env,
        &["--unhealthy-ratio", "1"],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_SERVICE_NAME", "registryd-under-test"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    );
    let mut client = RegistryClient::connect(format!("http://{}", server.api))
        .await
        .expect("connect");

    let registered = client
        .register_instance(registration(
            8080,
            &format!("00-{TRACE_ID}-{CALLER_SPAN_ID}-01"),
        ))
        .await
        .expect("register")
        .into_inner();

    // The call, its append, and the three consumers' handling of the event, all in the
    // caller's trace: the call under the caller's span, the append under the call, each
    // consumer under the append.
    let spans = receiver
        .wait_for("the registration's trace", |spans| {
            let trace: Vec<&(String, Span)> = spans
                .iter()
                .filter(|(_, span)| hex::encode(&span.trace_id) == TRACE_ID)
                .collect();
            let named = |name: &str| {
                trace
                    .iter()
                    .find(|(_, span)| span.name == name)
                    .map(|(service, span)| (service.clone(), span.clone()))
            };
            Some((
                named("registry.v1.Registry/RegisterInstance")?,
                named("append")?,
                named("read_model.apply")?,
                named("store.project")?,
                named("health_engine.apply")?,
            ))
        })
        .await;
    let ((service, call), (_, append), (_, read_model), (_, projector), (_, engine)) = spans;
    assert_eq!(service, "registryd-under-test");
    assert_eq!(hex::encode(&call.parent_span_id), CALLER_SPAN_ID);
    assert_eq!(append.parent_span_id, call.span_id, "append under the call");
    for consumer in [&read_model, &projector, &engine] {
        assert_eq!(
            consumer.parent_span_id, append.span_id,
            "{} under the append",
            consumer.name
        );
        assert_eq!(event_type(consumer), Some("InstanceRegistered"));
        // tracing records a u64 as an integer or, when large, as text.
        let sequence = match attribute(consumer, "messaging.message.sequence") {
            Some(Value::IntValue(sequence)) => sequence.to_string(),
            Some(Value::StringValue(sequence)) => sequence.clone(),
            other => panic!("{}: sequence {other:?}", consumer.name),
        };
        assert_eq!(
            sequence,
            registered.revision.to_string(),
            "{}",
            consumer.name
        );
    }

    // A malformed traceparent is ignored: the call succeeds and starts a trace of its own.
    client
        .register_instance(registration(8081, "00-not-a-trace-context"))
        .await
        .expect("register with a malformed traceparent");

    // No beats for a TTL (ratio 1): the engine's transition is a trace of its own, from its
    // decision through the append to the projector.
    let (transitions, transition_append, projected) = receiver
        .wait_for("the transition's trace", |spans| {
            let projected = spans.iter().map(|(_, span)| span).find(|span| {
                span.name == "store.project" && event_type(span) == Some("InstanceTurnedUnhealthy")
            })?;
            let in_trace = |name: &str| {
                spans
                    .iter()
                    .map(|(_, span)| span)
                    .find(|span| span.name == name && span.trace_id == projected.trace_id)
                    .cloned()
            };
            Some((
                in_trace("health_engine.transitions")?,
                in_trace("append")?,
                projected.clone(),
            ))
        })
        .await;
    assert_eq!(transition_append.parent_span_id, transitions.span_id);
    assert_eq!(projected.parent_span_id, transition_append.span_id);
    assert_ne!(hex::encode(&transitions.trace_id), TRACE_ID);
}
