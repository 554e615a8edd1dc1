//! The event-stream API against real NATS JetStream, with events written by a real
//! `registryd`.

mod support;

use std::time::Duration;

use event_log::{Append, EventLog, EventType, JetStreamConfig, JetStreamLog, StreamKind, Streams};
use futures::StreamExt;
use sdk::{Events, EventsErrorKind, InstanceSpec, Scope, StartAt};
use support::{Registryd, WAIT, client};
use xtask::harness::TestEnv;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_from_a_sequence_durable_resume_and_undecodable_events() {
    let env = TestEnv::nats_only().await.expect("NATS");
    let api = Registryd::start(&env, "api", &[]).await;
    let client = client(&[api.endpoint()]);
    let mut ids = Vec::new();
    for port in [8080, 8081, 8082] {
        let spec = InstanceSpec::new("default", "echo", "10.0.0.1", port).without_health_check();
        ids.push(client.register(&spec).await.expect("register").instance_id);
    }
    client
        .register(&InstanceSpec::new("default", "other", "10.0.0.9", 1).without_health_check())
        .await
        .expect("register other");
    let deregistered_at = client.deregister(&ids[0]).await.expect("deregister");

    let events = Events::connect(&env.nats_url, &env.prefix)
        .await
        .expect("connect");
    assert_eq!(events.last_sequence().await.expect("last"), deregistered_at);

    // Ephemeral, one service, from the start: the three registrations and the removal, in
    // order, typed.
    let mut stream = events
        .follow(Scope::service("default", "echo"), StartAt::Beginning)
        .await
        .expect("follow");
    let mut seen = Vec::new();
    for _ in 0..4 {
        let event = tokio::time::timeout(WAIT, stream.next())
            .await
            .expect("in time")
            .expect("open")
            .expect("decodes");
        assert_eq!(event.envelope.service, "echo");
        seen.push((
            event.sequence,
            event.envelope.event_type(),
            event.envelope.instance_id,
        ));
    }
    let types: Vec<EventType> = seen.iter().map(|(_, t, _)| *t).collect();
    assert_eq!(
        types,
        [
            EventType::InstanceRegistered,
            EventType::InstanceRegistered,
            EventType::InstanceRegistered,
            EventType::InstanceDeregistered
        ]
    );
    assert_eq!(
        seen[3],
        (
            deregistered_at,
            EventType::InstanceDeregistered,
            ids[0].clone()
        )
    );

    // From a sequence: starts there.
    let mut from_second = events
        .follow(Scope::All, StartAt::Sequence(seen[1].0))
        .await
        .expect("follow");
    let first = tokio::time::timeout(WAIT, from_second.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.sequence, seen[1].0);

    // Durable: read two, acknowledge them, reopen: it resumes with the third.
    let mut durable = events
        .durable(
            "audit",
            Scope::service("default", "echo"),
            StartAt::Beginning,
        )
        .await
        .expect("durable");
    let mut batch = Vec::new();
    while batch.len() < 2 {
        batch.extend(
            durable
                .next_batch(2 - batch.len(), WAIT)
                .await
                .expect("batch"),
        );
    }
    durable.ack_through(batch[1].sequence).await.expect("ack");
    drop(durable);
    let mut durable = events
        .durable(
            "audit",
            Scope::service("default", "echo"),
            StartAt::Beginning,
        )
        .await
        .expect("reopen");
    let resumed = durable.next_batch(10, WAIT).await.expect("batch");
    assert_eq!(resumed.first().map(|e| e.sequence), Some(seen[2].0));

    // Only new events; an event this build cannot read is reported with its sequence and the
    // stream goes on after it.
    let mut new_only = events
        .follow(Scope::service("default", "echo"), StartAt::New)
        .await
        .expect("follow new");
    let log = JetStreamLog::connect(
        &env.nats_url,
        Streams::new(&env.prefix),
        JetStreamConfig::default(),
    )
    .await
    .expect("NATS");
    // On a subject of the service that no instance uses (the API owns the instance subjects'
    // sequences for optimistic concurrency).
    let stranger = "f".repeat(40);
    let subject = log.streams().instance_subject("default", "echo", &stranger);
    let foreign = log
        .append(
            StreamKind::Events,
            Append::new(subject, &b"{\"not\":\"an envelope\"}"[..]),
        )
        .await
        .expect("append");
    let later = client
        .update_instance(&ids[1], sdk::InstanceUpdate::default().weight(5))
        .await
        .expect("update");
    let error = tokio::time::timeout(WAIT, new_only.next())
        .await
        .unwrap()
        .unwrap()
        .expect_err("undecodable");
    assert_eq!(error.kind(), EventsErrorKind::Decode);
    assert_eq!(error.sequence(), Some(foreign.sequence));
    let next = tokio::time::timeout(WAIT, new_only.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(next.envelope.event_type(), EventType::InstanceStatusChanged);
    assert_eq!(next.sequence, later.revision);

    // The durable consumer hands out what precedes the bad event, then the error, then the rest.
    let mut failed = None;
    let mut after = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while after.is_empty() && tokio::time::Instant::now() < deadline {
        match durable.next_batch(10, Duration::from_millis(500)).await {
            Ok(batch) => {
                if failed.is_some() {
                    after.extend(batch);
                }
            }
            Err(error) => {
                assert_eq!(error.kind(), EventsErrorKind::Decode);
                failed = error.sequence();
            }
        }
    }
    assert_eq!(failed, Some(foreign.sequence));
    assert_eq!(after.first().map(|e| e.sequence), Some(later.revision));

    let bad = events.durable("no spaces", Scope::All, StartAt::New).await;
    assert_eq!(
        bad.expect_err("invalid name").kind(),
        EventsErrorKind::InvalidArgument
    );
}

#[tokio::test]
async fn unreachable_nats_is_unavailable() {
    let port = xtask::harness::free_port().unwrap();
    let error = Events::connect(&format!("nats://127.0.0.1:{port}"), "registry")
        .await
        .expect_err("nothing listens");
    assert_eq!(error.kind(), EventsErrorKind::Unavailable);
}
