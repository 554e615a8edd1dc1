//! PostgreSQL going away under a running projector: a private server the test stops and starts.

mod common;

use std::time::Duration;

use common::{Running, assert_consistent, connect_log, test_config, wait_for};
use store::Status;
use store::workload::Workload;
use xtask::harness::{PrivatePostgres, TestEnv, database_url_for};

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
