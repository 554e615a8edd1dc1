//! The projector against real NATS JetStream and PostgreSQL: the tables equal the fold of the
//! stream after a normal run, after crashes at the awkward moments, after redeliveries and after
//! the database lost its state; undecodable events stop it with their sequence.

mod common;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use common::{Running, Setup, WAIT, assert_consistent, checkpoint, client, dump, wait_for};
use event_log::event::{InstanceRegistered, InstanceStatusChanged};
use event_log::{
    Ack, Append, DurableConsumer, Envelope, Event, EventLog, Record, RecordStream, StreamKind,
    Streams,
};
use store::workload::Workload;
use store::{Error, Status};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projection_equals_the_fold_after_a_normal_run() {
    normal_run(Setup::new().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projection_equals_the_fold_without_a_state_cache() {
    let mut setup = Setup::new().await;
    setup.config.cache_instances = 0;
    normal_run(setup).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projection_equals_the_fold_with_a_cache_that_overflows() {
    let mut setup = Setup::new().await;
    setup.config.cache_instances = 37;
    normal_run(setup).await;
}

async fn normal_run(setup: Setup) {
    let mut workload = Workload::new(1, 400, 7);
    // A backlog first (large batches), then events arriving while it runs (small ones).
    let backlog = setup.append(&mut workload, 3000).await;
    let running = setup.spawn();
    running.wait_for_sequence(backlog).await;
    let mut last = backlog;
    for _ in 0..10 {
        last = setup.append(&mut workload, 100).await;
    }
    let progress = running.wait_for_sequence(last).await;
    assert_eq!(progress.status, Status::Running);
    assert_eq!(progress.events_applied, last);
    assert!(progress.batches_applied >= 7, "{progress:?}");
    // Caught up: the lag is gone once the stream's last sequence has been read again.
    let progress = wait_for(&running.handle, |p| {
        p.stream_sequence == last && p.lag_events == 0
    })
    .await;
    assert_eq!(progress.lag, Duration::ZERO);
    assert_consistent(&setup.config, setup.log.as_ref(), last).await;
    running.stop().await.expect("clean stop");

    // A few facts straight from the tables, beyond what the check compares.
    let client = client(&setup.env.database_url).await;
    let (live, deleted, services): (i64, i64, i64) = {
        let row = client
            .query_one(
                "SELECT count(*) FILTER (WHERE deleted_at IS NULL),
                        count(*) FILTER (WHERE deleted_at IS NOT NULL),
                        count(DISTINCT (namespace, service))
                 FROM registry.instance",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1), row.get(2))
    };
    assert!(live > 100 && deleted > 10, "live {live}, deleted {deleted}");
    assert_eq!(services, 7);
    let total: i64 = client
        .query_one(
            "SELECT sum(total)::bigint FROM registry.service_summary",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(total, live);
    let orphans: i64 = client
        .query_one(
            "SELECT count(*) FROM registry.instance i
             LEFT JOIN registry.health_check h ON h.instance_id = i.id
             WHERE h.instance_id IS NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(orphans, 0, "every instance has its health_check row");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolation_survives_re_registration_and_deletion_is_a_soft_delete() {
    let setup = Setup::new().await;
    let streams = setup.log.streams().clone();
    let id = event_log::instance_id("default", "echo", "10.0.0.1", 8080);
    let registered = |isolate| {
        Event::InstanceRegistered(InstanceRegistered {
            host: "10.0.0.1".into(),
            port: 8080,
            protocol: "grpc".into(),
            version: "1".into(),
            weight: Some(100),
            metadata: [("zone".to_owned(), "a".to_owned())].into(),
            health_check: None,
            ephemeral: false,
            isolate,
            location: Default::default(),
        })
    };
    let isolate = Event::InstanceStatusChanged(InstanceStatusChanged {
        isolate: Some(true),
        ..Default::default()
    });
    let mut last = 0;
    for event in [
        registered(None),
        isolate,
        registered(None),
        Event::InstanceDeregistered(Default::default()),
    ] {
        let envelope = Envelope::new("default", "echo", id.clone(), event);
        last = setup
            .log
            .append(
                StreamKind::Events,
                Append::event(&streams, &envelope).unwrap(),
            )
            .await
            .unwrap()
            .sequence;
    }
    let running = setup.spawn();
    running.wait_for_sequence(last).await;
    let client = client(&setup.env.database_url).await;
    let row = client
        .query_one(
            "SELECT isolate, revision, deleted_at IS NOT NULL, deleted_at = updated_at
             FROM registry.instance WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0), "isolation survived re-registration");
    assert_eq!(row.get::<_, i64>(1), last as i64);
    assert!(
        row.get::<_, bool>(2) && row.get::<_, bool>(3),
        "soft delete"
    );
    let metadata: i64 = client
        .query_one(
            "SELECT count(*) FROM registry.instance_metadata WHERE instance_id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        metadata, 1,
        "a tombstone keeps its last metadata, like the fold"
    );
    let summary = client
        .query_one(
            "SELECT total, revision FROM registry.service_summary
             WHERE namespace = 'default' AND service = 'echo'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(summary.get::<_, i64>(0), 0);
    assert_eq!(
        summary.get::<_, i64>(1),
        last as i64,
        "deletion moves the service revision"
    );
    assert_consistent(&setup.config, setup.log.as_ref(), last).await;
    running.stop().await.unwrap();
}

/// Runs the projector through 1000 events, then makes its next batch block on `lock` (a table
/// lock held by the test), kills the projector while it waits, releases the lock and restarts
/// it. Returns the checkpoint found after the kill, and checks that the restarted projector
/// applies every later event exactly once and the tables equal the fold.
async fn kill_while_blocked(lock: &str) -> (u64, u64) {
    let setup = Setup::new().await;
    let mut workload = Workload::new(2, 300, 5);
    let first = setup.append(&mut workload, 1000).await;
    let running = setup.spawn();
    running.wait_for_sequence(first).await;

    let mut blocker = client(&setup.env.database_url).await;
    let held = blocker.transaction().await.unwrap();
    held.batch_execute(lock).await.unwrap();
    let last = setup.append(&mut workload, 2000).await;
    let watcher = client(&setup.env.database_url).await;
    tokio::time::timeout(WAIT, async {
        loop {
            let blocked: i64 = watcher
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                     WHERE application_name = 'registry-store-projector'
                       AND wait_event_type = 'Lock'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            if blocked > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the projector blocks mid-batch");
    running.task.abort();
    assert!(running.task.await.unwrap_err().is_cancelled());
    held.rollback().await.unwrap();
    // The killed projector's connection may still finish what it had sent; wait until its
    // backend is gone before reading the checkpoint it left.
    tokio::time::timeout(WAIT, async {
        loop {
            let backends: i64 = watcher
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                     WHERE application_name = 'registry-store-projector'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            if backends == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the killed projector's backend ends");
    let after_kill = checkpoint(&setup.env.database_url).await as u64;

    let restarted = setup.spawn();
    let progress = restarted.wait_for_sequence(last).await;
    assert_eq!(
        progress.events_applied,
        last - after_kill,
        "each event after the checkpoint applied once, none before it"
    );
    assert_consistent(&setup.config, setup.log.as_ref(), last).await;
    restarted.stop().await.unwrap();
    (first, after_kill)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_before_writing_a_batch_it_resumes_without_losing_or_double_applying() {
    // Blocks the first round trip of the batch (checkpoint lock and load): nothing is written
    // or committed when it dies.
    let (first, after_kill) =
        kill_while_blocked("LOCK TABLE registry.projector_checkpoint IN EXCLUSIVE MODE").await;
    assert_eq!(
        after_kill, first,
        "nothing of the interrupted batch is committed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_while_writing_a_batch_it_resumes_without_losing_or_double_applying() {
    // Blocks the second round trip (writes, checkpoint and COMMIT already on the wire): the
    // batch lands whole or not at all, never in part, and the restart takes it from there.
    let (first, after_kill) =
        kill_while_blocked("LOCK TABLE registry.instance IN EXCLUSIVE MODE").await;
    assert!(after_kill >= first, "{after_kill} < {first}");
}

/// An event log whose durable consumers never acknowledge: every restart redelivers the whole
/// stream, as after a crash between the commit and the acknowledgement.
#[derive(Debug)]
struct NeverAcks(Arc<dyn EventLog>);

#[derive(Debug)]
struct NeverAcksConsumer(Box<dyn DurableConsumer>);

#[async_trait]
impl DurableConsumer for NeverAcksConsumer {
    async fn fetch(&mut self, max: usize, wait: Duration) -> event_log::Result<Vec<Record>> {
        self.0.fetch(max, wait).await
    }

    async fn ack_through(&mut self, _sequence: u64) -> event_log::Result<()> {
        Ok(())
    }
}

#[async_trait]
impl EventLog for NeverAcks {
    fn streams(&self) -> &Streams {
        self.0.streams()
    }
    async fn ensure_streams(&self) -> event_log::Result<()> {
        self.0.ensure_streams().await
    }
    async fn append(&self, stream: StreamKind, append: Append) -> event_log::Result<Ack> {
        self.0.append(stream, append).await
    }
    async fn append_many(
        &self,
        stream: StreamKind,
        appends: Vec<Append>,
    ) -> Vec<event_log::Result<Ack>> {
        self.0.append_many(stream, appends).await
    }
    async fn replay(
        &self,
        stream: StreamKind,
        from_sequence: u64,
        filter: Option<&str>,
    ) -> event_log::Result<RecordStream> {
        self.0.replay(stream, from_sequence, filter).await
    }
    async fn durable(
        &self,
        stream: StreamKind,
        name: &str,
        filter: Option<&str>,
        from_sequence: u64,
    ) -> event_log::Result<Box<dyn DurableConsumer>> {
        let inner = self.0.durable(stream, name, filter, from_sequence).await?;
        Ok(Box::new(NeverAcksConsumer(inner)))
    }
    async fn last_sequence(&self, stream: StreamKind) -> event_log::Result<u64> {
        self.0.last_sequence(stream).await
    }
    async fn last_for_subject(
        &self,
        stream: StreamKind,
        subject: &str,
    ) -> event_log::Result<Option<Record>> {
        self.0.last_for_subject(stream, subject).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivered_and_reapplied_events_are_harmless() {
    let setup = Setup::new().await;
    let log: Arc<dyn EventLog> = Arc::new(NeverAcks(setup.log()));
    let mut workload = Workload::new(3, 200, 3);
    let last = setup.append(&mut workload, 1500).await;
    let running = Running::spawn(setup.config.clone(), log.clone());
    running.wait_for_sequence(last).await;
    running.stop().await.unwrap();

    // Restarted, the consumer delivers everything again (as after a crash between commit and
    // acknowledgement). The events after them arrive in order, so once those are applied the
    // redelivered ones have been seen, and the checkpoint dropped every one of them.
    let again = Running::spawn(setup.config.clone(), log.clone());
    let more = setup.append(&mut workload, 10).await;
    let progress = again.wait_for_sequence(more).await;
    assert_eq!(progress.events_applied, more - last);
    again.stop().await.unwrap();
    let before = dump(&setup.env.database_url).await;
    assert_consistent(&setup.config, log.as_ref(), more).await;

    // Without the checkpoint's protection (moved back to 0 by hand), every event goes through
    // the writer a second time: the fold ignores sequences at or below each instance's revision,
    // so the tables do not change at all.
    client(&setup.env.database_url)
        .await
        .batch_execute("UPDATE registry.projector_checkpoint SET last_sequence = 0")
        .await
        .unwrap();
    let reapplied = Running::spawn(setup.config.clone(), log.clone());
    let progress = reapplied.wait_for_sequence(more).await;
    assert_eq!(progress.events_applied, more);
    reapplied.stop().await.unwrap();
    assert_eq!(dump(&setup.env.database_url).await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_lost_its_state_is_repaired_from_the_log() {
    let setup = Setup::new().await;
    let mut workload = Workload::new(4, 200, 3);
    let last = setup.append(&mut workload, 1200).await;
    let running = setup.spawn();
    running.wait_for_sequence(last).await;
    running.stop().await.unwrap();

    // As after restoring an empty backup: the durable consumer has acknowledged everything,
    // the tables are gone.
    client(&setup.env.database_url)
        .await
        .batch_execute("DROP SCHEMA registry CASCADE")
        .await
        .unwrap();
    let restarted = setup.spawn();
    restarted.wait_for_sequence(last).await;
    assert_consistent(&setup.config, setup.log.as_ref(), last).await;
    let more = setup.append(&mut workload, 100).await;
    restarted.wait_for_sequence(more).await;
    assert_consistent(&setup.config, setup.log.as_ref(), more).await;
    restarted.stop().await.unwrap();
}

async fn assert_stops_at_undecodable(payload: Vec<u8>) {
    let setup = Setup::new().await;
    let mut workload = Workload::new(5, 50, 2);
    let good = setup.append(&mut workload, 120).await;
    let subject = setup
        .log
        .streams()
        .instance_subject("default", "bad", &"0".repeat(40));
    let bad = setup
        .log
        .append(StreamKind::Events, Append::new(subject, payload))
        .await
        .unwrap()
        .sequence;
    assert_eq!(bad, good + 1);
    setup.append(&mut workload, 30).await;

    let running = setup.spawn();
    let result = tokio::time::timeout(WAIT, running.task)
        .await
        .expect("the projector stops by itself")
        .unwrap();
    let error = result.expect_err("an undecodable event stops the projector");
    assert!(
        matches!(error, Error::Undecodable { sequence, .. } if sequence == bad),
        "{error}"
    );
    assert!(
        error.to_string().contains(&format!("sequence {bad}")),
        "{error}"
    );
    assert!(!error.is_retryable());
    let progress = running.handle.progress();
    assert_eq!(progress.status, Status::Failed);
    assert_eq!(
        progress.applied_sequence, good,
        "everything before it applied"
    );
    assert!(progress.last_error.unwrap().contains(&bad.to_string()));
    assert_eq!(checkpoint(&setup.env.database_url).await, good as i64);
    // The tables equal the fold up to the checkpoint, which stops before the bad event.
    assert_consistent(&setup.config, setup.log.as_ref(), good).await;

    // A restart does not skip it either.
    let again = setup.spawn();
    let error = tokio::time::timeout(WAIT, again.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(matches!(error, Error::Undecodable { sequence, .. } if sequence == bad));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_event_stops_the_projector_naming_its_sequence() {
    assert_stops_at_undecodable(b"\x00not an event".to_vec()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_schema_version_stops_the_projector_naming_its_sequence() {
    let envelope = Envelope::new(
        "default",
        "bad",
        "0".repeat(40),
        Event::InstanceDeregistered(Default::default()),
    );
    let mut json: serde_json::Value = serde_json::from_slice(&envelope.encode().unwrap()).unwrap();
    json["schema_version"] = 99.into();
    assert_stops_at_undecodable(serde_json::to_vec(&json).unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_projector_per_database_the_other_stands_by() {
    let setup = Setup::new().await;
    let mut workload = Workload::new(6, 100, 2);
    let first = setup.append(&mut workload, 300).await;
    let active = setup.spawn();
    active.wait_for_sequence(first).await;
    let standby = setup.spawn();
    wait_for(&standby.handle, |p| p.status == Status::Standby).await;

    active.stop().await.unwrap();
    wait_for(&standby.handle, |p| p.status == Status::Running).await;
    let last = setup.append(&mut workload, 300).await;
    standby.wait_for_sequence(last).await;
    assert_consistent(&setup.config, setup.log.as_ref(), last).await;
    standby.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_ahead_of_the_stream_are_refused() {
    let setup = Setup::new().await;
    let mut workload = Workload::new(7, 50, 2);
    let last = setup.append(&mut workload, 100).await;
    let running = setup.spawn();
    running.wait_for_sequence(last).await;
    running.stop().await.unwrap();

    // The same database, a new (empty) stream: as if the stream had been recreated.
    let other = common::connect_log(&setup.env.nats_url, &format!("{}x", setup.env.prefix)).await;
    let result = Running::spawn(setup.config.clone(), other.clone())
        .task
        .await
        .unwrap();
    assert!(
        matches!(result, Err(Error::AheadOfStream { checkpoint, stream_last: 0 }) if checkpoint == last),
        "{result:?}"
    );
    let report = store::check(&setup.config, other.as_ref()).await.unwrap();
    assert!(!report.is_consistent(), "{report}");
    // TestEnv only removes the streams of its own prefix.
    let jetstream = async_nats::jetstream::new(other.client().clone());
    for stream in [
        other.streams().events_stream(),
        other.streams().heartbeats_stream(),
    ] {
        jetstream.delete_stream(stream).await.unwrap();
    }
}
