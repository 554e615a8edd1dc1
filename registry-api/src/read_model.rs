//! The API's in-memory read model: the canonical fold of the event stream, indexed by service,
//! with per-service revisions, a short history of changes for resumable watches, and a
//! broadcast channel per service for live watchers.
//!
//! It is fed only by [`follow`], which reads the events stream in order; writes wait for their
//! own sequence to be applied ([`ReadModel::wait_applied`]) before answering, which gives read
//! your writes without ever applying anything out of stream order.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use event_log::fold::{Applied, Fold, InstanceState};
use event_log::{EventLog, EventType, Record, StreamKind};
use futures::StreamExt;
use prost::bytes::Bytes;
use sdk::proto::wire;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

/// Prefix of the message ids of writes that carry a client request id.
pub const REQUEST_MSG_ID_PREFIX: &str = "req:";

/// Limits of the read model.
#[derive(Debug, Clone)]
pub struct Config {
    /// Changes kept per service for resuming watches.
    pub change_history: usize,
    /// Changes buffered per service for live watchers; a watcher further behind gets a fresh
    /// snapshot instead.
    pub watcher_buffer: usize,
    /// Recent client request ids remembered for idempotent retries.
    pub request_ids: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            change_history: 1024,
            watcher_buffer: 1024,
            request_ids: 100_000,
        }
    }
}

/// Whether a change created/updated or deleted the instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// Created or changed.
    Upserted,
    /// Deregistered or expired.
    Deleted,
}

/// One change to a service's instance set.
#[derive(Debug, Clone)]
pub struct Change {
    /// Stream sequence of the event.
    pub sequence: u64,
    /// What happened to the instance.
    pub kind: ChangeKind,
    /// The instance after the change (its last state, for deletions).
    pub instance: InstanceState,
    /// The event that caused the change.
    pub event_type: EventType,
}

/// Counts for one service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSummary {
    /// Namespace.
    pub namespace: String,
    /// Service.
    pub service: String,
    /// Live instances.
    pub total: u32,
    /// Live healthy instances.
    pub healthy: u32,
    /// Live isolated instances.
    pub isolated: u32,
    /// Service revision.
    pub revision: u64,
}

/// How a watch starts.
#[derive(Debug)]
pub enum WatchStart {
    /// The whole live instance set at `revision`.
    Snapshot {
        /// Live instances.
        instances: Vec<InstanceState>,
        /// Service revision.
        revision: u64,
    },
    /// The changes after the watcher's revision, in order.
    Resume(Vec<Arc<Change>>),
}

/// What Discover needs of a live instance without touching the fold: its filters, and its wire
/// encoding, made once per change instead of on every call.
#[derive(Debug)]
struct LiveInstance {
    healthy: bool,
    isolate: bool,
    encoded: Bytes,
}

/// Which live instances Discover wants.
#[derive(Debug, Clone, Copy)]
pub struct DiscoverFilter<'a> {
    /// Only the healthy ones.
    pub healthy_only: bool,
    /// The isolated ones too.
    pub include_isolated: bool,
    /// Only those whose metadata has all these entries.
    pub selector: &'a HashMap<String, String>,
}

impl DiscoverFilter<'_> {
    fn admits(&self, live: &LiveInstance) -> bool {
        (!self.healthy_only || live.healthy) && (self.include_isolated || !live.isolate)
    }

    /// Index of the cached answer for this filter (none with a selector).
    fn cache_slot(&self) -> Option<usize> {
        self.selector
            .is_empty()
            .then_some(usize::from(self.healthy_only) * 2 + usize::from(self.include_isolated))
    }
}

/// Whether `state`'s metadata has every entry of `selector`.
pub fn matches_selector(state: &InstanceState, selector: &HashMap<String, String>) -> bool {
    selector
        .iter()
        .all(|(key, value)| state.metadata.get(key) == Some(value))
}

#[derive(Debug)]
struct ServiceEntry {
    live: BTreeMap<String, LiveInstance>,
    /// Discover's answers without a selector, by [`DiscoverFilter::cache_slot`]: built by the
    /// first call after a change (one contiguous buffer), then copied by every call until the
    /// next change, which clears them.
    answers: [OnceLock<wire::EncodedInstances>; 4],
    revision: u64,
    history: VecDeque<Arc<Change>>,
    /// Sequence of the newest change evicted from `history` (0: none yet).
    evicted_through: u64,
    sender: broadcast::Sender<Arc<Change>>,
}

impl ServiceEntry {
    fn new(buffer: usize) -> ServiceEntry {
        ServiceEntry {
            live: BTreeMap::new(),
            answers: Default::default(),
            revision: 0,
            history: VecDeque::new(),
            evicted_through: 0,
            sender: broadcast::channel(buffer.max(1)).0,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    fold: Fold,
    services: BTreeMap<(String, String), ServiceEntry>,
    request_ids: HashMap<String, (u64, String)>,
    request_order: VecDeque<String>,
    undecodable: u64,
}

/// The read model. Shared behind an `Arc`.
#[derive(Debug)]
pub struct ReadModel {
    config: Config,
    state: RwLock<State>,
    applied: watch::Sender<u64>,
    /// Raised by a writer whose acknowledged sequence is slow to arrive: the follower then
    /// checks whether its subscription silently stalled (e.g. across a NATS restart) and
    /// resubscribes.
    stalled: tokio::sync::Notify,
}

/// How long a writer waits for its sequence before suspecting a stalled subscription.
const STALL_SUSPICION: Duration = Duration::from_millis(250);

/// How often the follower checks, unprompted, that it is not behind a log that moved on.
const STALL_CHECK_INTERVAL: Duration = Duration::from_secs(2);

impl ReadModel {
    /// An empty model.
    pub fn new(config: Config) -> ReadModel {
        ReadModel {
            config,
            state: RwLock::default(),
            applied: watch::channel(0).0,
            stalled: tokio::sync::Notify::new(),
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        // Applying an event mutates after decoding succeeded and cannot panic half-way in a way
        // that breaks invariants readers rely on, so a poisoned lock is still usable.
        self.state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sequence of the last record applied.
    pub fn applied(&self) -> u64 {
        *self.applied.borrow()
    }

    /// Waits until the record at `sequence` has been applied, at most `limit`. Returns false
    /// on timeout.
    pub async fn wait_applied(&self, sequence: u64, limit: Duration) -> bool {
        let mut applied = self.applied.subscribe();
        let wait = applied.wait_for(|applied| *applied >= sequence);
        tokio::pin!(wait);
        if let Ok(result) = tokio::time::timeout(STALL_SUSPICION.min(limit), &mut wait).await {
            return result.is_ok();
        }
        self.stalled.notify_one();
        tokio::time::timeout(limit.saturating_sub(STALL_SUSPICION), wait)
            .await
            .is_ok_and(|result| result.is_ok())
    }

    /// Applies one record of the events stream. Records must come in stream order.
    pub fn apply(&self, record: &Record) {
        let span = tracing::info_span!(
            "read_model.apply",
            otel.kind = "consumer",
            messaging.system = "nats",
            messaging.message.sequence = record.sequence,
            event.type = record.header(event_log::headers::EVENT_TYPE).unwrap_or(""),
        );
        crate::telemetry::follow(&span, record);
        let _entered = span.enter();
        let mut guard = self.write();
        let state = &mut *guard;
        match record.decode() {
            Err(error) => {
                state.undecodable += 1;
                tracing::error!(sequence = record.sequence, %error,
                    "event not understood by this server; the read model ignores it");
            }
            Ok(envelope) => {
                if let Some(msg_id) = record.header(event_log::headers::MSG_ID)
                    && msg_id.starts_with(REQUEST_MSG_ID_PREFIX)
                {
                    state.request_ids.insert(
                        msg_id.to_owned(),
                        (record.sequence, envelope.instance_id.clone()),
                    );
                    state.request_order.push_back(msg_id.to_owned());
                    while state.request_order.len() > self.config.request_ids {
                        if let Some(oldest) = state.request_order.pop_front() {
                            state.request_ids.remove(&oldest);
                        }
                    }
                }
                if state.fold.apply(record.sequence, &envelope) == Applied::Changed
                    && let Some(instance) = state.fold.get(&envelope.instance_id)
                {
                    let key = (instance.namespace.clone(), instance.service.clone());
                    let entry = state
                        .services
                        .entry(key)
                        .or_insert_with(|| ServiceEntry::new(self.config.watcher_buffer));
                    let kind = if instance.deleted {
                        entry.live.remove(&instance.id);
                        ChangeKind::Deleted
                    } else {
                        let live = LiveInstance {
                            healthy: instance.healthy,
                            isolate: instance.isolate,
                            encoded: wire::encode_instance(&crate::convert::instance(instance)),
                        };
                        entry.live.insert(instance.id.clone(), live);
                        ChangeKind::Upserted
                    };
                    entry.revision = record.sequence;
                    entry.answers = Default::default();
                    let change = Arc::new(Change {
                        sequence: record.sequence,
                        kind,
                        instance: instance.clone(),
                        event_type: envelope.event_type(),
                    });
                    entry.history.push_back(Arc::clone(&change));
                    while entry.history.len() > self.config.change_history {
                        if let Some(evicted) = entry.history.pop_front() {
                            entry.evicted_through = evicted.sequence;
                        }
                    }
                    // No receivers is fine: nobody watches this service.
                    let _ = entry.sender.send(change);
                }
            }
        }
        drop(guard);
        self.applied.send_replace(record.sequence);
    }

    /// The live instance `instance_id`, if registered.
    pub fn instance(&self, instance_id: &str) -> Option<InstanceState> {
        self.read()
            .fold
            .get(instance_id)
            .filter(|state| !state.deleted)
            .cloned()
    }

    /// Runs `f` on the live instance, if registered, without cloning it.
    pub fn with_instance<T>(
        &self,
        instance_id: &str,
        f: impl FnOnce(&InstanceState) -> T,
    ) -> Option<T> {
        self.read()
            .fold
            .get(instance_id)
            .filter(|state| !state.deleted)
            .map(f)
    }

    /// The sequence and instance of an earlier write with this message id, if remembered.
    pub fn earlier_request(&self, msg_id: &str) -> Option<(u64, String)> {
        self.read().request_ids.get(msg_id).cloned()
    }

    /// Runs `f` on the service's revision and live instances (`None` for an unknown service).
    pub fn with_service<T>(
        &self,
        namespace: &str,
        service: &str,
        f: impl FnOnce(u64, &mut dyn Iterator<Item = &InstanceState>) -> T,
    ) -> Option<T> {
        let state = self.read();
        let entry = state
            .services
            .get(&(namespace.to_owned(), service.to_owned()))?;
        let mut instances = entry.live.keys().filter_map(|id| state.fold.get(id));
        Some(f(entry.revision, &mut instances))
    }

    /// Discover: the service's revision and, unless `known_revision` is current, the live
    /// instances `filter` admits, encoded, in instance id order (`None` for an unknown
    /// service).
    pub fn discover(
        &self,
        namespace: &str,
        service: &str,
        known_revision: u64,
        filter: DiscoverFilter<'_>,
    ) -> Option<(u64, Option<wire::EncodedInstances>)> {
        let state = self.read();
        let entry = state
            .services
            .get(&(namespace.to_owned(), service.to_owned()))?;
        if known_revision != 0 && known_revision == entry.revision {
            return Some((entry.revision, None));
        }
        let build = || {
            let admitted = entry.live.iter().filter(|(id, live)| {
                filter.admits(live)
                    && (filter.selector.is_empty()
                        || state
                            .fold
                            .get(id.as_str())
                            .is_some_and(|state| matches_selector(state, filter.selector)))
            });
            let size = entry
                .live
                .values()
                .next()
                .map_or(0, |live| live.encoded.len());
            let mut builder = wire::EncodedInstances::builder(entry.live.len(), size);
            for (_, live) in admitted {
                builder.push(&live.encoded);
            }
            builder.finish()
        };
        let instances = match filter.cache_slot() {
            Some(slot) => entry.answers[slot].get_or_init(build).clone(),
            None => build(),
        };
        Some((entry.revision, Some(instances)))
    }

    /// Subscribes to a service: how to start (snapshot or resumed changes) and the live
    /// receiver, taken under one lock so that nothing falls between them.
    pub fn watch(
        &self,
        namespace: &str,
        service: &str,
        from_revision: u64,
    ) -> (WatchStart, broadcast::Receiver<Arc<Change>>) {
        let mut guard = self.write();
        let state = &mut *guard;
        let entry = state
            .services
            .entry((namespace.to_owned(), service.to_owned()))
            .or_insert_with(|| ServiceEntry::new(self.config.watcher_buffer));
        let receiver = entry.sender.subscribe();
        // Resumable when every change after the watcher's revision is still in the history.
        // A revision from the future (another server, a reset log) gets a snapshot.
        let resumable = from_revision > 0
            && from_revision >= entry.evicted_through
            && from_revision <= entry.revision;
        let start = if resumable {
            WatchStart::Resume(
                entry
                    .history
                    .iter()
                    .filter(|c| c.sequence > from_revision)
                    .cloned()
                    .collect(),
            )
        } else {
            WatchStart::Snapshot {
                instances: entry
                    .live
                    .keys()
                    .filter_map(|id| state.fold.get(id))
                    .cloned()
                    .collect(),
                revision: entry.revision,
            }
        };
        (start, receiver)
    }

    /// The live instances and revision of a service (empty for an unknown one).
    pub fn snapshot(&self, namespace: &str, service: &str) -> (Vec<InstanceState>, u64) {
        self.with_service(namespace, service, |revision, instances| {
            (instances.cloned().collect(), revision)
        })
        .unwrap_or_default()
    }

    /// Services of a namespace (all namespaces when `None`) with counts, ordered by name.
    pub fn services(&self, namespace: Option<&str>) -> Vec<ServiceSummary> {
        let state = self.read();
        state
            .services
            .iter()
            .filter(|((ns, _), entry)| {
                namespace.is_none_or(|wanted| wanted == ns) && entry.revision > 0
            })
            .map(|((ns, service), entry)| {
                let mut summary = ServiceSummary {
                    namespace: ns.clone(),
                    service: service.clone(),
                    total: 0,
                    healthy: 0,
                    isolated: 0,
                    revision: entry.revision,
                };
                for instance in entry.live.keys().filter_map(|id| state.fold.get(id)) {
                    summary.total += 1;
                    summary.healthy += u32::from(instance.healthy);
                    summary.isolated += u32::from(instance.isolate);
                }
                summary
            })
            .collect()
    }

    /// Events the model could not decode (each was logged with its sequence).
    pub fn undecodable(&self) -> u64 {
        self.read().undecodable
    }
}

/// Keeps `model` current: reads the events stream in order from where the model is, and
/// reconnects (resuming after the last applied sequence) when the stream fails. Sets `ready`
/// once the model has caught up with the stream as it was at start.
pub async fn follow(
    log: Arc<dyn EventLog>,
    model: Arc<ReadModel>,
    ready: watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(50);
    let mut target = None;
    loop {
        if target.is_none() {
            match log.last_sequence(StreamKind::Events).await {
                Ok(last) => target = Some(last),
                Err(error) => tracing::warn!(%error, "cannot read the events stream yet"),
            }
        }
        if let Some(last) = target
            && model.applied() >= last
        {
            ready.send_replace(true);
        }
        let records = match log
            .replay(StreamKind::Events, model.applied() + 1, None)
            .await
        {
            Ok(records) => {
                backoff = Duration::from_millis(50);
                Some(records)
            }
            Err(error) => {
                tracing::warn!(%error, "read model cannot follow the events stream; retrying");
                None
            }
        };
        if let Some(mut records) = records {
            // Also check now and then without a writer waiting, so that watchers get engine
            // transitions promptly after an outage too.
            let mut health_check = tokio::time::interval_at(
                tokio::time::Instant::now() + STALL_CHECK_INTERVAL,
                STALL_CHECK_INTERVAL,
            );
            health_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut applied_at_last_check = model.applied();
            loop {
                let next = tokio::select! {
                    () = shutdown.cancelled() => return,
                    next = records.next() => next,
                    _ = health_check.tick() => {
                        let applied = model.applied();
                        let progressed = applied != applied_at_last_check;
                        applied_at_last_check = applied;
                        if progressed {
                            continue;
                        }
                        match log.last_sequence(StreamKind::Events).await {
                            Ok(last) if last > applied => {
                                tracing::warn!(applied, last,
                                    "events subscription made no progress; resubscribing");
                                break;
                            }
                            _ => continue,
                        }
                    }
                    () = model.stalled.notified() => {
                        // A writer is waiting for a sequence we have not seen. If the log is
                        // ahead of us, the subscription stalled: resubscribe from where we are.
                        match log.last_sequence(StreamKind::Events).await {
                            Ok(last) if last > model.applied() => {
                                tracing::warn!(applied = model.applied(), last,
                                    "events subscription stalled; resubscribing");
                                break;
                            }
                            _ => continue,
                        }
                    }
                };
                match next {
                    Some(Ok(record)) => {
                        if record.sequence <= model.applied() {
                            continue;
                        }
                        model.apply(&record);
                        if target.is_some_and(|last| record.sequence >= last) {
                            ready.send_replace(true);
                        }
                    }
                    Some(Err(error)) => {
                        tracing::warn!(%error, applied = model.applied(),
                            "events stream interrupted; resuming");
                        break;
                    }
                    None => break,
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}
