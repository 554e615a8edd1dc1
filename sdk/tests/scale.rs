//! Many instances in one process against a real `registryd`: one heartbeat stream carries
//! them all; and the errors a caller can act on.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use event_log::{Event, EventLog, JetStreamConfig, JetStreamLog, StreamKind, Streams};
use futures::StreamExt;
use sdk::{InstanceSpec, Provider, RegisterErrorKind};
use support::{Registryd, WAIT, client};
use xtask::harness::TestEnv;

const INSTANCES: u16 = 1000;

/// 1,000 instances registered through one provider heartbeat over one `StreamHeartbeats`
/// stream, in batches; the registry records a beat of every one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_instances_share_one_heartbeat_stream() {
    let env = TestEnv::nats_only().await.expect("NATS");
    let api = Registryd::start(&env, "api", &[]).await;
    let client = client(&[api.endpoint()]);
    let provider = Provider::new(client.clone());

    let started = std::time::Instant::now();
    let mut registering = futures::stream::iter(0..INSTANCES)
        .map(|n| {
            let provider = provider.clone();
            async move {
                let spec = InstanceSpec::new("fleet", "worker", "10.1.0.1", 20_000 + n)
                    .ttl(Duration::from_secs(1));
                provider.register(spec).await
            }
        })
        .buffer_unordered(64);
    let mut handles = Vec::with_capacity(usize::from(INSTANCES));
    while let Some(handle) = registering.next().await {
        handles.push(handle.expect("register"));
    }
    drop(registering);
    let ids: HashSet<String> = handles.iter().map(|h| h.id().to_owned()).collect();
    assert_eq!(ids.len(), usize::from(INSTANCES));
    eprintln!(
        "registered {INSTANCES} instances in {:?}",
        started.elapsed()
    );
    let started = std::time::Instant::now();

    // Independent check on the server side: read the heartbeat stream until every instance
    // has a beat recorded after registration.
    let log = JetStreamLog::connect(
        &env.nats_url,
        Streams::new(&env.prefix),
        JetStreamConfig::default(),
    )
    .await
    .expect("NATS");
    let mut beats = log
        .replay(StreamKind::Heartbeats, 0, None)
        .await
        .expect("replay heartbeats");
    let mut missing = ids.clone();
    tokio::time::timeout(WAIT, async {
        while !missing.is_empty() {
            let record = beats.next().await.expect("stream open").expect("record");
            if let Event::HeartbeatsReceived(batch) = record.decode().expect("decode").event {
                for beat in batch.beats {
                    missing.remove(&beat.instance_id);
                }
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "{} instances never beat: {:?}",
            missing.len(),
            provider.stats()
        )
    });

    let stats = provider.stats();
    eprintln!(
        "every instance beat within {:?}: {stats:?}",
        started.elapsed()
    );
    let started = std::time::Instant::now();
    assert_eq!(stats.instances, u64::from(INSTANCES));
    assert_eq!(stats.streams_opened, 1, "one stream for all: {stats:?}");
    assert_eq!(stats.stream_failures, 0, "{stats:?}");
    assert_eq!(stats.not_found, 0, "{stats:?}");
    assert!(stats.heartbeats_sent >= u64::from(INSTANCES), "{stats:?}");
    // Batched: far fewer messages than beats.
    assert!(
        stats.batches_sent * 10 <= stats.heartbeats_sent,
        "{stats:?}"
    );

    let services = client.list_services("fleet").await.expect("list");
    assert_eq!((services[0].total, services[0].healthy), (1000, 1000));

    // Shutdown deregisters every one of them.
    let report = provider.shutdown().await;
    assert!(report.is_clean(), "{:?}", report.failed.first());
    assert_eq!(report.deregistered.len(), usize::from(INSTANCES));
    eprintln!(
        "deregistered {INSTANCES} instances in {:?}",
        started.elapsed()
    );
    let services = client.list_services("fleet").await.expect("list");
    assert!(services.iter().all(|s| s.total == 0), "{services:?}");
    // The handles are inert now: dropping them does nothing.
    drop(handles);
}

/// Bad input is refused with the fields named; nothing is kept alive for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_registrations_are_refused_with_the_fields_named() {
    let env = TestEnv::nats_only().await.expect("NATS");
    let api = Registryd::start(&env, "api", &["--embedded"]).await;
    let provider = Provider::new(client(&[api.endpoint()]));
    let spec =
        InstanceSpec::new("default", "bad name!", "10.0.0.1", 0).ttl(Duration::from_millis(10));
    let error = provider.register(spec).await.expect_err("invalid");
    assert_eq!(error.kind(), RegisterErrorKind::InvalidArgument);
    let fields: Vec<&str> = error
        .violations()
        .iter()
        .map(|v| v.field.as_str())
        .collect();
    for field in ["service", "port", "health_check.ttl_ms"] {
        assert!(fields.contains(&field), "{field} not in {fields:?}");
    }
    assert_eq!(provider.stats().instances, 0);
    assert!(provider.shutdown().await.is_clean());
    // After shutdown the provider refuses new work.
    let closed = provider
        .register(InstanceSpec::new("default", "echo", "10.0.0.1", 8080))
        .await
        .expect_err("closed");
    assert_eq!(closed.kind(), RegisterErrorKind::Closed);
}

/// Operations on one address are serialised: a handle dropped and the address registered
/// again at once ends registered (the deregistration does not overtake the new registration),
/// and an explicit deregistration removes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_then_register_again_ends_registered_and_deregister_removes() {
    let env = TestEnv::nats_only().await.expect("NATS");
    let api = Registryd::start(&env, "api", &["--embedded"]).await;
    let client = client(&[api.endpoint()]);
    let provider = Provider::new(client.clone());
    let spec = InstanceSpec::new("default", "echo", "10.0.0.1", 8080).ttl(Duration::from_secs(1));
    let id = spec.id();
    let first = provider.register(spec.clone()).await.expect("register");
    drop(first);
    let mut second = provider.register(spec).await.expect("register again");
    tokio::time::timeout(WAIT, second.wait_for(sdk::LeaseStatus::is_active))
        .await
        .expect("active");
    let instance = client.get_instance(&id).await.expect("registered");
    assert_eq!(instance.id, id);
    second.deregister().await.expect("deregister");
    let gone = client.get_instance(&id).await.expect_err("deregistered");
    assert_eq!(gone.kind(), sdk::QueryErrorKind::NotFound);
    assert_eq!(provider.stats().instances, 0);
    let stats = provider.stats();
    assert_eq!(
        (stats.registrations, stats.deregistrations),
        (2, 2),
        "{stats:?}"
    );
}
