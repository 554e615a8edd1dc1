//! Shared set-up for the API's integration tests: a real server on a free port over real NATS
//! JetStream (a fresh stream prefix per test), and a client.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use event_log::{EventLog, JetStreamConfig, JetStreamLog, Streams};
use registry_api::{Config, Server};
use sdk::proto;
use sdk::proto::registry_client::RegistryClient;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use xtask::harness::TestEnv;

pub struct Api {
    pub client: RegistryClient<Channel>,
    pub log: Arc<JetStreamLog>,
    pub address: std::net::SocketAddr,
    pub shutdown: CancellationToken,
    pub server: tokio::task::JoinHandle<()>,
    pub env: TestEnv,
}

pub async fn start_with(env: TestEnv, config: Config) -> Api {
    let log = Arc::new(
        JetStreamLog::connect(
            &env.nats_url,
            Streams::new(&env.prefix),
            JetStreamConfig::default(),
        )
        .await
        .expect("NATS"),
    );
    log.ensure_streams().await.expect("streams");
    let server = Server::bind(
        Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            ..config
        },
        Arc::clone(&log) as Arc<dyn EventLog>,
    )
    .await
    .expect("bind");
    let address = server.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let server = tokio::spawn(async move {
        server.run(token).await.expect("server runs");
    });
    let client = RegistryClient::connect(format!("http://{address}"))
        .await
        .expect("connect")
        .max_decoding_message_size(16 << 20);
    Api {
        client,
        log,
        address,
        shutdown,
        server,
        env,
    }
}

pub async fn start() -> Api {
    start_with(TestEnv::nats_only().await.expect("NATS"), Config::default()).await
}

pub fn registration(service: &str, port: u32) -> proto::RegisterInstanceRequest {
    proto::RegisterInstanceRequest {
        namespace: "default".into(),
        service: service.into(),
        host: "10.0.0.1".into(),
        port,
        health_check: Some(proto::HealthCheck { ttl_ms: 1000 }),
        ..Default::default()
    }
}

pub fn by_id(id: &str) -> Option<proto::InstanceRef> {
    Some(proto::InstanceRef {
        target: Some(proto::instance_ref::Target::Id(id.to_owned())),
    })
}

pub fn by_address(service: &str, port: u32) -> Option<proto::InstanceRef> {
    Some(proto::InstanceRef {
        target: Some(proto::instance_ref::Target::Address(
            proto::InstanceAddress {
                namespace: "default".into(),
                service: service.into(),
                host: "10.0.0.1".into(),
                port,
            },
        )),
    })
}

/// The fields named by a status's google.rpc.BadRequest detail.
pub fn bad_fields(status: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt;
    status
        .get_details_bad_request()
        .map(|bad| bad.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

pub async fn last_sequences(log: &JetStreamLog) -> (u64, u64) {
    (
        log.last_sequence(event_log::StreamKind::Events)
            .await
            .unwrap(),
        log.last_sequence(event_log::StreamKind::Heartbeats)
            .await
            .unwrap(),
    )
}

pub const WAIT: Duration = Duration::from_secs(10);
