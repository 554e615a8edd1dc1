//! SIGTERM during a heartbeat load: registryd stops accepting, finishes the calls in flight,
//! flushes the pending heartbeat batch and exits 0; every heartbeat it acknowledged is in the
//! stream.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use event_log::event::Event;
use event_log::{EventLog, JetStreamConfig, JetStreamLog, StreamKind, Streams};
use futures::StreamExt;
use sdk::proto;
use sdk::proto::registry_client::RegistryClient;
use xtask::harness::TestEnv;

const INSTANCES: u32 = 64;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_heartbeat_load_loses_no_acknowledged_beat() {
    let env = TestEnv::nats_only().await.unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_registryd"))
        .args([
            "api",
            "--listen",
            "127.0.0.1:0",
            "--nats-url",
            &env.nats_url,
            "--stream-prefix",
            &env.prefix,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let address = tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(stdout).lines();
        let address = lines
            .by_ref()
            .map_while(Result::ok)
            .find_map(|line| {
                line.strip_prefix("registryd: gRPC API listening on ")
                    .map(str::to_owned)
            })
            .expect("registryd prints its address");
        std::thread::spawn(move || for _ in lines {});
        address
    })
    .await
    .unwrap();
    let client = RegistryClient::connect(format!("http://{address}"))
        .await
        .unwrap();

    let mut ids = Vec::new();
    for port in 1..=INSTANCES {
        let registered = client
            .clone()
            .register_instance(proto::RegisterInstanceRequest {
                namespace: "load".into(),
                service: "beats".into(),
                host: "10.0.0.1".into(),
                port,
                health_check: Some(proto::HealthCheck { ttl_ms: 60_000 }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        ids.push(registered.instance_id);
    }

    // One task per instance beats as fast as it is answered and counts acknowledgements.
    let acknowledged: Arc<HashMap<String, AtomicU64>> = Arc::new(
        ids.iter()
            .map(|id| (id.clone(), AtomicU64::new(0)))
            .collect(),
    );
    let total = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for id in ids.clone() {
        let mut client = client.clone();
        let acknowledged = Arc::clone(&acknowledged);
        let total = Arc::clone(&total);
        load.push(tokio::spawn(async move {
            let reference = proto::InstanceRef {
                target: Some(proto::instance_ref::Target::Id(id.clone())),
            };
            while client
                .heartbeat(proto::HeartbeatRequest {
                    instance: Some(reference.clone()),
                })
                .await
                .is_ok()
            {
                acknowledged[&id].fetch_add(1, Ordering::Relaxed);
                total.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // Let the load build up (wait for acknowledgements, not for time).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while total.load(Ordering::Relaxed) < 2_000 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the load never got going"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "registryd exited with {status}");
    for task in load {
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .unwrap()
            .unwrap();
    }

    // Every acknowledged beat is in the heartbeat stream.
    let log = JetStreamLog::connect(
        &env.nats_url,
        Streams::new(&env.prefix),
        JetStreamConfig::default(),
    )
    .await
    .unwrap();
    let last = log.last_sequence(StreamKind::Heartbeats).await.unwrap();
    let mut stored: HashMap<String, u64> = HashMap::new();
    let mut records = log.replay(StreamKind::Heartbeats, 0, None).await.unwrap();
    loop {
        let record = tokio::time::timeout(Duration::from_secs(10), records.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let Event::HeartbeatsReceived(batch) = record.decode().unwrap().event else {
            panic!("not a batch")
        };
        for beat in batch.beats {
            *stored.entry(beat.instance_id).or_default() += 1;
        }
        if record.sequence >= last {
            break;
        }
    }
    let acknowledged_total = total.load(Ordering::Relaxed);
    assert!(acknowledged_total >= 2_000);
    for id in &ids {
        let acked = acknowledged[id].load(Ordering::Relaxed);
        let in_stream = stored.get(id).copied().unwrap_or(0);
        assert!(
            in_stream >= acked,
            "{id}: {acked} acknowledged, {in_stream} stored"
        );
    }
}
