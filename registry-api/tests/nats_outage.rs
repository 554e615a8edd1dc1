//! NATS goes away and comes back: calls fail fast with UNAVAILABLE, reads keep working from the
//! read model, the server recovers by itself, and nothing acknowledged is lost.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use sdk::proto;
use support::*;
use tonic::Code;
use xtask::harness::{PrivateNats, TestEnv};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_outage_fails_fast_and_recovers() {
    let mut nats = tokio::task::spawn_blocking(PrivateNats::start)
        .await
        .unwrap()
        .unwrap();
    let env = TestEnv::nats_only_at(&nats.url()).await.unwrap();
    let mut api = start_with(env, registry_api::Config::default()).await;
    let before = api
        .client
        .register_instance(registration("echo", 80))
        .await
        .unwrap()
        .into_inner();

    nats = tokio::task::spawn_blocking(move || {
        nats.stop();
        nats
    })
    .await
    .unwrap();
    // Calls already in flight when NATS dies wait for their acknowledgement at most the ack
    // timeout; calls once the loss is known must fail at once.
    let noticed = Instant::now() + Duration::from_secs(10);
    while api.log.is_connected() {
        assert!(
            Instant::now() < noticed,
            "the NATS client never noticed the server died"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = Instant::now();
    let status = api
        .client
        .register_instance(registration("echo", 81))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let status = api
        .client
        .heartbeat(proto::HeartbeatRequest {
            instance: by_id(&before.instance_id),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "failed fast: {:?}",
        started.elapsed()
    );
    // Reads are served from the read model throughout.
    let found = api
        .client
        .discover(proto::DiscoverRequest {
            namespace: "default".into(),
            service: "echo".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(found.instances.len(), 1);

    let mut nats = tokio::task::spawn_blocking(move || {
        nats.resume().unwrap();
        nats
    })
    .await
    .unwrap();
    // The client retries (as a client would, with a pause between attempts) until the server
    // has reconnected by itself.
    let deadline = Instant::now() + Duration::from_secs(20);
    let after = loop {
        match api.client.register_instance(registration("echo", 81)).await {
            Ok(response) => break response.into_inner(),
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                assert!(Instant::now() < deadline, "server did not recover");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert!(after.revision > before.revision);
    api.client
        .heartbeat(proto::HeartbeatRequest {
            instance: by_id(&before.instance_id),
        })
        .await
        .unwrap();
    let found = api
        .client
        .discover(proto::DiscoverRequest {
            namespace: "default".into(),
            service: "echo".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut ports: Vec<u32> = found.instances.iter().map(|i| i.port).collect();
    ports.sort();
    assert_eq!(
        ports,
        [80, 81],
        "the acknowledged registration survived the outage"
    );
    api.shutdown.cancel();
    nats.stop();
}
