//! The shell around the lease core: streams in, timers, transitions out.
//!
//! # Consuming
//!
//! The engine reads both streams with ordered replays (`EventLog::replay`), not durable
//! consumers: its position lives in its snapshot together with the state it belongs to, so
//! there is nothing to acknowledge (a durable consumer acknowledged past the snapshot would skip
//! history after a crash; one acknowledged behind would stall on its ack-pending limit). It reads
//! its own transitions back like everyone else's; the core ignores what it already knows by
//! subject sequence.
//!
//! # Start-up
//!
//! 1. Load the snapshot, if configured and usable (same stream prefix, same rules, positions not
//!    beyond the streams' ends); otherwise start empty at sequence 0.
//! 2. Note the last sequences of the heartbeat stream, then of the events stream (in this order,
//!    so that every beat replayed belongs to a registration replayed).
//! 3. Replay events after the snapshot up to that sequence, then heartbeats, with the core in
//!    recovery mode (nothing published, no timer due). If the first heartbeat available is past
//!    the snapshot's position (retention discarded some), every beat since its time is known, so
//!    that time is the *horizon*; with nothing available at all the horizon is now.
//! 4. `finish_recovery(now, horizon)`: leases whose last known beat is older than the horizon get
//!    a window counted from the horizon, never a false `TurnedUnhealthy`.
//!
//! Start-up is bounded by the snapshot interval (events) and by the heartbeat stream's retention
//! (`JetStreamConfig::heartbeat_max_age`, 15 minutes by default; bytes-capped too).
//!
//! # Timers and the heartbeat watermark
//!
//! The loop sleeps until the core's next timer (`sleep_until`, re-armed on every change: no tick).
//! A deadline only fires once the engine knows it has read every heartbeat stored before it: the
//! *watermark* is the store time of the last heartbeat record read, or the time of a check that
//! found the heartbeat stream's last sequence already read. The core is advanced to
//! `min(now, watermark)`. A lagging, paused or disconnected engine therefore turns nothing
//! unhealthy that beat in time (Consul #3852's "the beat arrived, the TTL was missed anyway").
//!
//! # Appending
//!
//! Transitions are appended pipelined (`append_many`), in waves so that two transitions of one
//! subject are ordered, each with its deterministic id and the expected last subject sequence.
//! Transient failures are retried with a capped backoff for as long as the engine runs; on a
//! conflict the engine reads the events stream up to the conflicting sequence, drops the
//! transition if the instance's lease changed meanwhile (the core has applied what changed it and
//! decides again), and otherwise retries behind the unrelated event.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use event_log::event::{Event, EventType, now_millis};
use event_log::{Envelope, EventLog, Record, RecordStream, StreamKind, Streams};
use futures::{FutureExt, StreamExt};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, debug, error, info, warn};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::leases::{
    Counts, LeaseTable, SubjectKey, Transition, TransitionKind, parse_instance_id,
};

/// What the engine has done so far, for metrics and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Leases by state, self-preservation.
    pub counts: Counts,
    /// Start-up replay finished; the engine is deciding live.
    pub recovered: bool,
    /// Last events-stream sequence applied.
    pub events_sequence: u64,
    /// Last heartbeat-stream sequence applied.
    pub heartbeats_sequence: u64,
    /// Transitions stored by this engine.
    pub transitions_appended: u64,
    /// The same, by kind.
    pub transitions_by_kind: TransitionCounts,
    /// Transitions the log already had (same event id): a predecessor or a twin wrote them.
    pub transitions_deduplicated: u64,
    /// Transitions dropped because the instance changed under them (expected-sequence conflict).
    pub transitions_superseded: u64,
    /// Appends retried after a transient failure.
    pub append_retries: u64,
    /// Snapshots written.
    pub snapshots_written: u64,
}

/// Transitions stored by this engine, by kind (for metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransitionCounts {
    /// `InstanceTurnedUnhealthy`.
    pub turned_unhealthy: u64,
    /// `InstanceTurnedHealthy`.
    pub turned_healthy: u64,
    /// `InstanceExpired`.
    pub expired: u64,
    /// `SelfPreservationEntered`.
    pub self_preservation_entered: u64,
    /// `SelfPreservationExited`.
    pub self_preservation_exited: u64,
}

impl TransitionCounts {
    fn count(&mut self, kind: &TransitionKind) {
        let counter = match kind {
            TransitionKind::TurnedUnhealthy { .. } => &mut self.turned_unhealthy,
            TransitionKind::TurnedHealthy { .. } => &mut self.turned_healthy,
            TransitionKind::Expired { .. } => &mut self.expired,
            TransitionKind::SelfPreservationEntered { .. } => &mut self.self_preservation_entered,
            TransitionKind::SelfPreservationExited { .. } => &mut self.self_preservation_exited,
        };
        *counter += 1;
    }
}

/// A cheap, cloneable view of a running engine.
#[derive(Debug, Clone)]
pub struct Handle {
    stats: watch::Receiver<Stats>,
}

impl Handle {
    /// The latest statistics.
    pub fn stats(&self) -> Stats {
        self.stats.borrow().clone()
    }

    /// Waits until `condition` holds for the statistics, or the engine is gone (`None`).
    pub async fn wait_for(&mut self, condition: impl FnMut(&Stats) -> bool) -> Option<Stats> {
        self.stats.wait_for(condition).await.ok().map(|s| s.clone())
    }
}

/// The health engine: build with [`HealthEngine::new`], run with [`HealthEngine::run`].
#[derive(Debug)]
pub struct HealthEngine {
    config: Config,
    log: Arc<dyn EventLog>,
    stats: watch::Sender<Stats>,
}

impl HealthEngine {
    /// Validates `config`; nothing runs until [`HealthEngine::run`].
    pub fn new(config: Config, log: Arc<dyn EventLog>) -> Result<HealthEngine> {
        config.validate()?;
        Ok(HealthEngine {
            config,
            log,
            stats: watch::channel(Stats::default()).0,
        })
    }

    /// A handle on the engine's statistics.
    pub fn handle(&self) -> Handle {
        Handle {
            stats: self.stats.subscribe(),
        }
    }

    /// Runs until `shutdown` is cancelled (then `Ok`) or something needs a person (`Err`, see
    /// [`Error`]). Transient log failures are retried, never returned.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        let streams = self.log.streams().clone();
        let mut runner = Runner {
            table: LeaseTable::new(self.config.rules()),
            config: self.config,
            log: self.log,
            streams,
            stats: self.stats,
            tally: Stats::default(),
            shutdown,
            events: None,
            events_seq: 0,
            heartbeats: None,
            heartbeats_seq: 0,
            watermark: i64::MIN,
            interrupted: false,
        };
        let result = runner.run().await;
        if let Err(error) = &result {
            error!(%error, "health engine stopped");
        }
        result
    }
}

/// The snapshot file's header: whose streams and which positions.
fn snapshot_header(prefix: &str, events: u64, heartbeats: u64) -> Vec<u8> {
    let mut header = Vec::with_capacity(prefix.len() + 20);
    header.extend_from_slice(&(prefix.len() as u32).to_le_bytes());
    header.extend_from_slice(prefix.as_bytes());
    header.extend_from_slice(&events.to_le_bytes());
    header.extend_from_slice(&heartbeats.to_le_bytes());
    header
}

fn parse_snapshot_header(header: &[u8], prefix: &str) -> Option<(u64, u64)> {
    let length = u32::from_le_bytes(header.get(..4)?.try_into().ok()?) as usize;
    let found = header.get(4..4 + length)?;
    if found != prefix.as_bytes() {
        return None;
    }
    let rest = header.get(4 + length..)?;
    if rest.len() != 16 {
        return None;
    }
    let events = u64::from_le_bytes(rest[..8].try_into().ok()?);
    let heartbeats = u64::from_le_bytes(rest[8..].try_into().ok()?);
    Some((events, heartbeats))
}

type Check = Pin<Box<dyn Future<Output = (i64, event_log::Result<u64>)> + Send>>;

/// What woke the loop.
enum Wake {
    Shutdown,
    Event(Option<event_log::Result<Record>>),
    Heartbeat(Option<event_log::Result<Record>>),
    Checked(i64, event_log::Result<u64>),
    Timer,
    SnapshotDue,
}

async fn next_of(stream: &mut Option<RecordStream>) -> Option<event_log::Result<Record>> {
    match stream {
        Some(stream) => stream.next().await,
        None => std::future::pending().await,
    }
}

async fn maybe<F: Future + Unpin>(future: &mut Option<F>) -> F::Output {
    match future {
        Some(future) => future.await,
        None => std::future::pending().await,
    }
}

struct Runner {
    config: Config,
    log: Arc<dyn EventLog>,
    streams: Streams,
    table: LeaseTable,
    stats: watch::Sender<Stats>,
    tally: Stats,
    shutdown: CancellationToken,
    events: Option<RecordStream>,
    events_seq: u64,
    heartbeats: Option<RecordStream>,
    heartbeats_seq: u64,
    /// Every heartbeat stored before this time has been applied.
    watermark: i64,
    /// A flush was cut short by shutdown: the table holds decisions the log does not, so it must
    /// not be snapshotted.
    interrupted: bool,
}

impl Runner {
    async fn run(&mut self) -> Result<()> {
        if self
            .retry()
            .run(|log| async move { log.ensure_streams().await })
            .await?
            .is_none()
        {
            return Ok(());
        }
        if !self.recover().await? {
            return Ok(());
        }
        self.live().await?;
        if !self.interrupted
            && let Some(path) = self.config.snapshot_path.clone()
        {
            let bytes = self.encode_snapshot();
            match tokio::task::spawn_blocking(move || write_snapshot(&path, &bytes)).await {
                Ok(Ok(())) => self.tally.snapshots_written += 1,
                Ok(Err(error)) => warn!(%error, "could not write the final snapshot"),
                Err(error) => warn!(%error, "snapshot writer failed"),
            }
        }
        self.publish_stats();
        Ok(())
    }

    // ----- start-up -----------------------------------------------------------------------------

    fn load_snapshot(&mut self) -> (u64, u64) {
        let Some(path) = &self.config.snapshot_path else {
            return (0, 0);
        };
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return (0, 0),
            Err(error) => {
                warn!(%error, path = %path.display(), "snapshot unreadable, replaying the whole log");
                return (0, 0);
            }
        };
        match LeaseTable::decode_snapshot(self.config.rules(), &bytes) {
            Ok((table, header)) => match parse_snapshot_header(&header, self.streams.prefix()) {
                Some((events, heartbeats)) => {
                    info!(
                        leases = table.len(),
                        events, heartbeats, "loaded the lease snapshot"
                    );
                    self.table = table;
                    (events, heartbeats)
                }
                None => {
                    warn!("snapshot belongs to other streams, replaying the whole log");
                    (0, 0)
                }
            },
            Err(error) => {
                warn!(%error, "replaying the whole log");
                (0, 0)
            }
        }
    }

    /// Replays both streams into the core. `false` when shut down meanwhile.
    async fn recover(&mut self) -> Result<bool> {
        let started = std::time::Instant::now();
        let (mut events_from, mut heartbeats_from) = self.load_snapshot();
        let checked_at = now_millis();
        let Some(heartbeats_target) = self
            .retry()
            .run(|log| async move { log.last_sequence(StreamKind::Heartbeats).await })
            .await?
        else {
            return Ok(false);
        };
        let Some(events_target) = self
            .retry()
            .run(|log| async move { log.last_sequence(StreamKind::Events).await })
            .await?
        else {
            return Ok(false);
        };
        if events_from > events_target {
            warn!(
                events_from,
                events_target, "the events stream is shorter than the snapshot: replaying it all"
            );
            self.table = LeaseTable::new(self.config.rules());
            events_from = 0;
            heartbeats_from = 0;
        }
        if heartbeats_from > heartbeats_target {
            heartbeats_from = 0;
        }
        self.events_seq = events_from;
        self.heartbeats_seq = heartbeats_from;
        self.table.begin_recovery();

        if !self.open(StreamKind::Events).await? {
            return Ok(false);
        }
        while self.events_seq < events_target {
            let Some(record) = self.next_replayed(StreamKind::Events).await? else {
                if self.shutdown.is_cancelled() {
                    return Ok(false);
                }
                warn!(
                    at = self.events_seq,
                    target = events_target,
                    "events stream went idle before its last sequence during replay"
                );
                break;
            };
            self.apply_event(&record)?;
        }

        if !self.open(StreamKind::Heartbeats).await? {
            return Ok(false);
        }
        let mut horizon = None;
        let mut first = true;
        let mut caught_up = self.heartbeats_seq >= heartbeats_target;
        while !caught_up {
            let Some(record) = self.next_replayed(StreamKind::Heartbeats).await? else {
                if self.shutdown.is_cancelled() {
                    return Ok(false);
                }
                break;
            };
            if first && record.sequence > self.heartbeats_seq + 1 {
                // Retention discarded beats: only those stored from here on are known.
                horizon = Some(record.stored_at_ms);
            }
            first = false;
            self.apply_heartbeat(&record)?;
            caught_up = self.heartbeats_seq >= heartbeats_target;
        }
        let now = now_millis();
        if caught_up {
            self.watermark = self.watermark.max(checked_at);
        } else if first {
            // The stream had beats we cannot read any more, and nothing newer: no beat is known.
            horizon = Some(now);
            self.watermark = now;
        }
        self.table.finish_recovery(now, horizon);
        let counts = self.table.counts();
        info!(
            leases = counts.leases,
            unhealthy = counts.unhealthy,
            self_preservation = counts.self_preservation,
            events = self.events_seq,
            heartbeats = self.heartbeats_seq,
            horizon,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "health engine recovered"
        );
        self.tally.recovered = true;
        self.flush().await?;
        self.publish_stats();
        Ok(!self.shutdown.is_cancelled())
    }

    /// The next record of a replay, or `None` after `replay_idle` without one (or on shutdown).
    async fn next_replayed(&mut self, kind: StreamKind) -> Result<Option<Record>> {
        loop {
            let idle = self.config.replay_idle;
            let stream = match kind {
                StreamKind::Events => &mut self.events,
                StreamKind::Heartbeats => &mut self.heartbeats,
            };
            let item = tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(None),
                item = tokio::time::timeout(idle, next_of(stream)) => item,
            };
            match item {
                Err(_) => return Ok(None),
                Ok(Some(Ok(record))) => return Ok(Some(record)),
                Ok(other) => {
                    self.lost(kind, other);
                    if !self.open(kind).await? {
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// (Re)opens the replay of `kind` after the last applied sequence. `false` on shutdown.
    async fn open(&mut self, kind: StreamKind) -> Result<bool> {
        let from = match kind {
            StreamKind::Events => self.events_seq,
            StreamKind::Heartbeats => self.heartbeats_seq,
        } + 1;
        let opened = self
            .retry()
            .run(move |log| async move { log.replay(kind, from, None).await })
            .await?;
        let Some(stream) = opened else {
            return Ok(false);
        };
        match kind {
            StreamKind::Events => self.events = Some(stream),
            StreamKind::Heartbeats => self.heartbeats = Some(stream),
        }
        Ok(true)
    }

    fn lost(&mut self, kind: StreamKind, item: Option<event_log::Result<Record>>) {
        match item {
            Some(Err(error)) => warn!(?kind, %error, "stream read failed, reopening"),
            _ => warn!(?kind, "stream ended, reopening"),
        }
        match kind {
            StreamKind::Events => self.events = None,
            StreamKind::Heartbeats => self.heartbeats = None,
        }
    }

    // ----- applying records ---------------------------------------------------------------------

    fn apply_event(&mut self, record: &Record) -> Result<Option<Envelope>> {
        let span = tracing::info_span!(
            "health_engine.apply",
            otel.kind = "consumer",
            messaging.system = "nats",
            messaging.message.sequence = record.sequence,
            event.type = record.header(event_log::headers::EVENT_TYPE).unwrap_or(""),
        );
        event_log::trace_context::follow(&span, record);
        let _entered = span.enter();
        // Echoes of our own appends are most of what we read back while transitions fire:
        // recognise them by subject and sequence instead of decoding them.
        if let Some((_, _, instance_id)) = self.streams.parse_instance_subject(&record.subject)
            && let Some(id) = parse_instance_id(&instance_id)
            && self.table.knows(&id, record.sequence)
        {
            self.events_seq = record.sequence;
            return Ok(None);
        }
        let envelope = record.decode().map_err(|source| Error::Undecodable {
            stream: StreamKind::Events,
            sequence: record.sequence,
            source,
        })?;
        self.table.apply(record.sequence, &envelope)?;
        self.events_seq = record.sequence;
        Ok(Some(envelope))
    }

    fn apply_heartbeat(&mut self, record: &Record) -> Result<()> {
        // Batches of many callers' beats belong to no one trace; debug level keeps them out of
        // exported traces by default.
        let _entered = tracing::debug_span!(
            "health_engine.heartbeats",
            messaging.message.sequence = record.sequence
        )
        .entered();
        let envelope = record.decode().map_err(|source| Error::Undecodable {
            stream: StreamKind::Heartbeats,
            sequence: record.sequence,
            source,
        })?;
        match &envelope.event {
            Event::HeartbeatsReceived(batch) => self.table.heartbeats(batch),
            other => warn!(
                sequence = record.sequence,
                event_type = %other.event_type(),
                "ignoring a non-heartbeat event on the heartbeat stream"
            ),
        }
        self.heartbeats_seq = record.sequence;
        self.watermark = self.watermark.max(record.stored_at_ms);
        Ok(())
    }

    // ----- the live loop ------------------------------------------------------------------------

    async fn live(&mut self) -> Result<()> {
        let mut check: Option<Check> = None;
        // A check found records not yet read: once read up to `.0`, the watermark is `.1`.
        let mut pending_check: Option<(u64, i64)> = None;
        let mut check_retry_at = i64::MIN;
        let mut snapshots = tokio::time::interval_at(
            Instant::now() + self.config.snapshot_interval,
            self.config.snapshot_interval,
        );
        snapshots.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut snapshot_task: Option<tokio::task::JoinHandle<std::io::Result<()>>> = None;
        let sleep = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(sleep);

        loop {
            // Decide everything due up to what the heartbeats prove, then publish it.
            let now = now_millis();
            if let Some((needed, at)) = pending_check
                && self.heartbeats_seq >= needed
            {
                self.watermark = self.watermark.max(at);
                pending_check = None;
            }
            self.table.advance(now.min(self.watermark));
            self.flush().await?;
            if self.shutdown.is_cancelled() {
                return Ok(());
            }
            self.publish_stats();
            if snapshot_task
                .as_ref()
                .is_some_and(|task| task.is_finished())
                && let Some(task) = snapshot_task.take()
            {
                match task.await {
                    Ok(Ok(())) => self.tally.snapshots_written += 1,
                    Ok(Err(error)) => warn!(%error, "could not write the snapshot"),
                    Err(error) => warn!(%error, "snapshot writer failed"),
                }
            }

            // What to wait for next.
            let next = self.table.next_timer();
            let blocked_on_heartbeats = next.is_some_and(|at| at <= now);
            if blocked_on_heartbeats
                && check.is_none()
                && pending_check.is_none()
                && now >= check_retry_at
            {
                let log = Arc::clone(&self.log);
                check = Some(Box::pin(async move {
                    let at = now_millis();
                    let last = tokio::time::timeout(
                        Duration::from_secs(5),
                        log.last_sequence(StreamKind::Heartbeats),
                    )
                    .await
                    .unwrap_or_else(|_| {
                        Err(event_log::Error::Unavailable(
                            "heartbeat check timed out".into(),
                        ))
                    });
                    (at, last)
                }));
            }
            let mut wake_at = next.filter(|at| *at > now);
            if blocked_on_heartbeats && check.is_none() && pending_check.is_none() {
                wake_at = Some(wake_at.map_or(check_retry_at, |at| at.min(check_retry_at)));
            }
            if let Some(at) = wake_at {
                let delay = Duration::from_millis(u64::try_from(at - now).unwrap_or(0));
                sleep.as_mut().reset(Instant::now() + delay);
            }

            let wake = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => Wake::Shutdown,
                // Heartbeats first: a beat that is waiting must be seen before a deadline fires.
                item = next_of(&mut self.heartbeats) => Wake::Heartbeat(item),
                item = next_of(&mut self.events) => Wake::Event(item),
                (at, result) = maybe(&mut check) => Wake::Checked(at, result),
                _ = &mut sleep, if wake_at.is_some() => Wake::Timer,
                _ = snapshots.tick() => Wake::SnapshotDue,
            };
            match wake {
                Wake::Shutdown => return Ok(()),
                Wake::Heartbeat(Some(Ok(record))) => {
                    self.apply_heartbeat(&record)?;
                    // Take whatever else is ready before deciding anything.
                    for _ in 0..256 {
                        match self
                            .heartbeats
                            .as_mut()
                            .and_then(|s| s.next().now_or_never())
                        {
                            Some(Some(Ok(record))) => self.apply_heartbeat(&record)?,
                            Some(other) => {
                                self.lost(StreamKind::Heartbeats, other);
                                break;
                            }
                            None => break,
                        }
                    }
                }
                Wake::Event(Some(Ok(record))) => {
                    self.apply_event(&record)?;
                    for _ in 0..256 {
                        match self.events.as_mut().and_then(|s| s.next().now_or_never()) {
                            Some(Some(Ok(record))) => {
                                self.apply_event(&record)?;
                            }
                            Some(other) => {
                                self.lost(StreamKind::Events, other);
                                break;
                            }
                            None => break,
                        }
                    }
                }
                Wake::Heartbeat(other) => self.lost(StreamKind::Heartbeats, other),
                Wake::Event(other) => self.lost(StreamKind::Events, other),
                Wake::Checked(at, result) => {
                    check = None;
                    match result {
                        Ok(last) if last <= self.heartbeats_seq => {
                            self.watermark = self.watermark.max(at);
                        }
                        Ok(last) => pending_check = Some((last, at)),
                        Err(error) => {
                            debug!(%error, "heartbeat stream check failed");
                            check_retry_at =
                                now_millis() + self.config.retry_initial.as_millis() as i64;
                        }
                    }
                }
                Wake::Timer => {}
                Wake::SnapshotDue => {
                    if let Some(path) = self.config.snapshot_path.clone()
                        && snapshot_task.is_none()
                        && !self.interrupted
                    {
                        let bytes = self.encode_snapshot();
                        snapshot_task = Some(tokio::task::spawn_blocking(move || {
                            write_snapshot(&path, &bytes)
                        }));
                    }
                }
            }
            for kind in [StreamKind::Events, StreamKind::Heartbeats] {
                let missing = match kind {
                    StreamKind::Events => self.events.is_none(),
                    StreamKind::Heartbeats => self.heartbeats.is_none(),
                };
                if missing && !self.open(kind).await? {
                    return Ok(());
                }
            }
        }
    }

    // ----- appending ----------------------------------------------------------------------------

    /// Appends everything the core decided, until its outbox is empty.
    async fn flush(&mut self) -> Result<()> {
        loop {
            let decided = self.table.take_transitions();
            if decided.is_empty() {
                return Ok(());
            }
            let span = tracing::info_span!("health_engine.transitions", count = decided.len());
            if !self.append_decided(decided).instrument(span).await? {
                self.interrupted = true;
                return Ok(());
            }
        }
    }

    /// Appends one round of decisions, in waves. `false` when shut down meanwhile.
    async fn append_decided(&mut self, decided: Vec<Transition>) -> Result<bool> {
        // Wave n holds the n-th transition of each subject: a subject's second transition
        // must expect the sequence its first one got.
        let mut waves: Vec<Vec<Transition>> = Vec::new();
        let mut per_subject: HashMap<SubjectKey, usize> = HashMap::new();
        for transition in decided {
            let position = per_subject.entry(transition.subject_key()).or_insert(0);
            if waves.len() <= *position {
                waves.push(Vec::new());
            }
            waves[*position].push(transition);
            *position += 1;
        }
        let mut dropped: HashSet<SubjectKey> = HashSet::new();
        let mut stored: HashMap<SubjectKey, u64> = HashMap::new();
        for wave in waves {
            let pending = wave
                .into_iter()
                .filter(|t| !dropped.contains(&t.subject_key()))
                .map(|mut t| {
                    if let Some(sequence) = stored.get(&t.subject_key()) {
                        t.set_after_sequence(*sequence);
                    }
                    t
                })
                .collect();
            if !self.append_wave(pending, &mut dropped, &mut stored).await? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Appends one wave until every transition is stored or dropped. `false` on shutdown.
    async fn append_wave(
        &mut self,
        mut pending: Vec<Transition>,
        dropped: &mut HashSet<SubjectKey>,
        stored: &mut HashMap<SubjectKey, u64>,
    ) -> Result<bool> {
        let mut backoff = self.config.retry_initial;
        while !pending.is_empty() {
            let mut appends = Vec::with_capacity(pending.len());
            for transition in &pending {
                appends.push(transition.append(&self.streams).map_err(Error::Log)?);
            }
            let mut results = self.log.append_many(StreamKind::Events, appends).await;
            results.resize_with(pending.len(), || {
                Err(event_log::Error::Unavailable("no acknowledgement".into()))
            });
            let mut retry = Vec::new();
            let mut conflicts = Vec::new();
            for (transition, result) in pending.into_iter().zip(results) {
                match result {
                    Ok(ack) => {
                        self.table.acknowledged(&transition, ack.sequence);
                        stored.insert(transition.subject_key(), ack.sequence);
                        if ack.duplicate {
                            self.tally.transitions_deduplicated += 1;
                        } else {
                            self.tally.transitions_appended += 1;
                            self.tally.transitions_by_kind.count(&transition.kind);
                        }
                        log_transition(&transition, ack.sequence, ack.duplicate);
                    }
                    Err(event_log::Error::Conflict { .. }) => conflicts.push(transition),
                    Err(error) if error.is_transient() => {
                        debug!(%error, "append failed, retrying");
                        retry.push(transition);
                    }
                    Err(error) => return Err(Error::Log(error)),
                }
            }
            if !conflicts.is_empty() {
                let Some(resolved) = self.resolve_conflicts(conflicts).await? else {
                    return Ok(false);
                };
                for (transition, keep) in resolved {
                    if keep {
                        retry.push(transition);
                    } else {
                        self.tally.transitions_superseded += 1;
                        debug!(event_id = %transition.event_id(), "transition superseded");
                        dropped.insert(transition.subject_key());
                    }
                }
            }
            let transient = retry.len();
            pending = retry;
            if transient > 0 && !pending.is_empty() {
                self.tally.append_retries += pending.len() as u64;
                tokio::select! {
                    _ = self.shutdown.cancelled() => return Ok(false),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(self.config.retry_max);
            }
        }
        Ok(true)
    }

    /// For transitions refused because their subject moved on: reads the events stream up to
    /// the subject's last sequence and decides, per transition, whether it still stands (only
    /// unrelated events such as status changes came in between: retry behind them) or was
    /// superseded (the lease changed: the core has applied the change and decides again).
    /// `None` on shutdown.
    async fn resolve_conflicts(
        &mut self,
        conflicts: Vec<Transition>,
    ) -> Result<Option<Vec<(Transition, bool)>>> {
        let mut watched: HashMap<String, (bool, u64)> = HashMap::new();
        let mut target = 0;
        for transition in &conflicts {
            let subject = transition.subject(&self.streams);
            let lookup = subject.clone();
            let Some(last) = self
                .retry()
                .run(move |log| {
                    let subject = lookup.clone();
                    async move { log.last_for_subject(StreamKind::Events, &subject).await }
                })
                .await?
            else {
                return Ok(None);
            };
            let last = last.map_or(0, |record| record.sequence);
            target = target.max(last);
            let entry = watched.entry(subject).or_insert((false, 0));
            entry.1 = entry.1.max(last);
        }
        while self.events_seq < target {
            let item = tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(None),
                item = next_of(&mut self.events) => item,
            };
            let record = match item {
                Some(Ok(record)) => record,
                other => {
                    self.lost(StreamKind::Events, other);
                    if !self.open(StreamKind::Events).await? {
                        return Ok(None);
                    }
                    continue;
                }
            };
            let envelope = self.apply_event(&record)?;
            if let Some((superseded, last)) = watched.get_mut(&record.subject) {
                *last = (*last).max(record.sequence);
                // A record the table already knew is one of ours: it cannot supersede.
                if envelope.is_some_and(|e| changes_lease(e.event_type())) {
                    *superseded = true;
                }
            }
        }
        Ok(Some(
            conflicts
                .into_iter()
                .map(|mut transition| {
                    let (superseded, last) = watched
                        .get(&transition.subject(&self.streams))
                        .copied()
                        .unwrap_or((true, 0));
                    transition.set_after_sequence(last);
                    (transition, !superseded)
                })
                .collect(),
        ))
    }

    // ----- helpers ------------------------------------------------------------------------------

    /// A retrier owning what it needs, so that no borrow of the runner lives across an await.
    fn retry(&self) -> Retrier {
        Retrier {
            log: Arc::clone(&self.log),
            shutdown: self.shutdown.clone(),
            initial: self.config.retry_initial,
            max: self.config.retry_max,
        }
    }

    fn encode_snapshot(&self) -> Vec<u8> {
        let header = snapshot_header(self.streams.prefix(), self.events_seq, self.heartbeats_seq);
        self.table.encode_snapshot(&header)
    }

    fn publish_stats(&mut self) {
        let mut next = self.tally.clone();
        next.counts = self.table.counts();
        next.events_sequence = self.events_seq;
        next.heartbeats_sequence = self.heartbeats_seq;
        self.stats.send_if_modified(|current| {
            if *current == next {
                false
            } else {
                *current = next;
                true
            }
        });
    }
}

/// Retries an operation on the log until it succeeds.
struct Retrier {
    log: Arc<dyn EventLog>,
    shutdown: CancellationToken,
    initial: Duration,
    max: Duration,
}

impl Retrier {
    /// Runs `operation` until it succeeds, retrying transient failures with a capped backoff.
    /// `None` on shutdown; permanent failures are returned.
    async fn run<T, F, Fut>(self, mut operation: F) -> Result<Option<T>>
    where
        F: FnMut(Arc<dyn EventLog>) -> Fut,
        Fut: Future<Output = event_log::Result<T>>,
    {
        let mut backoff = self.initial;
        loop {
            let result = tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(None),
                result = operation(Arc::clone(&self.log)) => result,
            };
            match result {
                Ok(value) => return Ok(Some(value)),
                Err(error) if error.is_transient() => {
                    debug!(%error, ?backoff, "event log unavailable, retrying");
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return Ok(None),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(self.max);
                }
                Err(error) => return Err(Error::Log(error)),
            }
        }
    }
}

/// Event types that change an instance's lease (as opposed to status changes).
fn changes_lease(event_type: EventType) -> bool {
    !matches!(
        event_type,
        EventType::InstanceStatusChanged | EventType::HeartbeatsReceived
    )
}

fn log_transition(transition: &Transition, sequence: u64, duplicate: bool) {
    let event_id = transition.event_id();
    match &transition.kind {
        TransitionKind::TurnedUnhealthy {
            instance,
            last_heartbeat_ms,
            deadline_ms,
        } => info!(
            namespace = %instance.namespace, service = %instance.service, %event_id,
            sequence, duplicate, last_heartbeat_ms, deadline_ms,
            lateness_ms = transition.at_ms - deadline_ms,
            "instance turned unhealthy"
        ),
        TransitionKind::TurnedHealthy {
            instance,
            heartbeat_ms,
        } => info!(
            namespace = %instance.namespace, service = %instance.service, %event_id,
            sequence, duplicate, heartbeat_ms, "instance turned healthy"
        ),
        TransitionKind::Expired {
            instance,
            deadline_ms,
            ..
        } => info!(
            namespace = %instance.namespace, service = %instance.service, %event_id,
            sequence, duplicate, deadline_ms, "instance expired"
        ),
        TransitionKind::SelfPreservationEntered { at_risk, total, .. } => warn!(
            %event_id, sequence, duplicate, at_risk, total,
            "self-preservation entered: too many leases at risk at once, expiry suspended"
        ),
        TransitionKind::SelfPreservationExited { total, .. } => info!(
            %event_id, sequence, duplicate, total,
            "self-preservation exited: heartbeats returned, expiry windows restarted"
        ),
    }
}

/// Writes the snapshot next to its final place, then renames it over: a crash leaves the old
/// snapshot or the new one, never half of one (and the checksum catches the rest).
fn write_snapshot(path: &PathBuf, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent)?;
    }
    let mut temporary = path.clone().into_os_string();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    let mut file = std::fs::File::create(&temporary)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&temporary, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_headers_round_trip_and_check_the_prefix() {
        let header = snapshot_header("registry", 42, 7);
        assert_eq!(parse_snapshot_header(&header, "registry"), Some((42, 7)));
        assert_eq!(parse_snapshot_header(&header, "other"), None);
        assert_eq!(parse_snapshot_header(&header[..10], "registry"), None);
        assert_eq!(parse_snapshot_header(&[], "registry"), None);
    }
}
