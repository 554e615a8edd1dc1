//! Rebuild and consistency check against real NATS JetStream and PostgreSQL.

mod common;

use common::{Setup, assert_consistent, client, dump};
use event_log::event::{InstanceTurnedHealthy, InstanceTurnedUnhealthy};
use event_log::{Append, Envelope, Event, EventLog, StreamKind};
use store::workload::Workload;
use store::{Error, Status};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_gives_tables_identical_to_the_live_ones() {
    let setup = Setup::new().await;
    let mut workload = Workload::new(11, 300, 5);
    let last = setup.append(&mut workload, 2500).await;
    let running = setup.spawn();
    running.wait_for_sequence(last).await;
    running.stop().await.unwrap();
    let live = dump(&setup.env.database_url).await;

    let summary = store::rebuild(&setup.config, setup.log.as_ref())
        .await
        .unwrap();
    assert_eq!(summary.sequence, last);
    assert_eq!(summary.events, last);
    let rebuilt = dump(&setup.env.database_url).await;
    assert_eq!(rebuilt.len(), live.len());
    assert_eq!(
        rebuilt, live,
        "rebuilt tables equal the live ones row for row"
    );
    assert_eq!(
        summary.instances as usize,
        live.iter().filter(|l| l.starts_with("instance {")).count()
    );
    let leftovers: i64 = client(&setup.env.database_url)
        .await
        .query_one(
            "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'registry_%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(leftovers, 0, "no rebuild or retired schema left behind");
    assert_consistent(&setup.config, setup.log.as_ref(), last).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_while_the_projector_runs_and_events_arrive() {
    let setup = Setup::new().await;
    let mut workload = Workload::new(12, 300, 5);
    let first = setup.append(&mut workload, 2000).await;
    let running = setup.spawn();
    running.wait_for_sequence(first).await;

    let appender = {
        let log = setup.log.clone();
        let mut workload = workload.clone();
        tokio::spawn(async move {
            let mut last = 0;
            for _ in 0..20 {
                last = common::append(log.as_ref(), &mut workload, 50).await;
            }
            last
        })
    };
    let summary = store::rebuild(&setup.config, setup.log.as_ref())
        .await
        .unwrap();
    let last = appender.await.unwrap();
    assert!(summary.sequence >= first, "{summary}");

    // The projector goes on in the swapped-in tables without a restart.
    running.wait_for_sequence(last).await;
    assert_consistent(&setup.config, setup.log.as_ref(), last).await;
    let after = setup.append(&mut workload, 500).await;
    let progress = running.wait_for_sequence(after).await;
    assert_eq!(progress.status, Status::Running);
    assert_consistent(&setup.config, setup.log.as_ref(), after).await;
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_without_live_tables_and_one_at_a_time() {
    let setup = Setup::new().await;
    let mut workload = Workload::new(13, 100, 3);
    let last = setup.append(&mut workload, 500).await;
    // Nothing ever projected into this database.
    let summary = store::rebuild(&setup.config, setup.log.as_ref())
        .await
        .unwrap();
    assert_eq!(summary.sequence, last);
    assert_consistent(&setup.config, setup.log.as_ref(), last).await;

    // A second rebuild while one holds the lock is refused, not interleaved.
    let holder = client(&setup.env.database_url).await;
    holder
        .query_one(
            "SELECT pg_advisory_lock($1)",
            &[&i64::from_be_bytes(*b"reg-rbld")],
        )
        .await
        .unwrap();
    let error = store::rebuild(&setup.config, setup.log.as_ref())
        .await
        .unwrap_err();
    assert!(matches!(error, Error::RebuildInProgress), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_every_difference() {
    let setup = Setup::new().await;
    let mut workload = Workload::new(14, 100, 3);
    let last = setup.append(&mut workload, 600).await;
    let running = setup.spawn();
    running.wait_for_sequence(last).await;
    running.stop().await.unwrap();
    assert_consistent(&setup.config, setup.log.as_ref(), last).await;

    let client = client(&setup.env.database_url).await;
    let id: String = client
        .query_one(
            "SELECT id FROM registry.instance WHERE deleted_at IS NULL ORDER BY id LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    client
        .batch_execute(&format!(
            "UPDATE registry.instance SET weight = weight + 1 WHERE id = '{id}';
             UPDATE registry.health_check SET last_transition = NULL, last_transition_at = NULL
                 WHERE instance_id = '{id}';
             INSERT INTO registry.instance_metadata VALUES ('{id}', 'forged', 'yes');
             INSERT INTO registry.instance
                 SELECT 'f00d', namespace, service, host, port, protocol, version, weight,
                        ephemeral, isolate, healthy, region, zone, campus, revision, created_at,
                        updated_at, deleted_at
                 FROM registry.instance WHERE id = '{id}';"
        ))
        .await
        .unwrap();
    let report = store::check(&setup.config, setup.log.as_ref())
        .await
        .unwrap();
    assert!(!report.is_consistent());
    let found: Vec<(&str, String, Option<&str>)> = report
        .differences
        .iter()
        .map(|d| (d.table, d.key.clone(), d.column))
        .collect();
    assert!(
        found.contains(&("instance", id.clone(), Some("weight"))),
        "{report}"
    );
    assert!(
        found.contains(&("instance", "f00d".into(), None)),
        "{report}"
    );
    assert!(
        found.contains(&(
            "instance_metadata",
            format!("{id} \"forged\""),
            Some("value")
        )),
        "{report}"
    );
    assert!(
        found
            .iter()
            .any(|(table, _, column)| *table == "service_summary" && *column == Some("total")),
        "{report}"
    );
    let text = report.to_string();
    assert!(text.contains("difference(s):"), "{text}");
    assert!(
        text.contains(&format!("instance {id} .weight: stream says")),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_repairs_tampered_rows_even_under_a_running_projector() {
    let setup = Setup::new().await;
    let streams = setup.log.streams().clone();
    let mut workload = Workload::new(15, 50, 2);
    let first = setup.append(&mut workload, 200).await;
    let running = setup.spawn();
    running.wait_for_sequence(first).await;
    running.stop().await.unwrap();

    // Damage one live instance's row by hand, then let a fresh projector read it (it trusts the
    // tables, and now holds the damaged state in its cache).
    let client = client(&setup.env.database_url).await;
    let row = client
        .query_one(
            "SELECT id, namespace, service FROM registry.instance
             WHERE deleted_at IS NULL ORDER BY id LIMIT 1",
            &[],
        )
        .await
        .unwrap();
    let (id, namespace, service): (String, String, String) = (row.get(0), row.get(1), row.get(2));
    client
        .execute(
            "UPDATE registry.instance SET weight = 999 WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    let running = setup.spawn();
    let turn = |healthy: bool| {
        let event = if healthy {
            Event::InstanceTurnedHealthy(InstanceTurnedHealthy {
                heartbeat_ms: 1_790_000_000_000,
                generation: 1,
            })
        } else {
            Event::InstanceTurnedUnhealthy(InstanceTurnedUnhealthy {
                last_heartbeat_ms: None,
                deadline_ms: 1_790_000_000_000,
                generation: 1,
            })
        };
        Append::event(
            &streams,
            &Envelope::new(namespace.clone(), service.clone(), id.clone(), event),
        )
        .unwrap()
    };
    let touched = setup
        .log
        .append(StreamKind::Events, turn(false))
        .await
        .unwrap()
        .sequence;
    running.wait_for_sequence(touched).await;
    let report = store::check(&setup.config, setup.log.as_ref())
        .await
        .unwrap();
    assert_eq!(report.differences.len(), 1, "{report}");

    store::rebuild(&setup.config, setup.log.as_ref())
        .await
        .unwrap();
    assert_consistent(&setup.config, setup.log.as_ref(), touched).await;
    // The running projector notices the swap and forgets what it had cached.
    let after = setup
        .log
        .append(StreamKind::Events, turn(true))
        .await
        .unwrap()
        .sequence;
    running.wait_for_sequence(after).await;
    assert_consistent(&setup.config, setup.log.as_ref(), after).await;
    running.stop().await.unwrap();
}
