//! PostgreSQL or NATS going away under a running projector: private servers the tests stop and
//! start again.

mod common;

use std::time::Duration;

use common::{Running, assert_consistent, connect_log, test_config, wait_for};
use store::Status;
use store::workload::Workload;
use xtask::harness::{PrivateNats, PrivatePostgres, TestEnv, database_url_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_is_retried_with_lag_visible_then_caught_up() {
    common::init_tracing();
    let env = TestEnv::nats_only().await.expect("NATS for the test");
    let mut postgres = tokio::task::spawn_blocking(PrivatePostgres::start)
        .await
        .unwrap()
        .expect("a private PostgreSQL");
    let admin = common::client(&postgres.url()).await;
    admin
        .batch_execute("CREATE DATABASE projection")
        .await
        .unwrap();
    drop(admin);
    let database_url = database_url_for(&postgres.url(), "projection").unwrap();
    let config = test_config(&database_url);
    let log = connect_log(&env.nats_url, &env.prefix).await;
    let mut workload = Workload::new(21, 200, 3);

    let first = common::append(log.as_ref(), &mut workload, 800).await;
    let running = Running::spawn(config.clone(), log.clone());
    running.wait_for_sequence(first).await;

    let mut postgres = tokio::task::spawn_blocking(move || {
        postgres.stop();
        postgres
    })
    .await
    .unwrap();
    let last = common::append(log.as_ref(), &mut workload, 800).await;
    // The projector fails, backs off, and keeps reporting a growing lag meanwhile.
    let progress = wait_for(&running.handle, |p| {
        matches!(p.status, Status::Retrying { attempt } if attempt >= 3)
            && p.lag_events == last - first
            && p.lag > Duration::ZERO
    })
    .await;
    assert_eq!(progress.applied_sequence, first);
    assert!(progress.last_error.is_some(), "{progress:?}");

    let postgres = tokio::task::spawn_blocking(move || {
        postgres.resume().expect("PostgreSQL starts again");
        postgres
    })
    .await
    .unwrap();
    let progress = running.wait_for_sequence(last).await;
    assert_eq!(progress.events_applied, last, "every event applied once");
    let progress = wait_for(&running.handle, |p| {
        p.status == Status::Running && p.lag_events == 0
    })
    .await;
    assert_eq!(progress.last_error, None);
    assert_consistent(&config, log.as_ref(), last).await;
    running.stop().await.unwrap();
    drop(postgres);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_outage_is_visible_then_caught_up() {
    common::init_tracing();
    let env = TestEnv::new().await.expect("PostgreSQL for the test");
    let mut nats = tokio::task::spawn_blocking(PrivateNats::start)
        .await
        .unwrap()
        .expect("a private nats-server");
    let config = test_config(&env.database_url);
    let log = connect_log(&nats.url(), &env.prefix).await;
    let mut workload = Workload::new(22, 200, 3);

    let first = common::append(log.as_ref(), &mut workload, 500).await;
    let running = Running::spawn(config.clone(), log.clone());
    running.wait_for_sequence(first).await;

    let mut nats = tokio::task::spawn_blocking(move || {
        nats.stop();
        nats
    })
    .await
    .unwrap();
    // An idle projector has nothing to fail on; the outage shows in its progress.
    // Either the idle check's error or, when the outage catches an acknowledgement in flight,
    // the session's.
    let progress = wait_for(&running.handle, |p| p.last_error.is_some()).await;
    let error = progress.last_error.unwrap();
    assert!(
        error.contains("event stream") || error.contains("event log"),
        "the error names what is unreachable: {error}"
    );
    let nats = tokio::task::spawn_blocking(move || {
        nats.resume().expect("nats-server starts again");
        nats
    })
    .await
    .unwrap();
    log.wait_connected(common::WAIT).await.expect("reconnected");
    // JetStream kept the stream on disk; appends resume where they stopped.
    let last = common::append(log.as_ref(), &mut workload, 500).await;
    assert_eq!(last, 2 * first);
    let progress = running.wait_for_sequence(last).await;
    assert_eq!(progress.events_applied, last, "every event applied once");
    assert_consistent(&config, log.as_ref(), last).await;
    let progress = wait_for(&running.handle, |p| p.last_error.is_none()).await;
    assert_eq!(progress.status, Status::Running);
    running.stop().await.unwrap();
    drop(nats);
}
