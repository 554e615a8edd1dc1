//! The engine over the in-memory log (the embedded mode): restart recovery when heartbeat
//! retention has discarded beats, which is easiest to stage with a tiny heartbeat stream.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use event_log::event::{
    Beat, Event, EventType, HealthCheck, HeartbeatsReceived, InstanceRegistered, Location,
    millis_to_datetime, now_millis,
};
use event_log::{Append, Envelope, EventLog, MemoryConfig, MemoryLog, StreamKind, Streams};
use futures::StreamExt;
use health_engine::{Config, HealthEngine};
use tokio_util::sync::CancellationToken;

fn registration(id: &str, at_ms: i64) -> Envelope {
    let mut envelope = Envelope::new(
        "ns",
        "svc",
        id,
        Event::InstanceRegistered(InstanceRegistered {
            host: "10.0.0.1".into(),
            port: 80,
            protocol: String::new(),
            version: String::new(),
            weight: Some(100),
            metadata: BTreeMap::new(),
            health_check: Some(HealthCheck { ttl_ms: 100 }),
            ephemeral: false,
            isolate: None,
            location: Location::default(),
        }),
    );
    envelope.occurred_at = millis_to_datetime(at_ms);
    envelope
}

async fn beat(log: &MemoryLog, id: &str, at_ms: i64) {
    let envelope = Envelope::new(
        "",
        "",
        "",
        Event::HeartbeatsReceived(HeartbeatsReceived {
            beats: vec![Beat {
                instance_id: id.into(),
                at_ms,
            }],
        }),
    );
    let append = Append::event_on(log.streams().heartbeat_subject(0), &envelope).unwrap();
    log.append(StreamKind::Heartbeats, append).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beats_lost_to_retention_give_a_full_window_instead_of_a_false_unhealthy() {
    let log = MemoryLog::with_config(
        Streams::new("memory"),
        MemoryConfig {
            max_heartbeat_records: 2,
            ..MemoryConfig::default()
        },
    );
    let alive = event_log::instance_id("ns", "svc", "10.0.0.1", 1);
    let other = event_log::instance_id("ns", "svc", "10.0.0.1", 2);
    let long_ago = now_millis() - 10_000;
    for id in [&alive, &other] {
        log.append(
            StreamKind::Events,
            Append::event(log.streams(), &registration(id, long_ago)).unwrap(),
        )
        .await
        .unwrap();
    }
    // `alive` beat 50 ms ago, but its record has been pushed out of the heartbeat stream.
    beat(&log, &alive, now_millis() - 50).await;
    for _ in 0..2 {
        beat(&log, &other, now_millis()).await;
    }
    let started = now_millis();
    let engine = HealthEngine::new(Config::default(), Arc::new(log.clone())).unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(engine.run(shutdown.clone()));
    let mut events = log.replay(StreamKind::Events, 0, None).await.unwrap();
    let turned = loop {
        let record = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("a transition in time")
            .unwrap()
            .unwrap();
        let envelope = record.decode().unwrap();
        if envelope.event_type() == EventType::InstanceTurnedUnhealthy
            && envelope.instance_id == alive
        {
            break envelope;
        }
    };
    let Event::InstanceTurnedUnhealthy(payload) = &turned.event else {
        unreachable!()
    };
    // Its last known beat is the registration, 10 s old; it still got a full window (3 x 100 ms)
    // from the first heartbeat the engine could read, not an immediate false verdict.
    assert_eq!(payload.last_heartbeat_ms, Some(long_ago));
    // (Without the horizon rule the deadline would be the registration's, 10 s ago.)
    assert!(payload.deadline_ms > long_ago + 5_000, "{payload:?}");
    assert!(payload.deadline_ms >= started - 1_000 + 300, "{payload:?}");
    assert!(turned.occurred_at_ms() >= payload.deadline_ms);
    shutdown.cancel();
    task.await.unwrap().unwrap();
}
