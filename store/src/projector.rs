//! The projector: a durable consumer of the events stream that keeps the tables equal to the fold
//! of the stream, exactly once, through crashes and outages.
//!
//! # Exactly once
//!
//! PostgreSQL, not JetStream, is the authority on progress: every batch is one transaction that
//! also moves the checkpoint row, and JetStream is acknowledged only after the commit. So:
//!
//! * a crash before the commit loses the transaction; the durable consumer delivers the batch
//!   again (it resumes after its acknowledged position) and it is applied once;
//! * a crash after the commit but before the acknowledgement redelivers events at or below the
//!   checkpoint; they are dropped before anything is written;
//! * a consumer whose acknowledged position is *ahead* of the checkpoint (the database was
//!   restored from a backup or recreated) leaves a gap, which is read back with an ordered replay
//!   from the log before going on; a gap the stream can no longer fill (purged) stops the
//!   projector with [`Error::Gap`];
//! * the checkpoint row is locked at the start of every batch and compared with what the
//!   projector believes, so that a rebuild swapping tables in, or a second writer, is noticed
//!   before anything is written ([`crate::rebuild()`]).
//!
//! Within a batch, the canonical fold ignores sequences at or below an instance's revision, so
//! applying an event twice is harmless even without the checkpoint.
//!
//! # Faults
//!
//! Transient failures (PostgreSQL or NATS down, a dropped connection) end the session; the
//! projector retries with capped exponential backoff, keeps reading the stream's last sequence
//! meanwhile so that the lag stays visible (in [`ProjectorHandle::progress`] and in warnings),
//! then catches up. An event that cannot be decoded stops it with [`Error::Undecodable`] naming
//! the sequence, after committing everything before it: skipping it would silently corrupt every
//! later state of that instance, and parking it in a dead-letter table would do the same.
//!
//! # Heartbeats
//!
//! The projector does not read the heartbeat stream at all. `health_check.last_heartbeat_at` is
//! the heartbeat reported by the health engine's transition events (`InstanceTurnedHealthy`,
//! `InstanceTurnedUnhealthy`, `InstanceExpired`), exactly as the canonical fold defines it. Beats
//! are the bulk of the traffic and change no state that operators query; writing each one (or
//! even a coalesced last beat per instance) would cost a database write per instance per TTL for
//! a value the health engine already holds, while every state change still lands as an event.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use event_log::{DurableConsumer, EventLog, Record, StreamKind};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::replay;
use crate::schema::SCHEMA;
use crate::writer::{self, Decoded, Outcome, Writer};

/// What the projector is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Status {
    /// Created, `run` not started or not connected yet.
    #[default]
    Starting,
    /// Another projector holds the database's projector lock; this one waits to take over.
    Standby,
    /// Consuming and applying events.
    Running,
    /// A transient failure interrupted it; it retries after a backoff.
    Retrying {
        /// Consecutive failed attempts.
        attempt: u32,
    },
    /// `run` returned after the shutdown token was cancelled.
    Stopped,
    /// `run` returned an error (see [`Progress::last_error`]).
    Failed,
}

impl Status {
    /// True once `run` has returned.
    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Stopped | Status::Failed)
    }
}

/// A snapshot of the projector's progress, for metrics, logs and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// What it is doing.
    pub status: Status,
    /// Stream sequence of the last event applied (the tables' checkpoint).
    pub applied_sequence: u64,
    /// Last sequence of the events stream, as last read (at most `progress_interval` old).
    pub stream_sequence: u64,
    /// Events stored in the stream and not yet applied.
    pub lag_events: u64,
    /// Age of the oldest event not yet applied (zero when caught up).
    pub lag: Duration,
    /// Events applied since `run` started.
    pub events_applied: u64,
    /// Transactions committed since `run` started.
    pub batches_applied: u64,
    /// The last failure: what interrupted the projector (while retrying), or, while running, an
    /// event log it cannot currently reach. Cleared when that is over.
    pub last_error: Option<String>,
}

/// What the run loop publishes; [`ProjectorHandle::progress`] derives the lag from it at the time
/// of asking, so that a stuck projector's lag keeps growing.
#[derive(Debug, Clone, Default)]
struct Snapshot {
    status: Status,
    applied: u64,
    applied_stored_at_ms: Option<i64>,
    stream_last: u64,
    /// When the log stored the oldest event delivered but not yet applied.
    oldest_pending_stored_at_ms: Option<i64>,
    /// When the projector first saw the stream ahead of the tables, for the lag when no stored
    /// time is known yet.
    behind_since: Option<Instant>,
    events_applied: u64,
    batches_applied: u64,
    last_error: Option<String>,
}

impl Snapshot {
    fn progress(&self) -> Progress {
        let lag_events = self.stream_last.saturating_sub(self.applied);
        let lag = if lag_events == 0 {
            Duration::ZERO
        } else if let Some(stored_at) = self
            .oldest_pending_stored_at_ms
            // The next event was stored after the last applied one: an upper bound.
            .or(self.applied_stored_at_ms)
        {
            let age = event_log::event::now_millis().saturating_sub(stored_at);
            Duration::from_millis(u64::try_from(age).unwrap_or(0))
        } else {
            self.behind_since
                .map_or(Duration::ZERO, |since| since.elapsed())
        };
        Progress {
            status: self.status,
            applied_sequence: self.applied,
            stream_sequence: self.stream_last.max(self.applied),
            lag_events,
            lag,
            events_applied: self.events_applied,
            batches_applied: self.batches_applied,
            last_error: self.last_error.clone(),
        }
    }

    fn set_stream_last(&mut self, stream_last: u64) {
        self.stream_last = self.stream_last.max(stream_last);
        if self.stream_last > self.applied {
            self.behind_since.get_or_insert_with(Instant::now);
        } else {
            self.behind_since = None;
        }
    }
}

/// A cheap, cloneable view of a projector's progress.
#[derive(Debug, Clone)]
pub struct ProjectorHandle {
    snapshot: watch::Receiver<Snapshot>,
}

impl ProjectorHandle {
    /// The progress now.
    pub fn progress(&self) -> Progress {
        self.snapshot.borrow().progress()
    }

    /// Waits until the tables include the event at `sequence`. `None` when the projector stopped
    /// first. Wrap it in a timeout.
    pub async fn wait_for_sequence(&self, sequence: u64) -> Option<Progress> {
        self.wait_for(|progress| progress.applied_sequence >= sequence)
            .await
    }

    /// Waits until `condition` holds for the progress. `None` when the projector stopped
    /// first. The condition is evaluated whenever the projector publishes progress (each batch,
    /// each status change, each lag refresh).
    pub async fn wait_for(&self, mut condition: impl FnMut(&Progress) -> bool) -> Option<Progress> {
        let mut receiver = self.snapshot.clone();
        let mut result = None;
        let _ = receiver
            .wait_for(|snapshot| {
                let progress = snapshot.progress();
                if condition(&progress) {
                    result = Some(progress);
                    true
                } else {
                    snapshot.status.is_terminal()
                }
            })
            .await;
        result
    }
}

/// The projector. Build it with [`Projector::new`], take a [`ProjectorHandle`], then
/// [`run`](Projector::run) it until shutdown.
#[derive(Debug)]
pub struct Projector {
    config: Config,
    log: Arc<dyn EventLog>,
    snapshot: watch::Sender<Snapshot>,
}

const APPLICATION_NAME: &str = "registry-store-projector";

impl Projector {
    /// A projector of `log`'s events stream into the database of `config`. Nothing connects
    /// until [`run`](Projector::run).
    pub fn new(config: Config, log: Arc<dyn EventLog>) -> Projector {
        Projector {
            config,
            log,
            snapshot: watch::Sender::new(Snapshot::default()),
        }
    }

    /// A handle on this projector's progress; it stays valid after `run` returns.
    pub fn handle(&self) -> ProjectorHandle {
        ProjectorHandle {
            snapshot: self.snapshot.subscribe(),
        }
    }

    /// Projects until `shutdown` is cancelled (then returns `Ok` after finishing the batch in
    /// hand) or a failure that retrying cannot fix ([`Error::is_retryable`] false), which it
    /// returns. Transient failures are retried with capped exponential backoff.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        let result = match self.config.validate() {
            Ok(()) => {
                let mut run = Run::new(&self, &shutdown);
                run.supervise().await
            }
            Err(error) => Err(error),
        };
        self.snapshot.send_modify(|snapshot| match &result {
            Ok(()) => snapshot.status = Status::Stopped,
            Err(error) => {
                snapshot.status = Status::Failed;
                snapshot.last_error = Some(error.to_string());
            }
        });
        match &result {
            Ok(()) => tracing::info!("projector stopped"),
            Err(error) => tracing::error!(%error, "projector stopped on an error"),
        }
        result
    }
}

/// Longest wait for the stream's last sequence when refreshing the lag.
const REFRESH_TIMEOUT: Duration = Duration::from_secs(1);

/// How long each fetch waits while a batch is being written: short, because the collection ends
/// as soon as the write does and the wait adds to the next batch's start.
const COLLECT_WAIT: Duration = Duration::from_millis(2);

/// Fetches records until `done` is set or `max` are in hand. Each fetch is left to finish rather
/// than cancelled, so nothing depends on whether a consumer's fetch is cancel-safe.
async fn collect(
    consumer: &mut dyn DurableConsumer,
    max: usize,
    done: &AtomicBool,
) -> Result<Vec<Record>> {
    let mut records = Vec::new();
    while !done.load(Ordering::Acquire) && records.len() < max {
        records.extend(consumer.fetch(max - records.len(), COLLECT_WAIT).await?);
    }
    Ok(records)
}

/// Capped exponential backoff: `initial`, doubling, at most `max`.
#[derive(Debug)]
struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
    attempt: u32,
}

impl Backoff {
    fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max,
            next: initial,
            attempt: 0,
        }
    }

    fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        self.attempt += 1;
        delay
    }

    fn reset(&mut self) {
        self.next = self.initial;
        self.attempt = 0;
    }
}

/// The state of one `run`: pacing of progress refreshes and lag logs.
struct Run<'a> {
    projector: &'a Projector,
    config: &'a Config,
    log: &'a dyn EventLog,
    shutdown: &'a CancellationToken,
    backoff: Backoff,
    last_refresh: Option<Instant>,
    last_lag_warning: Option<Instant>,
    last_refresh_warning: Option<Instant>,
    warned_behind: bool,
}

impl<'a> Run<'a> {
    fn new(projector: &'a Projector, shutdown: &'a CancellationToken) -> Run<'a> {
        let config = &projector.config;
        Run {
            projector,
            config,
            log: projector.log.as_ref(),
            shutdown,
            backoff: Backoff::new(config.retry_initial, config.retry_max),
            last_refresh: None,
            last_lag_warning: None,
            last_refresh_warning: None,
            warned_behind: false,
        }
    }

    fn publish(&self, change: impl FnOnce(&mut Snapshot)) {
        self.projector.snapshot.send_modify(change);
    }

    fn progress(&self) -> Progress {
        self.projector.snapshot.borrow().progress()
    }

    /// Runs sessions until shutdown or a permanent failure, with backoff between them.
    async fn supervise(&mut self) -> Result<()> {
        loop {
            if self.shutdown.is_cancelled() {
                return Ok(());
            }
            let error = match self.session().await {
                Ok(()) => return Ok(()),
                Err(error) if error.is_retryable() => error,
                Err(error) => return Err(error),
            };
            let delay = self.backoff.next_delay();
            let attempt = self.backoff.attempt;
            self.publish(|snapshot| {
                snapshot.status = Status::Retrying { attempt };
                snapshot.last_error = Some(error.to_string());
            });
            let progress = self.progress();
            tracing::warn!(
                %error,
                attempt,
                retry_in_ms = delay.as_millis() as u64,
                applied_sequence = progress.applied_sequence,
                lag_events = progress.lag_events,
                lag_ms = progress.lag.as_millis() as u64,
                "projector interrupted; retrying"
            );
            if !self.pause(delay).await {
                return Ok(());
            }
        }
    }

    /// Sleeps `delay` while keeping the lag fresh; false when shut down meanwhile.
    async fn pause(&mut self, delay: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + delay;
        loop {
            let step = deadline
                .saturating_duration_since(tokio::time::Instant::now())
                .min(self.config.progress_interval);
            if step.is_zero() {
                return true;
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return false,
                _ = tokio::time::sleep(step) => {}
            }
            self.refresh().await;
        }
    }

    /// Reads the stream's last sequence (at most once per `progress_interval`) and logs the lag
    /// when it is large, or when it is gone after being large.
    async fn refresh(&mut self) {
        let due = self
            .last_refresh
            .is_none_or(|at| at.elapsed() >= self.config.progress_interval);
        if !due {
            return;
        }
        self.last_refresh = Some(Instant::now());
        // Bounded: with NATS down the request would wait out the client's own timeout, holding
        // up the retry loop and shutdown.
        let last_sequence = self.log.last_sequence(StreamKind::Events);
        let failure = match tokio::time::timeout(REFRESH_TIMEOUT, last_sequence).await {
            Ok(Ok(last)) => {
                self.publish(|snapshot| {
                    snapshot.set_stream_last(last);
                    if snapshot.status == Status::Running {
                        snapshot.last_error = None;
                    }
                });
                None
            }
            Ok(Err(error)) => Some(format!(
                "cannot read the event stream's last sequence: {error}"
            )),
            Err(_) => Some("reading the event stream's last sequence timed out".to_owned()),
        };
        if let Some(failure) = failure {
            // An idle consumer does not notice that NATS is gone (nothing to fetch is not an
            // error), so this is where the outage becomes visible.
            let quiet = self
                .last_refresh_warning
                .is_some_and(|at| at.elapsed() < self.config.lag_log_interval);
            if !quiet {
                self.last_refresh_warning = Some(Instant::now());
                tracing::warn!(error = %failure, "projector cannot reach the event log");
            }
            self.publish(|snapshot| {
                if snapshot.status == Status::Running {
                    snapshot.last_error = Some(failure);
                }
            });
        }
        let progress = self.progress();
        if progress.lag >= self.config.lag_warn {
            let quiet = self
                .last_lag_warning
                .is_some_and(|at| at.elapsed() < self.config.lag_log_interval);
            if !quiet {
                self.last_lag_warning = Some(Instant::now());
                tracing::warn!(
                    applied_sequence = progress.applied_sequence,
                    stream_sequence = progress.stream_sequence,
                    lag_events = progress.lag_events,
                    lag_ms = progress.lag.as_millis() as u64,
                    status = ?progress.status,
                    "projector is behind the event stream"
                );
            }
            self.warned_behind = true;
        } else if self.warned_behind && progress.lag_events == 0 {
            self.warned_behind = false;
            tracing::info!(
                applied_sequence = progress.applied_sequence,
                "projector caught up"
            );
        }
    }

    /// One connection to PostgreSQL and one durable consumer, until shutdown (`Ok`) or a
    /// failure.
    async fn session(&mut self) -> Result<()> {
        let mut writer = Writer::open(
            &self.config.database_url,
            SCHEMA,
            APPLICATION_NAME,
            self.config.cache_instances,
        )
        .await?;
        if !writer.try_lock_projector().await? {
            self.publish(|snapshot| snapshot.status = Status::Standby);
            tracing::info!("another projector holds this database's projector lock; standing by");
            tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(()),
                locked = writer.lock_projector() => locked?,
            }
        }
        let checkpoint = writer.applied();
        let stream_last = self.log.last_sequence(StreamKind::Events).await?;
        if checkpoint.sequence > stream_last {
            return Err(Error::AheadOfStream {
                checkpoint: checkpoint.sequence,
                stream_last,
            });
        }
        let mut consumer = self
            .log
            .durable(
                StreamKind::Events,
                &self.config.consumer,
                None,
                checkpoint.sequence + 1,
            )
            .await?;
        self.publish(|snapshot| {
            snapshot.status = Status::Running;
            snapshot.last_error = None;
            snapshot.applied = checkpoint.sequence;
            snapshot.applied_stored_at_ms = checkpoint.stored_at_ms;
            snapshot.set_stream_last(stream_last);
        });
        tracing::info!(
            applied_sequence = checkpoint.sequence,
            stream_sequence = stream_last,
            consumer = %self.config.consumer,
            "projector running"
        );
        // Records delivered and not applied yet: collected while the previous batch was being
        // written, so that the next transaction starts at once with a full batch.
        let mut in_hand: Vec<Record> = Vec::new();
        loop {
            self.refresh().await;
            if in_hand.is_empty() {
                // Read before the fetch: events up to here were stored before it started.
                let known_last = self.projector.snapshot.borrow().stream_last;
                in_hand = tokio::select! {
                    biased;
                    _ = self.shutdown.cancelled() => return Ok(()),
                    fetched = consumer.fetch(self.config.batch_size, self.config.idle_wait) => fetched?,
                };
                if in_hand.is_empty() {
                    // Idle and healthy: whatever failed before is over.
                    self.backoff.reset();
                    if known_last > writer.applied().sequence {
                        // The stream holds events the tables lack, yet the consumer has nothing
                        // to deliver: it is positioned past them (the database was restored or
                        // recreated). Read them back from the log. Should the consumer merely
                        // have been slow, the events it delivers later are dropped as already
                        // applied.
                        self.repair_gap(&mut writer, known_last).await?;
                        consumer.ack_through(writer.applied().sequence).await?;
                    }
                    continue;
                }
            }
            let batch = std::mem::take(&mut in_hand);
            let (last_sequence, oldest_stored_at) = match (batch.last(), batch.first()) {
                (Some(last), Some(first)) => (last.sequence, first.stored_at_ms),
                _ => continue,
            };
            self.publish(|snapshot| {
                snapshot.set_stream_last(last_sequence);
                snapshot.oldest_pending_stored_at_ms = Some(oldest_stored_at);
            });
            let batch_done = AtomicBool::new(false);
            let batch_size = self.config.batch_size;
            let (projected, collected) = tokio::join!(
                async {
                    let projected = self.project(&mut writer, batch).await;
                    batch_done.store(true, Ordering::Release);
                    projected
                },
                collect(consumer.as_mut(), batch_size, &batch_done),
            );
            projected?;
            self.backoff.reset();
            in_hand = collected?;
            consumer.ack_through(writer.applied().sequence).await?;
        }
    }

    /// Applies delivered records: drops those already applied, repairs a gap before them, and
    /// stops at an undecodable one after applying everything before it.
    async fn project(&mut self, writer: &mut Writer, records: Vec<Record>) -> Result<()> {
        // One span per event, in the trace its headers carry, open until its batch is
        // committed (when nothing collects spans, none is made).
        let _spans: Vec<tracing::Span> = if tracing::span_enabled!(tracing::Level::INFO) {
            let batch = records.len();
            records
                .iter()
                .map(|record| {
                    let span = tracing::info_span!(
                        "store.project",
                        otel.kind = "consumer",
                        messaging.system = "nats",
                        messaging.message.sequence = record.sequence,
                        event.type = record.header(event_log::headers::EVENT_TYPE).unwrap_or(""),
                        batch,
                    );
                    event_log::trace_context::follow(&span, record);
                    span
                })
                .collect()
        } else {
            Vec::new()
        };
        let (mut decoded, undecodable) = writer::decode(records);
        let undecodable_at = match &undecodable {
            Some(Error::Undecodable { sequence, .. }) => Some(*sequence),
            _ => None,
        };
        let mut gap_repaired = false;
        loop {
            let applied = writer.applied().sequence;
            decoded.retain(|event| event.sequence > applied);
            let next = decoded
                .first()
                .map(|event| event.sequence)
                .or(undecodable_at.filter(|sequence| *sequence > applied));
            let Some(next) = next else {
                return Ok(());
            };
            if next > applied + 1 {
                if !gap_repaired {
                    gap_repaired = true;
                    self.repair_gap(writer, next - 1).await?;
                    continue;
                }
                // Still a gap after reading the log: only a fresh projection may start where the
                // stream starts (its beginning was purged); anything else would skip events.
                if applied > 0 {
                    return Err(Error::Gap {
                        applied,
                        found: next,
                    });
                }
            }
            if decoded.is_empty() {
                break;
            }
            if self.apply(writer, &decoded).await? {
                break;
            }
        }
        match undecodable {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    /// One transaction; true when committed, false when the checkpoint had moved (the writer
    /// then knows the new one).
    async fn apply(&mut self, writer: &mut Writer, events: &[Decoded]) -> Result<bool> {
        match writer.apply(events).await? {
            Outcome::Committed { events, instances } => {
                let checkpoint = writer.applied();
                self.publish(|snapshot| {
                    snapshot.applied = checkpoint.sequence;
                    snapshot.applied_stored_at_ms = checkpoint.stored_at_ms;
                    snapshot.oldest_pending_stored_at_ms = None;
                    snapshot.events_applied += events as u64;
                    snapshot.batches_applied += 1;
                    let stream_last = snapshot.stream_last;
                    snapshot.set_stream_last(stream_last);
                });
                tracing::debug!(
                    sequence = checkpoint.sequence,
                    events,
                    instances,
                    "batch committed"
                );
                Ok(true)
            }
            Outcome::Moved => {
                let checkpoint = writer.applied();
                self.publish(|snapshot| {
                    snapshot.applied = checkpoint.sequence;
                    snapshot.applied_stored_at_ms = checkpoint.stored_at_ms;
                });
                Ok(false)
            }
        }
    }

    /// The consumer delivered events beyond `checkpoint + 1`: read the missing ones (through
    /// `through`) back from the log with an ordered replay and apply them.
    async fn repair_gap(&mut self, writer: &mut Writer, through: u64) -> Result<()> {
        let from = writer.applied().sequence + 1;
        tracing::warn!(
            from,
            through,
            "the durable consumer resumed past the tables' checkpoint (database restored or \
             recreated?); replaying the missing events from the log"
        );
        let mut stream = self.log.replay(StreamKind::Events, from, None).await?;
        loop {
            let applied = writer.applied().sequence;
            if applied >= through {
                return Ok(());
            }
            let batch = replay::read_batch(&mut stream, self.config.batch_size, through).await?;
            let first = batch.records.first().map(|record| record.sequence);
            let first = first.unwrap_or(through + 1);
            // A fresh projection (checkpoint 0) starts wherever the stream starts; anything
            // else needs every event after its checkpoint.
            if first > applied + 1 && applied > 0 {
                return Err(Error::Gap {
                    applied,
                    found: first,
                });
            }
            let (decoded, undecodable) = writer::decode(batch.records);
            while !self.apply(writer, &decoded).await? {}
            if let Some(error) = undecodable {
                return Err(error);
            }
            if batch.done {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
        let delays: Vec<u64> = (0..5)
            .map(|_| backoff.next_delay().as_millis() as u64)
            .collect();
        assert_eq!(delays, [100, 200, 400, 500, 500]);
        assert_eq!(backoff.attempt, 5);
        backoff.reset();
        assert_eq!(backoff.next_delay(), Duration::from_millis(100));
        assert_eq!(backoff.attempt, 1);
    }

    #[test]
    fn lag_is_zero_when_caught_up_and_grows_with_pending_events() {
        let mut snapshot = Snapshot {
            applied: 10,
            applied_stored_at_ms: Some(event_log::event::now_millis() - 60_000),
            ..Snapshot::default()
        };
        snapshot.set_stream_last(10);
        assert_eq!(snapshot.progress().lag, Duration::ZERO);
        assert_eq!(snapshot.progress().lag_events, 0);
        snapshot.set_stream_last(15);
        let progress = snapshot.progress();
        assert_eq!(progress.lag_events, 5);
        assert!(progress.lag >= Duration::from_secs(59), "{progress:?}");
        snapshot.oldest_pending_stored_at_ms = Some(event_log::event::now_millis() - 2_000);
        let lag = snapshot.progress().lag;
        assert!(
            lag >= Duration::from_secs(2) && lag < Duration::from_secs(59),
            "{lag:?}"
        );
        // A stale, smaller stream sequence never hides known lag.
        snapshot.set_stream_last(3);
        assert_eq!(snapshot.progress().lag_events, 5);
    }
}
