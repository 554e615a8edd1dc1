//! In-memory event log for the embedded mode and for fast tests.
//!
//! It mirrors the JetStream semantics the registry relies on (sequences, message-id
//! deduplication inside a window, expected last subject sequence, ordered replay that follows
//! new appends, durable consumers with redelivery of unacknowledged records) and persists
//! nothing. The heartbeat stream keeps a bounded number of records, like its JetStream
//! counterpart keeps a bounded age.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::StreamExt;
use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::event::now_millis;
use crate::log::{Ack, Append, DurableConsumer, EventLog, Record, RecordStream, StreamKind};
use crate::subject::{Streams, matches_filter};

/// Limits of the in-memory log.
#[derive(Debug, Clone)]
pub struct MemoryConfig {
    /// How long message ids are remembered for deduplication.
    pub duplicate_window: Duration,
    /// Records the heartbeat stream keeps; older ones are dropped.
    pub max_heartbeat_records: usize,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            duplicate_window: Duration::from_secs(120),
            max_heartbeat_records: 10_000,
        }
    }
}

#[derive(Debug, Default)]
struct StreamState {
    /// Stored records; `records[0]` has sequence `first_sequence`.
    records: VecDeque<Record>,
    first_sequence: u64,
    last_sequence: u64,
    dedup: HashMap<String, (u64, Instant)>,
    dedup_order: VecDeque<(Instant, String)>,
    subject_last: HashMap<String, u64>,
    /// Acknowledged position of each durable consumer.
    ack_floors: HashMap<String, u64>,
}

impl StreamState {
    fn record_at(&self, sequence: u64) -> Option<&Record> {
        let offset = sequence.checked_sub(self.first_sequence)?;
        self.records.get(usize::try_from(offset).ok()?)
    }

    /// First record with sequence >= `from` matching `filter`.
    fn next_matching(&self, from: u64, filter: Option<&str>) -> Option<Record> {
        let start = from.max(self.first_sequence);
        (start..=self.last_sequence)
            .filter_map(|sequence| self.record_at(sequence))
            .find(|record| filter.is_none_or(|f| matches_filter(f, &record.subject)))
            .cloned()
    }
}

#[derive(Debug)]
struct Shared {
    streams: Streams,
    config: MemoryConfig,
    events: Mutex<StreamState>,
    heartbeats: Mutex<StreamState>,
    events_tail: watch::Sender<u64>,
    heartbeats_tail: watch::Sender<u64>,
}

impl Shared {
    fn state(&self, stream: StreamKind) -> MutexGuard<'_, StreamState> {
        let mutex = match stream {
            StreamKind::Events => &self.events,
            StreamKind::Heartbeats => &self.heartbeats,
        };
        // A panic while holding the lock cannot leave a half-applied append (appends mutate
        // after all checks), so a poisoned lock is safe to keep using.
        mutex
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn tail(&self, stream: StreamKind) -> &watch::Sender<u64> {
        match stream {
            StreamKind::Events => &self.events_tail,
            StreamKind::Heartbeats => &self.heartbeats_tail,
        }
    }

    fn check_subject(&self, stream: StreamKind, subject: &str) -> Result<()> {
        let filters = match stream {
            StreamKind::Events => self.streams.events_subjects(),
            StreamKind::Heartbeats => self.streams.heartbeats_subjects(),
        };
        if filters.iter().any(|filter| matches_filter(filter, subject)) {
            Ok(())
        } else {
            Err(Error::StreamNotFound(format!(
                "no stream for subject {subject}"
            )))
        }
    }

    fn append_one(&self, stream: StreamKind, append: Append) -> Result<Ack> {
        self.check_subject(stream, &append.subject)?;
        let now = Instant::now();
        let ack = {
            let mut state = self.state(stream);
            while let Some((at, _)) = state.dedup_order.front() {
                if now.duration_since(*at) < self.config.duplicate_window {
                    break;
                }
                if let Some((_, id)) = state.dedup_order.pop_front() {
                    state.dedup.remove(&id);
                }
            }
            if let Some((sequence, _)) = append.msg_id.as_ref().and_then(|id| state.dedup.get(id)) {
                return Ok(Ack {
                    sequence: *sequence,
                    duplicate: true,
                });
            }
            if let Some(expected) = append.expected_last_subject_sequence {
                let last = state
                    .subject_last
                    .get(&append.subject)
                    .copied()
                    .unwrap_or(0);
                if last != expected {
                    return Err(Error::Conflict {
                        subject: append.subject,
                        expected,
                    });
                }
            }
            state.last_sequence += 1;
            let sequence = state.last_sequence;
            if state.records.is_empty() {
                state.first_sequence = sequence;
            }
            let mut headers = append.headers;
            if let Some(id) = append.msg_id {
                headers.push((crate::log::headers::MSG_ID.to_owned(), id.clone()));
                state.dedup.insert(id.clone(), (sequence, now));
                state.dedup_order.push_back((now, id));
            }
            state.subject_last.insert(append.subject.clone(), sequence);
            state.records.push_back(Record {
                sequence,
                subject: append.subject,
                payload: append.payload,
                headers,
                stored_at_ms: now_millis(),
            });
            if stream == StreamKind::Heartbeats {
                while state.records.len() > self.config.max_heartbeat_records {
                    state.records.pop_front();
                    state.first_sequence += 1;
                }
            }
            Ack {
                sequence,
                duplicate: false,
            }
        };
        self.tail(stream).send_replace(ack.sequence);
        Ok(ack)
    }
}

/// The in-memory [`EventLog`]. Cheap to clone; clones share the same log.
#[derive(Debug, Clone)]
pub struct MemoryLog {
    shared: Arc<Shared>,
}

impl MemoryLog {
    /// An empty log with default limits.
    pub fn new(streams: Streams) -> MemoryLog {
        MemoryLog::with_config(streams, MemoryConfig::default())
    }

    /// An empty log with the given limits.
    pub fn with_config(streams: Streams, config: MemoryConfig) -> MemoryLog {
        MemoryLog {
            shared: Arc::new(Shared {
                streams,
                config,
                events: Mutex::default(),
                heartbeats: Mutex::default(),
                events_tail: watch::channel(0).0,
                heartbeats_tail: watch::channel(0).0,
            }),
        }
    }
}

#[async_trait]
impl EventLog for MemoryLog {
    fn streams(&self) -> &Streams {
        &self.shared.streams
    }

    async fn ensure_streams(&self) -> Result<()> {
        Ok(())
    }

    async fn append(&self, stream: StreamKind, append: Append) -> Result<Ack> {
        self.shared.append_one(stream, append)
    }

    async fn append_many(&self, stream: StreamKind, appends: Vec<Append>) -> Vec<Result<Ack>> {
        appends
            .into_iter()
            .map(|append| self.shared.append_one(stream, append))
            .collect()
    }

    async fn replay(
        &self,
        stream: StreamKind,
        from_sequence: u64,
        filter: Option<&str>,
    ) -> Result<RecordStream> {
        let shared = Arc::clone(&self.shared);
        let tail = shared.tail(stream).subscribe();
        let filter = filter.map(str::to_owned);
        let cursor = from_sequence.max(1);
        let records = futures::stream::unfold(
            (shared, tail, cursor, filter),
            move |(shared, mut tail, cursor, filter)| async move {
                loop {
                    // Mark the current tail as seen before looking, so an append racing with
                    // the look-up wakes us.
                    tail.borrow_and_update();
                    let next = shared
                        .state(stream)
                        .next_matching(cursor, filter.as_deref());
                    if let Some(record) = next {
                        let cursor = record.sequence + 1;
                        return Some((Ok(record), (shared, tail, cursor, filter)));
                    }
                    if tail.changed().await.is_err() {
                        return None;
                    }
                }
            },
        );
        Ok(records.boxed())
    }

    async fn durable(
        &self,
        stream: StreamKind,
        name: &str,
        filter: Option<&str>,
        from_sequence: u64,
    ) -> Result<Box<dyn DurableConsumer>> {
        let floor = {
            let mut state = self.shared.state(stream);
            *state
                .ack_floors
                .entry(name.to_owned())
                .or_insert_with(|| from_sequence.saturating_sub(1))
        };
        Ok(Box::new(MemoryConsumer {
            shared: Arc::clone(&self.shared),
            tail: self.shared.tail(stream).subscribe(),
            stream,
            name: name.to_owned(),
            filter: filter.map(str::to_owned),
            cursor: floor + 1,
        }))
    }

    async fn last_sequence(&self, stream: StreamKind) -> Result<u64> {
        Ok(self.shared.state(stream).last_sequence)
    }

    async fn last_for_subject(&self, stream: StreamKind, subject: &str) -> Result<Option<Record>> {
        let state = self.shared.state(stream);
        Ok(state
            .subject_last
            .get(subject)
            .and_then(|sequence| state.record_at(*sequence))
            .cloned())
    }
}

#[derive(Debug)]
struct MemoryConsumer {
    shared: Arc<Shared>,
    tail: watch::Receiver<u64>,
    stream: StreamKind,
    name: String,
    filter: Option<String>,
    /// Next sequence to deliver.
    cursor: u64,
}

#[async_trait]
impl DurableConsumer for MemoryConsumer {
    async fn fetch(&mut self, max: usize, wait: Duration) -> Result<Vec<Record>> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            self.tail.borrow_and_update();
            let mut batch = Vec::new();
            {
                let state = self.shared.state(self.stream);
                while batch.len() < max {
                    match state.next_matching(self.cursor, self.filter.as_deref()) {
                        Some(record) => {
                            self.cursor = record.sequence + 1;
                            batch.push(record);
                        }
                        None => break,
                    }
                }
            }
            if !batch.is_empty() {
                return Ok(batch);
            }
            match tokio::time::timeout_at(deadline, self.tail.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) | Err(_) => return Ok(Vec::new()),
            }
        }
    }

    async fn ack_through(&mut self, sequence: u64) -> Result<()> {
        let mut state = self.shared.state(self.stream);
        let floor = state.ack_floors.entry(self.name.clone()).or_insert(0);
        *floor = (*floor).max(sequence.min(self.cursor.saturating_sub(1)));
        Ok(())
    }
}
