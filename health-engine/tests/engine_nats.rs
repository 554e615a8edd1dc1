//! The engine against real NATS JetStream: each test gets its own stream prefix, registers
//! instances and beats the way registry-api does (events and heartbeat batches on the streams),
//! and watches the events stream as a downstream consumer would. Waiting is always for an event
//! with a timeout, never a sleep.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use event_log::event::{
    Beat, Event, EventType, HealthCheck, HeartbeatsReceived, InstanceRegistered, Location,
    now_millis,
};
use event_log::{
    Append, Envelope, EventLog, JetStreamConfig, JetStreamLog, RecordStream, StreamKind, Streams,
};
use futures::StreamExt;
use health_engine::{Config, Handle, HealthEngine, SelfPreservation};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use xtask::harness::TestEnv;

const WAIT: Duration = Duration::from_secs(15);

async fn connect() -> (TestEnv, Arc<JetStreamLog>) {
    let env = TestEnv::nats_only().await.expect("NATS for the test");
    let log = JetStreamLog::connect(
        &env.nats_url,
        Streams::new(&env.prefix),
        JetStreamConfig::default(),
    )
    .await
    .expect("connected to NATS");
    log.ensure_streams().await.expect("streams");
    (env, Arc::new(log))
}

fn config() -> Config {
    Config {
        unhealthy_ratio: 3.0,
        delete_timeout: Duration::from_millis(300),
        self_preservation: SelfPreservation {
            enabled: false,
            ..SelfPreservation::default()
        },
        snapshot_path: None,
        snapshot_interval: Duration::from_millis(200),
        retry_initial: Duration::from_millis(20),
        retry_max: Duration::from_millis(500),
        replay_idle: Duration::from_millis(500),
    }
}

struct Running {
    handle: Handle,
    shutdown: CancellationToken,
    task: JoinHandle<health_engine::Result<()>>,
}

impl Running {
    async fn stop(self) -> health_engine::Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("engine stops in time")
            .expect("engine task")
    }
}

async fn start(config: Config, log: &Arc<JetStreamLog>) -> Running {
    let log: Arc<dyn EventLog> = log.clone();
    let engine = HealthEngine::new(config, log).expect("valid config");
    let mut handle = engine.handle();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(engine.run(shutdown.clone()));
    tokio::time::timeout(WAIT, handle.wait_for(|stats| stats.recovered))
        .await
        .expect("engine recovers in time")
        .expect("engine running");
    Running {
        handle,
        shutdown,
        task,
    }
}

async fn register(log: &JetStreamLog, port: u16, ttl_ms: u64, ephemeral: bool) -> String {
    let id = event_log::instance_id("test", "echo", "10.0.0.1", port);
    let envelope = Envelope::new(
        "test",
        "echo",
        id.clone(),
        Event::InstanceRegistered(InstanceRegistered {
            host: "10.0.0.1".into(),
            port,
            protocol: "grpc".into(),
            version: String::new(),
            weight: Some(100),
            metadata: BTreeMap::new(),
            health_check: Some(HealthCheck { ttl_ms }),
            ephemeral,
            isolate: None,
            location: Location::default(),
        }),
    );
    log.append(
        StreamKind::Events,
        Append::event(log.streams(), &envelope).unwrap(),
    )
    .await
    .expect("registration appended");
    id
}

async fn beat(log: &JetStreamLog, ids: &[String]) -> i64 {
    let at_ms = now_millis();
    let envelope = Envelope::new(
        "",
        "",
        "",
        Event::HeartbeatsReceived(HeartbeatsReceived {
            beats: ids
                .iter()
                .map(|id| Beat {
                    instance_id: id.clone(),
                    at_ms,
                })
                .collect(),
        }),
    );
    let append = Append::event_on(log.streams().heartbeat_subject(0), &envelope).unwrap();
    log.append(StreamKind::Heartbeats, append)
        .await
        .expect("beat appended");
    at_ms
}

/// Beats `ids` every `every` until cancelled; returns the time of the last beat.
fn keep_beating(
    log: &Arc<JetStreamLog>,
    ids: Vec<String>,
    every: Duration,
) -> (CancellationToken, JoinHandle<i64>) {
    let stop = CancellationToken::new();
    let log = Arc::clone(log);
    let token = stop.clone();
    let task = tokio::spawn(async move {
        loop {
            let last = beat(&log, &ids).await;
            tokio::select! {
                _ = token.cancelled() => return last,
                _ = tokio::time::sleep(every) => {}
            }
        }
    });
    (stop, task)
}

/// A downstream consumer of the events stream.
struct Observer {
    records: RecordStream,
    seen: Vec<(u64, Envelope)>,
}

impl Observer {
    async fn new(log: &JetStreamLog) -> Observer {
        let filter = format!("{}.>", log.streams().prefix());
        Observer {
            records: log
                .replay(StreamKind::Events, 0, Some(&filter))
                .await
                .expect("replay"),
            seen: Vec::new(),
        }
    }

    /// Waits for the first event (seen before or arriving) matching `wanted`.
    async fn wait(&mut self, what: &str, wanted: impl Fn(&Envelope) -> bool) -> Envelope {
        if let Some((_, envelope)) = self.seen.iter().find(|(_, e)| wanted(e)) {
            return envelope.clone();
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let record = tokio::time::timeout_at(deadline, self.records.next())
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {what}; saw {:#?}", self.kinds()))
                .expect("stream continues")
                .expect("no read error");
            let envelope = record.decode().expect("decodable");
            self.seen.push((record.sequence, envelope.clone()));
            if wanted(&envelope) {
                return envelope;
            }
        }
    }

    /// Everything up to the stream's current end.
    async fn drain(&mut self, log: &JetStreamLog) {
        let last = log.last_sequence(StreamKind::Events).await.unwrap();
        while self
            .seen
            .last()
            .is_none_or(|(sequence, _)| *sequence < last)
        {
            let record = tokio::time::timeout(WAIT, self.records.next())
                .await
                .expect("drained in time")
                .unwrap()
                .unwrap();
            let envelope = record.decode().unwrap();
            self.seen.push((record.sequence, envelope));
        }
    }

    fn count(&self, event_type: EventType, instance_id: &str) -> usize {
        self.seen
            .iter()
            .filter(|(_, e)| e.event_type() == event_type && e.instance_id == instance_id)
            .count()
    }

    fn kinds(&self) -> Vec<(u64, EventType, String)> {
        self.seen
            .iter()
            .map(|(sequence, e)| {
                (
                    *sequence,
                    e.event_type(),
                    e.instance_id.chars().take(6).collect(),
                )
            })
            .collect()
    }
}

fn is(event_type: EventType, instance_id: &str) -> impl Fn(&Envelope) -> bool {
    let instance_id = instance_id.to_owned();
    move |e: &Envelope| e.event_type() == event_type && e.instance_id == instance_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_transition_appears_exactly_once() {
    let (_env, log) = connect().await;
    let engine = start(config(), &log).await;
    let mut observer = Observer::new(&log).await;
    let ephemeral = register(&log, 1, 200, true).await;
    let persistent = register(&log, 2, 200, false).await;
    let beating = register(&log, 3, 200, false).await;
    let (stop_beating, beater) =
        keep_beating(&log, vec![beating.clone()], Duration::from_millis(100));

    let unhealthy = observer
        .wait(
            "persistent unhealthy",
            is(EventType::InstanceTurnedUnhealthy, &persistent),
        )
        .await;
    let Event::InstanceTurnedUnhealthy(payload) = &unhealthy.event else {
        unreachable!()
    };
    // Decided at the deadline (600 ms after the registration), not on some coarse tick. (The
    // bound is loose on purpose: tests share the machine; precision is the benchmark's job.)
    let lateness = unhealthy.occurred_at_ms() - payload.deadline_ms;
    assert!((0..1_000).contains(&lateness), "lateness {lateness} ms");
    observer
        .wait(
            "ephemeral expired",
            is(EventType::InstanceExpired, &ephemeral),
        )
        .await;
    // The persistent instance beats again: healthy, once.
    beat(&log, std::slice::from_ref(&persistent)).await;
    observer
        .wait(
            "persistent healthy",
            is(EventType::InstanceTurnedHealthy, &persistent),
        )
        .await;
    stop_beating.cancel();
    let last_beat = beater.await.unwrap();
    let late = observer
        .wait(
            "beating one unhealthy after it stops",
            is(EventType::InstanceTurnedUnhealthy, &beating),
        )
        .await;
    let Event::InstanceTurnedUnhealthy(payload) = &late.event else {
        unreachable!()
    };
    assert_eq!(payload.last_heartbeat_ms, Some(last_beat));
    assert_eq!(payload.deadline_ms, last_beat + 600);

    let stats = engine.handle.stats();
    engine.stop().await.expect("clean stop");
    observer.drain(&log).await;
    assert_eq!(
        observer.count(EventType::InstanceTurnedUnhealthy, &ephemeral),
        1
    );
    assert_eq!(observer.count(EventType::InstanceExpired, &ephemeral), 1);
    assert_eq!(
        observer.count(EventType::InstanceTurnedUnhealthy, &persistent),
        1
    );
    assert_eq!(
        observer.count(EventType::InstanceTurnedHealthy, &persistent),
        1
    );
    assert_eq!(observer.count(EventType::InstanceExpired, &persistent), 0);
    assert_eq!(
        observer.count(EventType::InstanceTurnedUnhealthy, &beating),
        1
    );
    assert_eq!(
        stats.counts.leases, 2,
        "the expired lease is gone: {stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_mid_stream_duplicates_nothing_and_invents_nothing() {
    for with_snapshot in [false, true] {
        let (_env, log) = connect().await;
        let directory = tempfile::tempdir().unwrap();
        let mut config = config();
        if with_snapshot {
            config.snapshot_path = Some(directory.path().join("leases.snap"));
        }
        let first = start(config.clone(), &log).await;
        let mut observer = Observer::new(&log).await;
        let silent = register(&log, 1, 200, false).await;
        let alive = register(&log, 2, 200, false).await;
        let (stop_beating, beater) =
            keep_beating(&log, vec![alive.clone()], Duration::from_millis(100));
        observer
            .wait(
                "silent unhealthy",
                is(EventType::InstanceTurnedUnhealthy, &silent),
            )
            .await;
        first.stop().await.expect("clean stop");
        if with_snapshot {
            assert!(directory.path().join("leases.snap").exists());
        }
        // The engine is down for longer than a window while `alive` keeps beating.
        let down_until = now_millis() + 900;
        while now_millis() < down_until {
            beat(&log, std::slice::from_ref(&alive)).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let second = start(config.clone(), &log).await;
        // The restarted engine must not re-decide `silent`, nor find `alive` dead.
        let recovered = second.handle.stats();
        assert_eq!(recovered.counts.unhealthy, 1, "{recovered:?}");
        stop_beating.cancel();
        let last_beat = beater.await.unwrap();
        let late = observer
            .wait(
                "alive unhealthy after it stops",
                is(EventType::InstanceTurnedUnhealthy, &alive),
            )
            .await;
        let Event::InstanceTurnedUnhealthy(payload) = &late.event else {
            unreachable!()
        };
        assert_eq!(
            payload.last_heartbeat_ms,
            Some(last_beat),
            "snapshot {with_snapshot}"
        );
        second.stop().await.expect("clean stop");
        observer.drain(&log).await;
        assert_eq!(
            observer.count(EventType::InstanceTurnedUnhealthy, &silent),
            1
        );
        assert_eq!(
            observer.count(EventType::InstanceTurnedUnhealthy, &alive),
            1
        );
        assert_eq!(observer.count(EventType::InstanceTurnedHealthy, &alive), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_engines_overlapping_append_each_transition_once() {
    let (_env, log) = connect().await;
    let one = start(config(), &log).await;
    let two = start(config(), &log).await;
    let mut observer = Observer::new(&log).await;
    let mut ids = Vec::new();
    for port in 1..=5 {
        ids.push(register(&log, port, 200, true).await);
    }
    for id in &ids {
        observer
            .wait("expired", is(EventType::InstanceExpired, id))
            .await;
    }
    let (a, b) = (one.handle.clone(), two.handle.clone());
    one.stop().await.unwrap();
    two.stop().await.unwrap();
    // Stopped engines have published their final statistics.
    let (a, b) = (a.stats(), b.stats());
    observer.drain(&log).await;
    for id in &ids {
        assert_eq!(
            observer.count(EventType::InstanceTurnedUnhealthy, id),
            1,
            "{:#?}",
            observer.kinds()
        );
        assert_eq!(observer.count(EventType::InstanceExpired, id), 1);
    }
    // Each transition stored once between them; the twin's copies were deduplicated or dropped.
    assert_eq!(
        a.transitions_appended + b.transitions_appended,
        10,
        "{a:?} {b:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_preservation_enters_and_exits_on_its_own() {
    let (_env, log) = connect().await;
    let mut config = config();
    config.self_preservation = SelfPreservation {
        enabled: true,
        share: 1.0 / 3.0,
        window: Duration::from_millis(800),
        min_at_risk: 3,
    };
    let engine = start(config, &log).await;
    let mut observer = Observer::new(&log).await;
    let mut ids = Vec::new();
    for port in 1..=6 {
        ids.push(register(&log, port, 200, true).await);
    }
    // Everyone beats, then five of six fall silent at once, as in a partition.
    beat(&log, &ids).await;
    let (stop_beating, beater) =
        keep_beating(&log, vec![ids[0].clone()], Duration::from_millis(50));
    let entered = observer
        .wait("self-preservation entered", |e| {
            e.event_type() == EventType::SelfPreservationEntered
        })
        .await;
    let exited = observer
        .wait("self-preservation exited", |e| {
            e.event_type() == EventType::SelfPreservationExited
        })
        .await;
    assert!(exited.occurred_at_ms() >= entered.occurred_at_ms() + 800);
    // After the exit, the silent five get a full window, then turn unhealthy (no second episode).
    for id in &ids[1..] {
        let unhealthy = observer
            .wait(
                "silent one unhealthy",
                is(EventType::InstanceTurnedUnhealthy, id),
            )
            .await;
        assert!(unhealthy.occurred_at_ms() >= exited.occurred_at_ms() + 600);
    }
    stop_beating.cancel();
    beater.await.unwrap();
    engine.stop().await.unwrap();
    observer.drain(&log).await;
    let episodes = observer
        .seen
        .iter()
        .filter(|(_, e)| e.event_type() == EventType::SelfPreservationEntered)
        .count();
    assert_eq!(episodes, 1, "{:#?}", observer.kinds());
    // Nothing was marked unhealthy while self-preservation was active.
    let entered_at = entered.occurred_at_ms();
    let exited_at = exited.occurred_at_ms();
    assert!(observer.seen.iter().all(|(_, e)| {
        e.event_type() != EventType::InstanceTurnedUnhealthy
            || e.occurred_at_ms() < entered_at
            || e.occurred_at_ms() > exited_at
    }));
    assert_eq!(
        observer.count(EventType::InstanceTurnedUnhealthy, &ids[0]),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_event_stops_the_engine_with_an_error() {
    let (_env, log) = connect().await;
    let engine = start(config(), &log).await;
    let subject = log.streams().instance_subject("test", "echo", "abc");
    log.append(StreamKind::Events, Append::new(subject, "not an envelope"))
        .await
        .unwrap();
    let result = tokio::time::timeout(WAIT, engine.task)
        .await
        .expect("engine stops")
        .expect("engine task");
    assert!(
        matches!(
            result,
            Err(health_engine::Error::Undecodable { sequence: 1, .. })
        ),
        "{result:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_outage_across_a_deadline_delays_the_transition_but_never_drops_it() {
    let mut nats = tokio::task::spawn_blocking(xtask::harness::PrivateNats::start)
        .await
        .unwrap()
        .expect("a private nats-server");
    let log = Arc::new(
        JetStreamLog::connect(
            &nats.url(),
            Streams::new("fault"),
            JetStreamConfig::default(),
        )
        .await
        .expect("connected"),
    );
    log.ensure_streams().await.unwrap();
    let mut engine = start(config(), &log).await;
    let silent = register(&log, 1, 300, false).await;
    tokio::time::timeout(WAIT, engine.handle.wait_for(|s| s.counts.leases == 1))
        .await
        .expect("lease known")
        .unwrap();
    let registered_at = now_millis();
    nats.stop();
    // The outage spans the deadline (900 ms after the registration) by a wide margin.
    let outage_ends = registered_at + 2_000;
    while now_millis() < outage_ends {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        engine.handle.stats().counts.unhealthy,
        0,
        "nothing decided blind"
    );
    let nats = tokio::task::spawn_blocking(move || nats.resume().map(|()| nats))
        .await
        .unwrap()
        .expect("nats-server resumed");
    log.wait_connected(WAIT).await.expect("reconnected");
    let mut observer = Observer::new(&log).await;
    let unhealthy = observer
        .wait(
            "unhealthy after the outage",
            is(EventType::InstanceTurnedUnhealthy, &silent),
        )
        .await;
    let Event::InstanceTurnedUnhealthy(payload) = &unhealthy.event else {
        unreachable!()
    };
    // Decided once the engine could prove no beat had arrived (possibly while the proof was in
    // flight during the outage), stored once the log was back.
    assert!(unhealthy.occurred_at_ms() >= payload.deadline_ms);
    assert!(payload.deadline_ms < outage_ends);
    engine.stop().await.expect("clean stop");
    observer.drain(&log).await;
    assert_eq!(
        observer.count(EventType::InstanceTurnedUnhealthy, &silent),
        1
    );
    drop(nats);
}
