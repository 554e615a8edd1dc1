//! `/metrics` of a real `registryd` (API, health engine and projector over real NATS and
//! PostgreSQL): the named metrics move as a registration, heartbeats, a watch and two health
//! transitions happen.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod daemon;

use std::time::{Duration, Instant};

use daemon::{Registryd, http_get, sample};
use sdk::proto;
use sdk::proto::registry_client::RegistryClient;
use xtask::harness::TestEnv;

/// Longest wait for a metric to reach a value (the engine decides within milliseconds of a
/// deadline; this only bounds a broken run on a loaded machine).
const WAIT: Duration = Duration::from_secs(20);

/// Scrapes until `condition` holds for the text, at most [`WAIT`]; returns that text. Metrics
/// are only observable by scraping, so this polls the endpoint (every 50 ms).
async fn scrape_until(server: &Registryd, what: &str, condition: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let text = server.scrape().await;
        if condition(&text) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not reached within {WAIT:?}; last scrape:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    sample(text, name, labels).unwrap_or(0.0)
}

fn instance(port: u32) -> Option<proto::InstanceRef> {
    Some(proto::InstanceRef {
        target: Some(proto::instance_ref::Target::Address(
            proto::InstanceAddress {
                namespace: "default".into(),
                service: "metered".into(),
                host: "10.0.0.1".into(),
                port,
            },
        )),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_a_scenario() {
    let env = TestEnv::new().await.expect("NATS and PostgreSQL");
    let server = Registryd::start(&env, &["--unhealthy-ratio", "1"], &[]);
    let mut client = RegistryClient::connect(format!("http://{}", server.api))
        .await
        .expect("connect");

    // Only /metrics is served.
    let (status, _) = http_get(server.metrics.unwrap(), "/other").await;
    assert_eq!(status, 404);

    let start = scrape_until(&server, "engine gauges", |text| {
        sample(text, "registry_leases", &[("state", "healthy")]).is_some()
    })
    .await;
    assert_eq!(
        value(&start, "registry_leases", &[("state", "healthy")]),
        0.0
    );
    assert_eq!(value(&start, "registry_self_preservation", &[]), 0.0);
    assert!(
        sample(&start, "registry_projector_lag_events", &[]).is_some(),
        "{start}"
    );

    // A registration: one RPC, one append to the events stream, one lease, in the tables.
    let registered = client
        .register_instance(proto::RegisterInstanceRequest {
            namespace: "default".into(),
            service: "metered".into(),
            host: "10.0.0.1".into(),
            port: 8080,
            health_check: Some(proto::HealthCheck { ttl_ms: 1000 }),
            ..Default::default()
        })
        .await
        .expect("register")
        .into_inner();
    let text = scrape_until(
        &server,
        "lease and projection of the registration",
        |text| {
            value(text, "registry_leases", &[("state", "healthy")]) == 1.0
                && value(text, "registry_projector_applied_sequence", &[])
                    >= registered.revision as f64
                && sample(
                    text,
                    "rpc_server_call_duration_seconds_count",
                    &[("rpc_method", "registry.v1.Registry/RegisterInstance")],
                )
                .is_some()
        },
    )
    .await;
    assert_eq!(
        value(
            &text,
            "rpc_server_call_duration_seconds_count",
            &[
                ("rpc_method", "registry.v1.Registry/RegisterInstance"),
                ("rpc_grpc_status_code", "0")
            ]
        ),
        1.0,
        "{text}"
    );
    assert!(
        value(
            &text,
            "registry_event_log_append_duration_seconds_count",
            &[("stream", "events"), ("outcome", "ok")]
        ) >= 1.0,
        "{text}"
    );
    assert_eq!(value(&text, "registry_projector_lag_events", &[]), 0.0);

    // Heartbeats: three recorded, one for an unknown instance (NOT_FOUND).
    for _ in 0..3 {
        client
            .heartbeat(proto::HeartbeatRequest {
                instance: instance(8080),
            })
            .await
            .expect("heartbeat");
    }
    let unknown = client
        .heartbeat(proto::HeartbeatRequest {
            instance: instance(9999),
        })
        .await
        .expect_err("unknown instance");
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    // A call is measured when its response has gone out, which may be just after the client
    // has it.
    let text = scrape_until(&server, "heartbeat calls counted", |text| {
        let calls = |code| {
            value(
                text,
                "rpc_server_call_duration_seconds_count",
                &[
                    ("rpc_method", "registry.v1.Registry/Heartbeat"),
                    ("rpc_grpc_status_code", code),
                ],
            )
        };
        calls("0") == 3.0 && calls("5") == 1.0
    })
    .await;
    assert_eq!(
        value(
            &text,
            "registry_heartbeats_received_total",
            &[("outcome", "recorded")]
        ),
        3.0,
        "{text}"
    );
    assert_eq!(
        value(
            &text,
            "registry_heartbeats_received_total",
            &[("outcome", "not_found")]
        ),
        1.0
    );
    assert!(
        value(
            &text,
            "registry_event_log_append_duration_seconds_count",
            &[("stream", "heartbeats"), ("outcome", "ok")]
        ) >= 1.0,
        "{text}"
    );

    // A watcher is counted while its stream is open.
    let mut watch = client
        .watch(proto::WatchRequest {
            namespace: "default".into(),
            service: "metered".into(),
            from_revision: 0,
        })
        .await
        .expect("watch")
        .into_inner();
    watch.message().await.expect("snapshot").expect("a message");
    scrape_until(&server, "one watcher", |text| {
        value(text, "registry_watchers", &[]) == 1.0
    })
    .await;
    drop(watch);
    scrape_until(&server, "watcher gone", |text| {
        value(text, "registry_watchers", &[]) == 0.0
    })
    .await;

    // No beats for a TTL (ratio 1): the engine turns the instance unhealthy.
    let text = scrape_until(&server, "turned unhealthy", |text| {
        value(
            text,
            "registry_transitions_total",
            &[("kind", "turned_unhealthy")],
        ) == 1.0
    })
    .await;
    assert_eq!(
        value(&text, "registry_leases", &[("state", "unhealthy")]),
        1.0,
        "{text}"
    );
    assert_eq!(
        value(&text, "registry_leases", &[("state", "healthy")]),
        0.0
    );

    // A beat brings it back.
    client
        .heartbeat(proto::HeartbeatRequest {
            instance: instance(8080),
        })
        .await
        .expect("heartbeat");
    let text = scrape_until(&server, "turned healthy", |text| {
        value(
            text,
            "registry_transitions_total",
            &[("kind", "turned_healthy")],
        ) == 1.0
    })
    .await;
    assert_eq!(
        value(&text, "registry_leases", &[("state", "healthy")]),
        1.0,
        "{text}"
    );
    // The projector applied the transitions too.
    scrape_until(&server, "projector caught up", |text| {
        value(text, "registry_projector_lag_events", &[]) == 0.0
            && value(text, "registry_projector_applied_sequence", &[])
                >= registered.revision as f64 + 2.0
    })
    .await;
}
