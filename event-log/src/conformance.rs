//! The conformance suite every [`EventLog`] implementation must pass.
//!
//! Each case is a plain async function taking a log whose streams are fresh; the
//! [`conformance_suite!`](crate::conformance_suite) macro turns them into tests for one
//! implementation:
//!
//! ```ignore
//! async fn make() -> (MemoryLog, ()) { (MemoryLog::new(Streams::new("t")), ()) }
//! event_log::conformance_suite!(make);
//! ```

use std::time::Duration;

use futures::StreamExt;

use crate::error::Error;
use crate::log::{Append, EventLog, Record, RecordStream, StreamKind};

const WAIT: Duration = Duration::from_secs(10);

fn subject(log: &dyn EventLog, service: &str, instance: &str) -> String {
    log.streams()
        .instance_subject("conformance", service, instance)
}

async fn next(records: &mut RecordStream) -> Record {
    tokio::time::timeout(WAIT, records.next())
        .await
        .expect("a record within the timeout")
        .expect("the stream does not end")
        .expect("no read error")
}

async fn append(log: &dyn EventLog, append: Append) -> u64 {
    log.append(StreamKind::Events, append)
        .await
        .expect("append succeeds")
        .sequence
}

/// Appends are numbered 1, 2, 3... per stream, and `ensure_streams` is idempotent.
pub async fn appends_are_sequenced_and_acknowledged(log: &dyn EventLog) {
    log.ensure_streams()
        .await
        .expect("second ensure_streams succeeds");
    assert_eq!(log.last_sequence(StreamKind::Events).await.unwrap(), 0);
    for expected in 1..=3 {
        let ack = log
            .append(
                StreamKind::Events,
                Append::new(subject(log, "s", "i"), format!("m{expected}")),
            )
            .await
            .unwrap();
        assert_eq!(ack.sequence, expected);
        assert!(!ack.duplicate);
    }
    assert_eq!(log.last_sequence(StreamKind::Events).await.unwrap(), 3);
    let heartbeat = Append::new(log.streams().heartbeat_subject(0), "beats");
    assert_eq!(
        log.append(StreamKind::Heartbeats, heartbeat)
            .await
            .unwrap()
            .sequence,
        1
    );
    assert_eq!(log.last_sequence(StreamKind::Heartbeats).await.unwrap(), 1);
    assert_eq!(log.last_sequence(StreamKind::Events).await.unwrap(), 3);
}

/// A message id seen before is acknowledged with the first sequence and stored once.
pub async fn message_ids_deduplicate(log: &dyn EventLog) {
    let first = Append::new(subject(log, "s", "i"), "a").with_msg_id("id-1");
    let ack = log.append(StreamKind::Events, first.clone()).await.unwrap();
    assert_eq!((ack.sequence, ack.duplicate), (1, false));
    let again = log.append(StreamKind::Events, first).await.unwrap();
    assert_eq!((again.sequence, again.duplicate), (1, true));
    assert_eq!(log.last_sequence(StreamKind::Events).await.unwrap(), 1);
    let other = Append::new(subject(log, "s", "i"), "b").with_msg_id("id-2");
    assert_eq!(append(log, other).await, 2);
    let mut records = log.replay(StreamKind::Events, 1, None).await.unwrap();
    let record = next(&mut records).await;
    assert_eq!(record.header(crate::headers::MSG_ID), Some("id-1"));
    assert_eq!(&record.payload[..], b"a");
}

/// Expected-last-subject-sequence appends succeed only on the expected sequence, per subject.
pub async fn optimistic_concurrency_per_subject(log: &dyn EventLog) {
    let s1 = subject(log, "s", "one");
    let s2 = subject(log, "s", "two");
    let first = append(
        log,
        Append::new(s1.clone(), "1").expecting_last_subject_sequence(0),
    )
    .await;
    assert_eq!(first, 1);
    let conflict = log
        .append(
            StreamKind::Events,
            Append::new(s1.clone(), "x").expecting_last_subject_sequence(0),
        )
        .await;
    assert!(
        matches!(conflict, Err(Error::Conflict { expected: 0, .. })),
        "{conflict:?}"
    );
    assert_eq!(
        append(
            log,
            Append::new(s2.clone(), "2").expecting_last_subject_sequence(0)
        )
        .await,
        2
    );
    let stale = log
        .append(
            StreamKind::Events,
            Append::new(s1.clone(), "y").expecting_last_subject_sequence(2),
        )
        .await;
    assert!(
        matches!(stale, Err(Error::Conflict { expected: 2, .. })),
        "{stale:?}"
    );
    assert_eq!(
        append(
            log,
            Append::new(s1.clone(), "3").expecting_last_subject_sequence(1)
        )
        .await,
        3
    );
    assert_eq!(
        log.last_sequence(StreamKind::Events).await.unwrap(),
        3,
        "conflicts append nothing"
    );
    let last = log
        .last_for_subject(StreamKind::Events, &s1)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((last.sequence, &last.payload[..]), (3, &b"3"[..]));
    assert!(
        log.last_for_subject(StreamKind::Events, &subject(log, "s", "none"))
            .await
            .unwrap()
            .is_none()
    );
}

/// Replay starts at the requested sequence, keeps order, and follows later appends.
pub async fn replay_is_ordered_and_follows_appends(log: &dyn EventLog) {
    for n in 1..=5 {
        append(log, Append::new(subject(log, "s", "i"), format!("m{n}"))).await;
    }
    let mut records = log.replay(StreamKind::Events, 3, None).await.unwrap();
    for expected in 3..=5 {
        let record = next(&mut records).await;
        assert_eq!(record.sequence, expected);
        assert_eq!(record.payload, format!("m{expected}").as_bytes());
    }
    let later = append(log, Append::new(subject(log, "s", "i"), "m6")).await;
    assert_eq!(next(&mut records).await.sequence, later);
    let mut from_start = log.replay(StreamKind::Events, 0, None).await.unwrap();
    assert_eq!(next(&mut from_start).await.sequence, 1);
}

/// Replay with a subject filter sees only the matching subjects, in order.
pub async fn replay_filters_by_subject(log: &dyn EventLog) {
    let streams = log.streams().clone();
    append(log, Append::new(subject(log, "orders", "a"), "o1")).await;
    append(log, Append::new(subject(log, "billing", "b"), "b1")).await;
    append(log, Append::new(subject(log, "orders", "c"), "o2")).await;
    let filter = streams.service_filter("conformance", "orders");
    let mut records = log
        .replay(StreamKind::Events, 0, Some(&filter))
        .await
        .unwrap();
    assert_eq!(&next(&mut records).await.payload[..], b"o1");
    assert_eq!(&next(&mut records).await.payload[..], b"o2");
    append(log, Append::new(subject(log, "billing", "b"), "b2")).await;
    append(log, Append::new(subject(log, "orders", "a"), "o3")).await;
    let record = next(&mut records).await;
    assert_eq!((&record.payload[..], record.sequence), (&b"o3"[..], 5));
}

/// Headers set on append are read back.
pub async fn headers_round_trip(log: &dyn EventLog) {
    let with_header = Append::new(subject(log, "s", "i"), "h").with_header(
        crate::headers::TRACEPARENT,
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    );
    append(log, with_header).await;
    let mut records = log.replay(StreamKind::Events, 0, None).await.unwrap();
    let record = next(&mut records).await;
    assert_eq!(
        record.header(crate::headers::TRACEPARENT),
        Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    );
    assert!(
        record.stored_at_ms > 1_700_000_000_000,
        "stored_at_ms is a Unix time in ms"
    );
}

/// Pipelined appends are all stored, in order, with one result each.
pub async fn append_many_keeps_order(log: &dyn EventLog) {
    let appends = (0..50)
        .map(|n| Append::new(subject(log, "s", "i"), format!("m{n}")))
        .collect::<Vec<_>>();
    let results = log.append_many(StreamKind::Events, appends).await;
    let sequences = results
        .into_iter()
        .map(|r| r.unwrap().sequence)
        .collect::<Vec<_>>();
    assert_eq!(sequences, (1..=50).collect::<Vec<_>>());
    let mut records = log.replay(StreamKind::Events, 50, None).await.unwrap();
    assert_eq!(&next(&mut records).await.payload[..], b"m49");
}

/// Batches larger than the publisher's in-flight limit, several at once, all complete in order
/// (one batch of more than the client's limit of pending acknowledgements, 5,000 by default,
/// used to stall every writer forever).
pub async fn large_concurrent_batches_complete(log: &dyn EventLog) {
    let batch = |name: &str, count: usize| {
        (0..count)
            .map(|n| Append::new(subject(log, name, "i"), format!("{name}{n}")))
            .collect::<Vec<_>>()
    };
    let (large, a, b, c) = tokio::time::timeout(Duration::from_secs(60), async {
        tokio::join!(
            log.append_many(StreamKind::Events, batch("large", 12_000)),
            log.append_many(StreamKind::Events, batch("a", 3_000)),
            log.append_many(StreamKind::Events, batch("b", 3_000)),
            log.append_many(StreamKind::Events, batch("c", 3_000)),
        )
    })
    .await
    .expect("the batches complete instead of stalling");
    for (results, count) in [(large, 12_000), (a, 3_000), (b, 3_000), (c, 3_000)] {
        assert_eq!(results.len(), count);
        let sequences = results
            .into_iter()
            .map(|r| r.expect("appended").sequence)
            .collect::<Vec<_>>();
        assert!(
            sequences.windows(2).all(|pair| pair[0] < pair[1]),
            "one batch's appends are stored in its order"
        );
    }
    assert_eq!(log.last_sequence(StreamKind::Events).await.unwrap(), 21_000);
}

async fn fetch_n(consumer: &mut dyn crate::DurableConsumer, count: usize) -> Vec<u64> {
    let mut sequences = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while sequences.len() < count && tokio::time::Instant::now() < deadline {
        let batch = consumer
            .fetch(count - sequences.len(), Duration::from_millis(500))
            .await
            .unwrap();
        sequences.extend(batch.iter().map(|r| r.sequence));
    }
    sequences
}

/// A durable consumer delivers in order and, reopened, resumes right after its acknowledged
/// position, delivering again what was delivered but not acknowledged.
pub async fn durable_consumers_resume_after_ack(log: &dyn EventLog) {
    for n in 1..=5 {
        append(log, Append::new(subject(log, "s", "i"), format!("m{n}"))).await;
    }
    let mut consumer = log
        .durable(StreamKind::Events, "projector", None, 0)
        .await
        .unwrap();
    assert_eq!(fetch_n(consumer.as_mut(), 5).await, vec![1, 2, 3, 4, 5]);
    consumer.ack_through(3).await.unwrap();
    drop(consumer);
    let mut reopened = log
        .durable(StreamKind::Events, "projector", None, 0)
        .await
        .unwrap();
    assert_eq!(fetch_n(reopened.as_mut(), 2).await, vec![4, 5]);
    let empty = reopened
        .fetch(10, Duration::from_millis(200))
        .await
        .unwrap();
    assert!(empty.is_empty(), "nothing new: {empty:?}");
    append(log, Append::new(subject(log, "s", "i"), "m6")).await;
    assert_eq!(fetch_n(reopened.as_mut(), 1).await, vec![6]);
    reopened.ack_through(6).await.unwrap();
    drop(reopened);
    // A new consumer with a start sequence starts there; an existing one ignores it.
    let mut fresh = log
        .durable(StreamKind::Events, "other", None, 5)
        .await
        .unwrap();
    assert_eq!(fetch_n(fresh.as_mut(), 2).await, vec![5, 6]);
    let mut again = log
        .durable(StreamKind::Events, "projector", None, 1)
        .await
        .unwrap();
    let nothing = again.fetch(10, Duration::from_millis(200)).await.unwrap();
    assert!(nothing.is_empty(), "all acknowledged: {nothing:?}");
}

/// Appending to a subject no stream covers is refused, not silently dropped.
pub async fn foreign_subjects_are_refused(log: &dyn EventLog) {
    let result = log
        .append(StreamKind::Events, Append::new("nobody.listens.here", "x"))
        .await;
    assert!(
        matches!(result, Err(Error::StreamNotFound(_))),
        "{result:?}"
    );
}

/// Expands to one test per conformance case for the log made by `$make`, an async function
/// returning `(log, guard)`; the guard is kept alive for the test's duration.
#[macro_export]
macro_rules! conformance_suite {
    ($make:path) => {
        $crate::conformance_suite!(@cases $make,
            appends_are_sequenced_and_acknowledged,
            message_ids_deduplicate,
            optimistic_concurrency_per_subject,
            replay_is_ordered_and_follows_appends,
            replay_filters_by_subject,
            headers_round_trip,
            append_many_keeps_order,
            large_concurrent_batches_complete,
            durable_consumers_resume_after_ack,
            foreign_subjects_are_refused
        );
    };
    (@cases $make:path, $($case:ident),+) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let (log, _guard) = $make().await;
                $crate::EventLog::ensure_streams(&log).await.expect("streams created");
                $crate::conformance::$case(&log).await;
            }
        )+
    };
}
