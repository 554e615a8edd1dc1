//! Shared helpers of the store's integration tests: a stream prefix and a database per test
//! (through the xtask harness), a projector on a task, a dump of the tables, and waiting for
//! progress with a timeout instead of sleeping.

#![allow(dead_code)] // Each test binary uses a different subset.

use std::sync::Arc;
use std::time::Duration;

use event_log::{EventLog, JetStreamConfig, JetStreamLog, Streams};
use store::workload::{Workload, append_all};
use store::{Config, Progress, Projector, ProjectorHandle};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use xtask::harness::TestEnv;

/// Upper bound for anything a test waits for.
pub const WAIT: Duration = Duration::from_secs(30);

/// Logs to the test output when `RUST_LOG` asks for it.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
}

/// A projector configuration for tests: fast retries and progress refreshes.
pub fn test_config(database_url: &str) -> Config {
    Config {
        batch_size: 500,
        idle_wait: Duration::from_millis(100),
        retry_initial: Duration::from_millis(50),
        retry_max: Duration::from_millis(500),
        progress_interval: Duration::from_millis(100),
        ..Config::new(database_url)
    }
}

/// One test's NATS streams and database.
pub struct Setup {
    pub env: TestEnv,
    pub log: Arc<JetStreamLog>,
    pub config: Config,
}

impl Setup {
    pub async fn new() -> Setup {
        init_tracing();
        let env = TestEnv::new()
            .await
            .expect("NATS and PostgreSQL for the test");
        let log = connect_log(&env.nats_url, &env.prefix).await;
        let config = test_config(&env.database_url);
        Setup { env, log, config }
    }

    pub fn log(&self) -> Arc<dyn EventLog> {
        self.log.clone()
    }

    /// Appends `count` events of `workload`; returns the last sequence.
    pub async fn append(&self, workload: &mut Workload, count: usize) -> u64 {
        append(self.log.as_ref(), workload, count).await
    }

    pub fn spawn(&self) -> Running {
        Running::spawn(self.config.clone(), self.log())
    }
}

pub async fn connect_log(nats_url: &str, prefix: &str) -> Arc<JetStreamLog> {
    let log = JetStreamLog::connect(nats_url, Streams::new(prefix), JetStreamConfig::default())
        .await
        .expect("connected to NATS");
    log.ensure_streams().await.expect("streams");
    Arc::new(log)
}

pub async fn append(log: &dyn EventLog, workload: &mut Workload, count: usize) -> u64 {
    let appends = workload
        .appends(log.streams(), count)
        .expect("events encode");
    append_all(log, appends).await.expect("appended")
}

/// A projector running on a task.
pub struct Running {
    pub handle: ProjectorHandle,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<store::Result<()>>,
}

impl Running {
    pub fn spawn(config: Config, log: Arc<dyn EventLog>) -> Running {
        let projector = Projector::new(config, log);
        let handle = projector.handle();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(projector.run(shutdown.clone()));
        Running {
            handle,
            shutdown,
            task,
        }
    }

    /// Waits until the tables include `sequence`, or fails the test with the progress.
    pub async fn wait_for_sequence(&self, sequence: u64) -> Progress {
        wait_for(&self.handle, |progress| {
            progress.applied_sequence >= sequence
        })
        .await
    }

    /// Cancels and waits for `run` to return.
    pub async fn stop(self) -> store::Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("projector stops in time")
            .expect("projector task did not panic")
    }
}

/// Waits until `condition` holds, or fails the test with the last progress seen.
pub async fn wait_for(
    handle: &ProjectorHandle,
    condition: impl FnMut(&Progress) -> bool,
) -> Progress {
    match tokio::time::timeout(WAIT, handle.wait_for(condition)).await {
        Ok(Some(progress)) => progress,
        Ok(None) => panic!("projector stopped first: {:?}", handle.progress()),
        Err(_) => panic!("timed out; progress: {:?}", handle.progress()),
    }
}

pub async fn client(database_url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(database_url, tokio_postgres::NoTls)
        .await
        .expect("connected to PostgreSQL");
    tokio::spawn(connection);
    client
}

/// Every row of the projection as text, in a stable order: two dumps are equal exactly when the
/// tables are.
pub async fn dump(database_url: &str) -> Vec<String> {
    let client = client(database_url).await;
    let mut lines = Vec::new();
    for (table, order) in [
        ("instance", "id"),
        ("health_check", "instance_id"),
        ("instance_metadata", "instance_id, key"),
        ("service_summary", "namespace, service"),
    ] {
        let query = format!(
            "SELECT row_to_json(t)::text FROM {}.{table} t ORDER BY {order}",
            store::SCHEMA
        );
        for row in client.query(&query, &[]).await.expect("dump query") {
            lines.push(format!("{table} {}", row.get::<_, String>(0)));
        }
    }
    let checkpoint = client
        .query_one(
            &format!(
                "SELECT last_sequence, last_stored_at::text FROM {}.projector_checkpoint",
                store::SCHEMA
            ),
            &[],
        )
        .await
        .expect("checkpoint");
    lines.push(format!(
        "checkpoint {} {:?}",
        checkpoint.get::<_, i64>(0),
        checkpoint.get::<_, Option<String>>(1)
    ));
    lines
}

/// The tables' checkpoint, read directly.
pub async fn checkpoint(database_url: &str) -> i64 {
    client(database_url)
        .await
        .query_one(
            &format!(
                "SELECT last_sequence FROM {}.projector_checkpoint",
                store::SCHEMA
            ),
            &[],
        )
        .await
        .expect("checkpoint")
        .get(0)
}

/// Asserts that the consistency check finds no difference.
pub async fn assert_consistent(config: &Config, log: &dyn EventLog, at_least: u64) {
    let report = store::check(config, log).await.expect("check runs");
    assert!(report.is_consistent(), "{report}");
    assert!(
        report.checkpoint >= at_least,
        "checked at {} instead of {at_least}: {report}",
        report.checkpoint
    );
}
