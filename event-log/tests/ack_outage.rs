//! A durable consumer's acknowledgement across a NATS outage, on a private nats-server (the
//! test kills it, so it never touches a shared one). The client sends an acknowledgement it
//! buffered during the outage once it reconnects, so this cannot tell whether the retry or the
//! buffered one reached the server; what it pins down is that `ack_through` reports an
//! unconfirmed acknowledgement as an error and that the retry's success means confirmed.

use std::time::Duration;

use event_log::{Append, EventLog, JetStreamConfig, JetStreamLog, StreamKind, Streams};
use xtask::harness::PrivateNats;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unconfirmed_acknowledgement_is_an_error_and_the_retry_confirms_it() {
    let mut nats = tokio::task::spawn_blocking(PrivateNats::start)
        .await
        .unwrap()
        .expect("a private nats-server");
    let config = JetStreamConfig {
        ack_timeout: Duration::from_secs(1),
        ..JetStreamConfig::default()
    };
    let log = JetStreamLog::connect(&nats.url(), Streams::new("ackoutage"), config)
        .await
        .expect("connected");
    log.ensure_streams().await.expect("streams");
    let subject = log.streams().instance_subject("ns", "svc", "i");
    for n in 1..=5 {
        log.append(
            StreamKind::Events,
            Append::new(subject.clone(), format!("m{n}")),
        )
        .await
        .expect("appended");
    }
    let mut consumer = log
        .durable(StreamKind::Events, "audit", None, 0)
        .await
        .expect("durable");
    let mut delivered = Vec::new();
    while delivered.len() < 5 {
        let batch = consumer
            .fetch(5 - delivered.len(), Duration::from_secs(10))
            .await
            .expect("fetched");
        assert!(!batch.is_empty(), "the five records arrive");
        delivered.extend(batch.iter().map(|record| record.sequence));
    }
    assert_eq!(delivered, vec![1, 2, 3, 4, 5]);

    let mut nats = tokio::task::spawn_blocking(move || {
        nats.stop();
        nats
    })
    .await
    .unwrap();
    assert!(
        consumer.ack_through(3).await.is_err(),
        "an acknowledgement the server never confirmed is an error"
    );
    let nats = tokio::task::spawn_blocking(move || {
        nats.resume().expect("nats-server starts again");
        nats
    })
    .await
    .unwrap();
    log.wait_connected(Duration::from_secs(30))
        .await
        .expect("reconnected");
    consumer
        .ack_through(3)
        .await
        .expect("the retry acknowledges records 1 to 3");
    drop(consumer);

    let mut reopened = log
        .durable(StreamKind::Events, "audit", None, 0)
        .await
        .expect("reopened");
    let batch = reopened
        .fetch(5, Duration::from_secs(10))
        .await
        .expect("fetched");
    assert_eq!(
        batch.first().map(|record| record.sequence),
        Some(4),
        "the reopened consumer resumes after what the retry acknowledged"
    );
    drop(nats);
}
