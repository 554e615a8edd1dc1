//! The pure lease core: the lease table and its timers as a plain state machine.
//!
//! [`LeaseTable`] is fed with the events of the instance stream ([`LeaseTable::apply`]), with
//! heartbeats ([`LeaseTable::heartbeat`]) and with the current time ([`LeaseTable::advance`]), all
//! in Unix milliseconds. It does no IO, reads no clock and spawns nothing: the shell decides what
//! "now" is. Whatever it decides to publish lands in an outbox ([`LeaseTable::take_transitions`]).
//!
//! # Rules
//!
//! * **Window.** A lease with TTL `t` has the window `W = round(ratio x t)` (ratio 3 by default).
//!   Its *deadline* is `last beat + W`; a registration counts as a beat at its `occurred_at`, and
//!   the beat time is the one recorded in the event, never the time the engine read it.
//! * **Unhealthy.** When the deadline passes without a newer beat the lease turns unhealthy
//!   ([`TransitionKind::TurnedUnhealthy`]). The registration itself makes an instance healthy
//!   (see `event_log::fold`), so no `TurnedHealthy` follows a registration.
//! * **Healthy again.** A beat on an unhealthy lease turns it healthy only if it is newer than every
//!   beat known so far *and* still proves life, i.e. `beat + W > now`; a stale beat that arrives
//!   late changes nothing (no flapping).
//! * **Expiry.** An ephemeral lease that turned unhealthy at deadline `d` expires
//!   ([`TransitionKind::Expired`]) at `d + delete timeout`, unless a beat revives it first.
//!   Persistent leases are only ever marked unhealthy.
//! * **Deregistration / expiry** remove the lease; a **re-registration** starts a new lease
//!   generation (the stream sequence of the registration) and renews it; a registration without
//!   a health check removes the lease: such instances are never unhealthy nor expired.
//! * **Facts from the log.** Transitions read back from the stream (our own, a predecessor's, a
//!   second engine's) are applied as facts, so the table always agrees with the canonical fold.
//!   Events at or below the last sequence known for the instance's subject are ignored, which
//!   makes echoes of our own appends and redeliveries harmless.
//!
//! # Self-preservation
//!
//! A healthy lease is *overdue* once it has been silent so long that only its very next beat can
//! still save it: at `deadline - min(TTL, W - TTL)` (two TTLs of silence with the default ratio).
//! A *miss* is a lease reaching its deadline. At every [`LeaseTable::advance`] to `now`:
//!
//! * **Enter** when enabled and `at_risk > share x leases` and `at_risk >= min_at_risk`, where
//!   `at_risk` = overdue leases + misses detected in `(now - window, now]` (deadlines due right now
//!   included) and `leases` counts every lease held. Leases given a reprieve (below) and not heard
//!   from since do not count. While active, nothing turns unhealthy and nothing expires: due
//!   leases are *held*. Beats still revive unhealthy leases.
//! * **Exit** at the first advance with `now >= entered_at + window` after at least one heartbeat
//!   (or registration, which counts as one) of a known lease recorded at or after `entered_at`
//!   has arrived: the path from clients to the engine works again. On exit every
//!   healthy lease gets a deadline of at least `exit + W` and every unhealthy ephemeral lease an
//!   expiry of at least `exit + delete timeout`; leases so extended are *reprieved* and do not count
//!   towards entering again until they beat. So a dead share of the fleet is marked unhealthy one
//!   window after the exit instead of being protected forever (Eureka's failure mode), and a live
//!   one gets a full window to beat again instead of being evicted at once.
//!
//! # Exactly once
//!
//! Every transition carries the generation and the last sequence known on its subject; the shell
//! appends it with that expected last subject sequence and a deterministic message id (see
//! [`Transition::event_id`]), so a stale decision cannot land after a newer event of the instance,
//! and a repeated one is deduplicated.

mod snapshot;
#[cfg(test)]
mod tests;
mod transition;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::Arc;

use event_log::Envelope;
use event_log::event::{Event, HeartbeatsReceived, UnixMillis};
use hashbrown::HashTable;

pub use snapshot::SnapshotError;
pub use transition::{InstanceRef, SubjectKey, Transition, TransitionKind};

/// An instance id in its compact form: the 20 bytes of the SHA-1 whose hex form is the id.
pub type InstanceKey = [u8; 20];

/// Parses a 40-digit lowercase hex instance id into its compact form.
pub fn parse_instance_id(instance_id: &str) -> Option<InstanceKey> {
    if !event_log::id::is_instance_id(instance_id) {
        return None;
    }
    let mut key = [0u8; 20];
    hex::decode_to_slice(instance_id, &mut key).ok()?;
    Some(key)
}

/// The id as it appears in events and subjects.
pub fn format_instance_id(key: &InstanceKey) -> String {
    hex::encode(key)
}

/// The rules of the lease core, in milliseconds. See the module documentation.
#[derive(Debug, Clone, PartialEq)]
pub struct Rules {
    /// Unhealthy after `ratio x TTL` without a beat.
    pub unhealthy_ratio: f64,
    /// An ephemeral lease expires this long after its unhealthy deadline.
    pub delete_timeout_ms: i64,
    /// `None` switches self-preservation off.
    pub self_preservation: Option<SelfPreservationRules>,
}

/// When self-preservation starts and ends. See the module documentation.
#[derive(Debug, Clone, PartialEq)]
pub struct SelfPreservationRules {
    /// Enter when more than this share of the leases is at risk.
    pub share: f64,
    /// Look-back for misses, and the shortest time spent in self-preservation.
    pub window_ms: i64,
    /// Never enter with fewer leases at risk than this.
    pub min_at_risk: u64,
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            unhealthy_ratio: 3.0,
            delete_timeout_ms: 30_000,
            self_preservation: Some(SelfPreservationRules::default()),
        }
    }
}

impl Default for SelfPreservationRules {
    fn default() -> Self {
        SelfPreservationRules {
            share: 1.0 / 3.0,
            window_ms: 15_000,
            min_at_risk: 10,
        }
    }
}

/// An event the table cannot apply although it could affect a lease.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidEvent(pub String);

/// The state of one lease, as seen from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LeaseState {
    /// Beating in time.
    Healthy,
    /// Healthy, but only its next beat can still make the deadline.
    Overdue,
    /// Past its deadline while self-preservation holds transitions back; still published healthy.
    Held,
    /// Published unhealthy.
    Unhealthy,
    /// Expiry decided, waiting for the log to acknowledge it.
    Expiring,
}

/// A read-only view of one lease (for tests, diagnostics and benchmarks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseView {
    /// State.
    pub state: LeaseState,
    /// Lease generation: the stream sequence of the registration that started it.
    pub generation: u64,
    /// Newest beat known (the registration counts as one).
    pub last_beat_ms: UnixMillis,
    /// Unhealthy deadline while healthy, expiry deadline while unhealthy.
    pub deadline_ms: UnixMillis,
    /// TTL.
    pub ttl_ms: u32,
    /// Ephemeral lease.
    pub ephemeral: bool,
    /// Extended by a self-preservation exit and not heard from since.
    pub reprieved: bool,
}

/// Lease counts by state plus self-preservation state: the numbers a metric wants.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// All leases held.
    pub leases: u64,
    /// Healthy (overdue ones included).
    pub healthy: u64,
    /// Overdue.
    pub overdue: u64,
    /// Held by self-preservation.
    pub held: u64,
    /// Unhealthy (held ones and expiring ones included).
    pub unhealthy: u64,
    /// Self-preservation is active.
    pub self_preservation: bool,
    /// Beats for instances the table does not know (deregistered, never registered, or read
    /// before their registration).
    pub unknown_beats: u64,
}

const NOT_ARMED: i64 = i64::MAX;

const EPHEMERAL: u8 = 1;
/// Extended by a self-preservation exit, no beat since: does not count as at risk.
const REPRIEVED: u8 = 2;
/// Recovery only: a beat newer than the unhealthy transition arrived; decide at the end.
const BEAT_WHILE_UNHEALTHY: u8 = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum State {
    Vacant = 0,
    Healthy = 1,
    Overdue = 2,
    Held = 3,
    Unhealthy = 4,
    UnhealthyHeld = 5,
    Expiring = 6,
}

impl State {
    const ALL: [State; 7] = [
        State::Vacant,
        State::Healthy,
        State::Overdue,
        State::Held,
        State::Unhealthy,
        State::UnhealthyHeld,
        State::Expiring,
    ];

    fn from_u8(value: u8) -> Option<State> {
        State::ALL.get(usize::from(value)).copied()
    }

    fn is_healthy(self) -> bool {
        matches!(self, State::Healthy | State::Overdue | State::Held)
    }

    fn is_unhealthy(self) -> bool {
        matches!(
            self,
            State::Unhealthy | State::UnhealthyHeld | State::Expiring
        )
    }
}

/// One lease: 72 bytes, ids stored once (here), names interned.
#[derive(Debug, Clone, Copy)]
struct Lease {
    id: InstanceKey,
    /// Index into `LeaseTable::services`.
    service: u32,
    ttl_ms: u32,
    state: State,
    flags: u8,
    generation: u64,
    /// Last sequence known on the instance's subject: the expected last subject sequence of the
    /// next transition, and the filter for echoes.
    subject_seq: u64,
    last_beat_ms: i64,
    /// Unhealthy deadline while healthy; expiry deadline while unhealthy and ephemeral.
    deadline_ms: i64,
    /// Time of this lease's live entry in the timer heap, `NOT_ARMED` when it has none.
    armed_at: i64,
}

impl Lease {
    const VACANT: Lease = Lease {
        id: [0; 20],
        service: 0,
        ttl_ms: 0,
        state: State::Vacant,
        flags: 0,
        generation: 0,
        subject_seq: 0,
        last_beat_ms: 0,
        deadline_ms: 0,
        armed_at: NOT_ARMED,
    };

    fn ephemeral(&self) -> bool {
        self.flags & EPHEMERAL != 0
    }

    fn reprieved(&self) -> bool {
        self.flags & REPRIEVED != 0
    }

    /// Overdue and not reprieved: counts towards self-preservation.
    fn at_risk(&self) -> bool {
        self.state == State::Overdue && !self.reprieved()
    }
}

#[derive(Debug, Clone)]
struct Service {
    namespace: Arc<str>,
    service: Arc<str>,
    refs: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct SelfPreservation {
    active: bool,
    entered_at: i64,
    /// A beat recorded at or after `entered_at` arrived.
    beat_seen: bool,
    /// Last sequence known on the self-preservation subject.
    last_sequence: u64,
    /// Time of the last exit: beats before it do not lift a reprieve.
    exited_at: i64,
}

/// The lease table. See the module documentation for the rules.
#[derive(Debug)]
pub struct LeaseTable {
    rules: Rules,
    now: i64,
    recovering: bool,
    slots: Vec<Lease>,
    free: Vec<u32>,
    /// Slot numbers, hashed by the id stored in the slot.
    index: HashTable<u32>,
    seed: u64,
    /// Min-heap of (time, slot); entries whose time differs from the slot's `armed_at` are stale.
    timers: BinaryHeap<Reverse<(i64, u32)>>,
    services: Vec<Service>,
    service_index: HashMap<String, u32>,
    free_services: Vec<u32>,
    counts: [u64; 7],
    overdue_at_risk: u64,
    /// Detection times of recent misses, oldest first.
    recent_misses: VecDeque<i64>,
    sp: SelfPreservation,
    outbox: Vec<Transition>,
    unknown_beats: u64,
}

fn service_key(namespace: &str, service: &str) -> String {
    format!("{}:{namespace}{service}", namespace.len())
}

impl LeaseTable {
    /// An empty table.
    pub fn new(rules: Rules) -> LeaseTable {
        // Ids are SHA-1 digests, but of names clients choose: a keyed hash keeps a client from
        // piling ids into one bucket.
        let seed = std::collections::hash_map::RandomState::new().hash_one(0x5eed_u64);
        LeaseTable {
            rules,
            now: i64::MIN,
            recovering: false,
            slots: Vec::new(),
            free: Vec::new(),
            index: HashTable::new(),
            seed,
            timers: BinaryHeap::new(),
            services: Vec::new(),
            service_index: HashMap::new(),
            free_services: Vec::new(),
            counts: [0; 7],
            overdue_at_risk: 0,
            recent_misses: VecDeque::new(),
            sp: SelfPreservation::default(),
            outbox: Vec::new(),
            unknown_beats: 0,
        }
    }

    /// The rules in force.
    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// The table's current time (the latest `advance`), `i64::MIN` before the first.
    pub fn now(&self) -> UnixMillis {
        self.now
    }

    /// Number of leases held.
    pub fn len(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// True when no lease is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Counts by state.
    pub fn counts(&self) -> Counts {
        let by = |state: State| self.counts[state as usize];
        Counts {
            leases: self.len() as u64,
            healthy: by(State::Healthy) + by(State::Overdue) + by(State::Held),
            overdue: by(State::Overdue),
            held: by(State::Held) + by(State::UnhealthyHeld),
            unhealthy: by(State::Unhealthy) + by(State::UnhealthyHeld) + by(State::Expiring),
            self_preservation: self.sp.active,
            unknown_beats: self.unknown_beats,
        }
    }

    /// True while self-preservation is active.
    pub fn self_preservation_active(&self) -> bool {
        self.sp.active
    }

    /// The view of one lease.
    pub fn lease(&self, id: &InstanceKey) -> Option<LeaseView> {
        let lease = &self.slots[self.find(id)? as usize];
        Some(LeaseView {
            state: match lease.state {
                State::Healthy | State::Vacant => LeaseState::Healthy,
                State::Overdue => LeaseState::Overdue,
                State::Held => LeaseState::Held,
                State::Unhealthy | State::UnhealthyHeld => LeaseState::Unhealthy,
                State::Expiring => LeaseState::Expiring,
            },
            generation: lease.generation,
            last_beat_ms: lease.last_beat_ms,
            deadline_ms: lease.deadline_ms,
            ttl_ms: lease.ttl_ms,
            ephemeral: lease.ephemeral(),
            reprieved: lease.reprieved(),
        })
    }

    /// Bytes held by the table's own structures (capacities, not lengths): the slab, the index,
    /// the timer heap and the interned names. Allocator overhead is not included; the benchmark
    /// also measures resident memory.
    pub fn memory_bytes(&self) -> usize {
        let names: usize = self
            .services
            .iter()
            .map(|s| s.namespace.len() + s.service.len() + 2 * 16)
            .sum();
        self.slots.capacity() * std::mem::size_of::<Lease>()
            + self.free.capacity() * 4
            // hashbrown: one 4-byte slot number and one control byte per bucket.
            + self.index.capacity() * 5
            + self.timers.capacity() * std::mem::size_of::<Reverse<(i64, u32)>>()
            + self.services.capacity() * std::mem::size_of::<Service>()
            + self.service_index.capacity() * (std::mem::size_of::<(String, u32)>() + 1)
            + names
            + self.recent_misses.capacity() * 8
    }

    /// Switches recovery mode on: while replaying history nothing is published and no timer is
    /// due; [`LeaseTable::finish_recovery`] then decides on everything at once.
    pub fn begin_recovery(&mut self) {
        self.recovering = true;
    }

    /// True between `begin_recovery` and `finish_recovery`.
    pub fn recovering(&self) -> bool {
        self.recovering
    }

    /// Ends recovery at `now`.
    ///
    /// `horizon` is the time from which every heartbeat is known (`None`: all are known, e.g. the
    /// heartbeat stream has kept everything since the snapshot). A lease whose last known beat is
    /// older than the horizon may have beaten unseen: its deadline becomes at least
    /// `horizon + W` (and an unhealthy ephemeral lease's expiry at least `horizon + W + delete
    /// timeout`), which is never earlier than its true deadline, so no false transition follows
    /// a restart. With no heartbeat known at all the shell passes `now`: a full window.
    /// Unhealthy leases that received a newer, still live beat during the replay turn healthy.
    pub fn finish_recovery(&mut self, now: UnixMillis, horizon: Option<UnixMillis>) {
        self.recovering = false;
        self.now = self.now.max(now);
        let now = self.now;
        for slot in 0..self.slots.len() as u32 {
            let lease = self.slots[slot as usize];
            if lease.state == State::Vacant {
                continue;
            }
            let window = self.window(lease.ttl_ms);
            let delete_timeout = self.rules.delete_timeout_ms;
            let unseen = horizon.filter(|h| lease.last_beat_ms < *h);
            if lease.state.is_healthy() {
                if let Some(h) = unseen {
                    self.modify(slot, |l| {
                        l.deadline_ms = l.deadline_ms.max(h.saturating_add(window));
                    });
                }
            } else if lease.state.is_unhealthy() {
                let revived = lease.flags & BEAT_WHILE_UNHEALTHY != 0
                    && lease.last_beat_ms.saturating_add(window) > now;
                if revived {
                    self.revive(slot);
                } else if let (Some(h), true) = (unseen, lease.ephemeral()) {
                    self.modify(slot, |l| {
                        l.deadline_ms = l
                            .deadline_ms
                            .max(h.saturating_add(window).saturating_add(delete_timeout));
                    });
                }
            }
            self.modify(slot, |l| l.flags &= !BEAT_WHILE_UNHEALTHY);
        }
    }

    /// Takes the transitions decided since the last call, in decision order.
    pub fn take_transitions(&mut self) -> Vec<Transition> {
        std::mem::take(&mut self.outbox)
    }

    /// The earliest time at which [`LeaseTable::advance`] may have something to do.
    pub fn next_timer(&self) -> Option<UnixMillis> {
        let heap = self.timers.peek().map(|Reverse((at, _))| *at);
        let exit = self
            .rules
            .self_preservation
            .as_ref()
            .filter(|_| self.sp.active && self.sp.beat_seen)
            .map(|sp| self.sp.entered_at.saturating_add(sp.window_ms));
        match (heap, exit) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// True when the table already knows the record stored at `sequence` on the subject of
    /// instance `id` (our own acknowledged append, or a record applied before): the shell can
    /// skip decoding it.
    pub fn knows(&self, id: &InstanceKey, sequence: u64) -> bool {
        self.find(id)
            .is_some_and(|slot| sequence <= self.slots[slot as usize].subject_seq)
    }

    /// Applies one event of the instance stream, stored at `sequence`.
    ///
    /// Fails only for an event that should create or change a lease but cannot (a registration
    /// with a health check whose instance id is not 40 hex digits).
    pub fn apply(&mut self, sequence: u64, envelope: &Envelope) -> Result<(), InvalidEvent> {
        let at = envelope.occurred_at_ms();
        match &envelope.event {
            Event::SelfPreservationEntered(_) => {
                self.observe_self_preservation(sequence, true, at);
                return Ok(());
            }
            Event::SelfPreservationExited(_) => {
                self.observe_self_preservation(sequence, false, at);
                return Ok(());
            }
            Event::HeartbeatsReceived(batch) => {
                self.heartbeats(batch);
                return Ok(());
            }
            _ => {}
        }
        let Some(key) = parse_instance_id(&envelope.instance_id) else {
            return match &envelope.event {
                Event::InstanceRegistered(registered) if registered.health_check.is_some() => {
                    Err(InvalidEvent(format!(
                        "sequence {sequence}: registration with a health check for instance id \
                         {:?}, which is not 40 lowercase hex digits",
                        envelope.instance_id
                    )))
                }
                // No lease can have such an id: nothing to change.
                _ => Ok(()),
            };
        };
        match &envelope.event {
            Event::InstanceRegistered(registered) => self.register(
                sequence,
                key,
                &envelope.namespace,
                &envelope.service,
                at,
                registered.health_check.as_ref().map(|check| check.ttl_ms),
                registered.ephemeral,
            ),
            Event::InstanceDeregistered(_) | Event::InstanceExpired(_) => {
                self.observe_removal(sequence, key)
            }
            Event::InstanceTurnedUnhealthy(turned) => {
                self.observe_unhealthy(sequence, key, turned.last_heartbeat_ms, turned.deadline_ms)
            }
            Event::InstanceTurnedHealthy(turned) => {
                self.observe_healthy(sequence, key, turned.heartbeat_ms)
            }
            Event::InstanceStatusChanged(_)
            | Event::HeartbeatsReceived(_)
            | Event::SelfPreservationEntered(_)
            | Event::SelfPreservationExited(_) => self.observe_other(sequence, key),
        }
        Ok(())
    }

    /// Applies a batch of heartbeats. Beats for unknown instances are counted and ignored.
    pub fn heartbeats(&mut self, batch: &HeartbeatsReceived) {
        for beat in &batch.beats {
            match parse_instance_id(&beat.instance_id) {
                Some(key) => self.heartbeat(&key, beat.at_ms),
                None => self.unknown_beats += 1,
            }
        }
    }

    /// Applies one heartbeat recorded at `at_ms`.
    pub fn heartbeat(&mut self, id: &InstanceKey, at_ms: UnixMillis) {
        let Some(slot) = self.find(id) else {
            self.unknown_beats += 1;
            return;
        };
        if self.sp.active && at_ms >= self.sp.entered_at {
            self.sp.beat_seen = true;
        }
        let lease = self.slots[slot as usize];
        if at_ms <= lease.last_beat_ms || lease.state == State::Expiring {
            return;
        }
        let window = self.window(lease.ttl_ms);
        let new_deadline = at_ms.saturating_add(window);
        let lifts_reprieve = at_ms >= self.sp.exited_at;
        let now = self.now;
        match lease.state {
            State::Healthy | State::Overdue | State::Held => {
                self.modify(slot, |l| {
                    l.last_beat_ms = at_ms;
                    l.deadline_ms = l.deadline_ms.max(new_deadline);
                    if lifts_reprieve {
                        l.flags &= !REPRIEVED;
                    }
                    if l.state == State::Overdue || (l.state == State::Held && l.deadline_ms > now)
                    {
                        l.state = State::Healthy;
                    }
                });
            }
            State::Unhealthy | State::UnhealthyHeld => {
                self.modify(slot, |l| {
                    l.last_beat_ms = at_ms;
                    if lifts_reprieve {
                        l.flags &= !REPRIEVED;
                    }
                });
                if self.recovering {
                    self.modify(slot, |l| l.flags |= BEAT_WHILE_UNHEALTHY);
                } else if new_deadline > now {
                    self.revive(slot);
                }
            }
            State::Vacant | State::Expiring => {}
        }
    }

    /// Moves time to `now` (never backwards) and decides everything due by then.
    pub fn advance(&mut self, now: UnixMillis) {
        self.now = self.now.max(now);
        if self.recovering {
            return;
        }
        // Each round moves every due lease one state further (a zero delete timeout makes an
        // ephemeral lease expire in the round after it turned unhealthy).
        loop {
            let (mut due_unhealthy, mut due_expiry) = self.pop_due();
            if self.sp.active && self.exit_due() {
                let at = self.now;
                self.exit_self_preservation(at, true);
                // The reprieve moved deadlines: only what is still due stays due.
                due_unhealthy.retain(|&slot| {
                    let lease = &self.slots[slot as usize];
                    lease.state.is_healthy() && lease.deadline_ms <= at
                });
                due_expiry.retain(|&slot| {
                    let lease = &self.slots[slot as usize];
                    lease.state == State::Unhealthy && lease.deadline_ms <= at
                });
                for slot in due_unhealthy.iter().chain(&due_expiry) {
                    self.rearm(*slot);
                }
            }
            self.maybe_enter(&due_unhealthy);
            if due_unhealthy.is_empty() && due_expiry.is_empty() {
                break;
            }
            self.decide(due_unhealthy, due_expiry);
        }
    }

    /// Records that `transition` was stored at `sequence`.
    pub fn acknowledged(&mut self, transition: &Transition, sequence: u64) {
        match &transition.kind {
            TransitionKind::SelfPreservationEntered { .. }
            | TransitionKind::SelfPreservationExited { .. } => {
                self.sp.last_sequence = self.sp.last_sequence.max(sequence);
            }
            TransitionKind::TurnedUnhealthy { instance, .. }
            | TransitionKind::TurnedHealthy { instance, .. }
            | TransitionKind::Expired { instance, .. } => {
                let Some(slot) = self.find(&instance.id) else {
                    return;
                };
                let lease = self.slots[slot as usize];
                if matches!(transition.kind, TransitionKind::Expired { .. })
                    && lease.state == State::Expiring
                    && lease.generation == instance.generation
                {
                    self.remove(slot);
                } else {
                    self.modify(slot, |l| l.subject_seq = l.subject_seq.max(sequence));
                }
            }
        }
    }

    // ----- inputs -------------------------------------------------------------------------------

    #[allow(clippy::too_many_arguments)]
    fn register(
        &mut self,
        sequence: u64,
        id: InstanceKey,
        namespace: &str,
        service: &str,
        at: i64,
        ttl_ms: Option<u64>,
        ephemeral: bool,
    ) {
        let existing = self.find(&id);
        if let Some(slot) = existing
            && sequence <= self.slots[slot as usize].subject_seq
        {
            return;
        }
        let Some(ttl_ms) = ttl_ms else {
            if let Some(slot) = existing {
                self.remove(slot);
            }
            return;
        };
        // A registration counts as a beat, also as evidence that the path from the API to the
        // engine works again.
        if self.sp.active && at >= self.sp.entered_at {
            self.sp.beat_seen = true;
        }
        let ttl_ms = u32::try_from(ttl_ms).unwrap_or(u32::MAX);
        let window = self.window(ttl_ms);
        let service = self.intern(namespace, service);
        let flags = if ephemeral { EPHEMERAL } else { 0 };
        match existing {
            Some(slot) => {
                let old_service = self.slots[slot as usize].service;
                self.modify(slot, |l| {
                    l.service = service;
                    l.ttl_ms = ttl_ms;
                    l.generation = sequence;
                    l.subject_seq = sequence;
                    l.last_beat_ms = l.last_beat_ms.max(at);
                    l.deadline_ms = l.last_beat_ms.saturating_add(window);
                    l.state = State::Healthy;
                    l.flags = flags;
                });
                self.release(old_service);
            }
            None => {
                let lease = Lease {
                    id,
                    service,
                    ttl_ms,
                    state: State::Healthy,
                    flags,
                    generation: sequence,
                    subject_seq: sequence,
                    last_beat_ms: at,
                    deadline_ms: at.saturating_add(window),
                    armed_at: NOT_ARMED,
                };
                self.insert(lease);
            }
        }
    }

    fn observe_removal(&mut self, sequence: u64, id: InstanceKey) {
        if let Some(slot) = self.find(&id)
            && sequence > self.slots[slot as usize].subject_seq
        {
            self.remove(slot);
        }
    }

    fn observe_other(&mut self, sequence: u64, id: InstanceKey) {
        if let Some(slot) = self.find(&id) {
            self.modify(slot, |l| l.subject_seq = l.subject_seq.max(sequence));
        }
    }

    fn observe_unhealthy(
        &mut self,
        sequence: u64,
        id: InstanceKey,
        last_heartbeat_ms: Option<i64>,
        deadline_ms: i64,
    ) {
        let Some(slot) = self.find(&id) else {
            return;
        };
        let lease = self.slots[slot as usize];
        if sequence <= lease.subject_seq {
            return;
        }
        let reported = last_heartbeat_ms.unwrap_or(i64::MIN);
        let expiry = deadline_ms.saturating_add(self.rules.delete_timeout_ms);
        self.modify(slot, |l| {
            l.subject_seq = sequence;
            l.state = State::Unhealthy;
            l.last_beat_ms = l.last_beat_ms.max(reported);
            l.deadline_ms = expiry;
        });
        // We may know a newer beat than whoever decided this.
        let window = self.window(lease.ttl_ms);
        if lease.last_beat_ms > reported {
            if self.recovering {
                self.modify(slot, |l| l.flags |= BEAT_WHILE_UNHEALTHY);
            } else if lease.last_beat_ms.saturating_add(window) > self.now {
                self.revive(slot);
            }
        }
    }

    fn observe_healthy(&mut self, sequence: u64, id: InstanceKey, heartbeat_ms: i64) {
        let Some(slot) = self.find(&id) else {
            return;
        };
        let lease = self.slots[slot as usize];
        if sequence <= lease.subject_seq {
            return;
        }
        let window = self.window(lease.ttl_ms);
        let lifts_reprieve = heartbeat_ms >= self.sp.exited_at;
        self.modify(slot, |l| {
            l.subject_seq = sequence;
            l.last_beat_ms = l.last_beat_ms.max(heartbeat_ms);
            let deadline = l.last_beat_ms.saturating_add(window);
            l.deadline_ms = if l.state.is_healthy() {
                l.deadline_ms.max(deadline)
            } else {
                deadline
            };
            if lifts_reprieve {
                l.flags &= !REPRIEVED;
            }
            l.flags &= !BEAT_WHILE_UNHEALTHY;
            l.state = State::Healthy;
        });
    }

    fn observe_self_preservation(&mut self, sequence: u64, entered: bool, at: i64) {
        if sequence <= self.sp.last_sequence {
            return;
        }
        self.sp.last_sequence = sequence;
        if entered && !self.sp.active {
            self.sp.active = true;
            self.sp.entered_at = at;
            self.sp.beat_seen = false;
        } else if !entered && self.sp.active {
            self.exit_self_preservation(at, false);
        }
    }

    // ----- decisions ----------------------------------------------------------------------------

    /// Pops every timer due by `now`: (leases past their unhealthy deadline, leases past their
    /// expiry), marking overdue leases on the way.
    fn pop_due(&mut self) -> (Vec<u32>, Vec<u32>) {
        let now = self.now;
        let mut due_unhealthy = Vec::new();
        let mut due_expiry = Vec::new();
        while let Some(&Reverse((at, slot))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(lease) = self.slots.get_mut(slot as usize) else {
                continue;
            };
            if lease.armed_at != at || lease.state == State::Vacant {
                continue;
            }
            lease.armed_at = NOT_ARMED;
            let lease = *lease;
            match lease.state {
                State::Healthy | State::Overdue if lease.deadline_ms <= now => {
                    due_unhealthy.push(slot)
                }
                State::Healthy
                    if self.rules.self_preservation.is_some() && self.overdue_at(&lease) <= now =>
                {
                    self.modify(slot, |l| l.state = State::Overdue);
                }
                State::Unhealthy if lease.ephemeral() && lease.deadline_ms <= now => {
                    due_expiry.push(slot)
                }
                _ => self.rearm(slot),
            }
        }
        (due_unhealthy, due_expiry)
    }

    fn exit_due(&self) -> bool {
        match &self.rules.self_preservation {
            Some(sp) => {
                self.sp.beat_seen && self.now >= self.sp.entered_at.saturating_add(sp.window_ms)
            }
            // Switched off while active (e.g. a snapshot or a predecessor's event): leave.
            None => true,
        }
    }

    fn maybe_enter(&mut self, due_unhealthy: &[u32]) {
        let Some(rules) = self.rules.self_preservation.clone() else {
            return;
        };
        let horizon = self.now.saturating_sub(rules.window_ms);
        while self.recent_misses.front().is_some_and(|at| *at <= horizon) {
            self.recent_misses.pop_front();
        }
        if self.sp.active {
            return;
        }
        let mut due_misses = 0u64;
        let mut due_overdue = 0u64;
        for slot in due_unhealthy {
            let lease = &self.slots[*slot as usize];
            if !lease.reprieved() {
                due_misses += 1;
            }
            if lease.at_risk() {
                due_overdue += 1;
            }
        }
        let at_risk =
            self.overdue_at_risk - due_overdue + self.recent_misses.len() as u64 + due_misses;
        let total = self.len() as u64;
        if at_risk >= rules.min_at_risk && at_risk as f64 > rules.share * total as f64 {
            self.sp.active = true;
            self.sp.entered_at = self.now;
            self.sp.beat_seen = false;
            self.outbox.push(Transition {
                at_ms: self.now,
                kind: TransitionKind::SelfPreservationEntered {
                    at_risk,
                    total,
                    after_sequence: self.sp.last_sequence,
                },
            });
        }
    }

    fn decide(&mut self, mut due_unhealthy: Vec<u32>, mut due_expiry: Vec<u32>) {
        let now = self.now;
        let by_deadline = |slots: &[Lease], a: &u32, b: &u32| {
            let (a, b) = (&slots[*a as usize], &slots[*b as usize]);
            (a.deadline_ms, a.id).cmp(&(b.deadline_ms, b.id))
        };
        due_unhealthy.sort_unstable_by(|a, b| by_deadline(&self.slots, a, b));
        due_expiry.sort_unstable_by(|a, b| by_deadline(&self.slots, a, b));
        let counting = self.rules.self_preservation.is_some();
        let delete_timeout = self.rules.delete_timeout_ms;
        for slot in due_unhealthy {
            let lease = self.slots[slot as usize];
            if counting && !lease.reprieved() {
                self.recent_misses.push_back(now);
            }
            if self.sp.active {
                self.modify(slot, |l| l.state = State::Held);
                continue;
            }
            let instance = self.instance_ref(&lease);
            self.outbox.push(Transition {
                at_ms: now,
                kind: TransitionKind::TurnedUnhealthy {
                    instance,
                    last_heartbeat_ms: lease.last_beat_ms,
                    deadline_ms: lease.deadline_ms,
                },
            });
            self.modify(slot, |l| {
                l.state = State::Unhealthy;
                l.deadline_ms = l.deadline_ms.saturating_add(delete_timeout);
            });
        }
        for slot in due_expiry {
            let lease = self.slots[slot as usize];
            if self.sp.active {
                self.modify(slot, |l| l.state = State::UnhealthyHeld);
                continue;
            }
            let instance = self.instance_ref(&lease);
            self.outbox.push(Transition {
                at_ms: now,
                kind: TransitionKind::Expired {
                    instance,
                    last_heartbeat_ms: lease.last_beat_ms,
                    deadline_ms: lease.deadline_ms,
                },
            });
            // Removed once the log has it (`acknowledged`), so that a refused append leaves the
            // lease to be decided again.
            self.modify(slot, |l| l.state = State::Expiring);
        }
    }

    /// Publishes `TurnedHealthy` for an unhealthy lease whose newest beat is still live.
    fn revive(&mut self, slot: u32) {
        let lease = self.slots[slot as usize];
        let window = self.window(lease.ttl_ms);
        let instance = self.instance_ref(&lease);
        self.outbox.push(Transition {
            at_ms: self.now,
            kind: TransitionKind::TurnedHealthy {
                instance,
                heartbeat_ms: lease.last_beat_ms,
            },
        });
        self.modify(slot, |l| {
            l.state = State::Healthy;
            l.deadline_ms = l.last_beat_ms.saturating_add(window);
            l.flags &= !BEAT_WHILE_UNHEALTHY;
        });
    }

    /// Leaves self-preservation at `at`, restarting the windows of every lease (see the module
    /// documentation). Emits `SelfPreservationExited` when `emit` (our own decision).
    fn exit_self_preservation(&mut self, at: i64, emit: bool) {
        self.sp.active = false;
        self.sp.beat_seen = false;
        self.sp.exited_at = at;
        self.recent_misses.clear();
        let delete_timeout = self.rules.delete_timeout_ms;
        for slot in 0..self.slots.len() as u32 {
            let lease = self.slots[slot as usize];
            if lease.state.is_healthy() {
                let floor = at.saturating_add(self.window(lease.ttl_ms));
                self.modify(slot, |l| {
                    if l.deadline_ms < floor {
                        l.deadline_ms = floor;
                        l.flags |= REPRIEVED;
                    }
                    l.state = State::Healthy;
                });
            } else if matches!(lease.state, State::Unhealthy | State::UnhealthyHeld) {
                let floor = at.saturating_add(delete_timeout);
                self.modify(slot, |l| {
                    if l.ephemeral() && l.deadline_ms < floor {
                        l.deadline_ms = floor;
                        l.flags |= REPRIEVED;
                    }
                    l.state = State::Unhealthy;
                });
            }
        }
        if emit {
            self.outbox.push(Transition {
                at_ms: at,
                kind: TransitionKind::SelfPreservationExited {
                    total: self.len() as u64,
                    after_sequence: self.sp.last_sequence,
                },
            });
        }
    }

    // ----- storage ------------------------------------------------------------------------------

    fn window(&self, ttl_ms: u32) -> i64 {
        // Leases are at most u32::MAX ms (49 days) long, so this cannot overflow an i64.
        (f64::from(ttl_ms) * self.rules.unhealthy_ratio).round() as i64
    }

    fn overdue_at(&self, lease: &Lease) -> i64 {
        let window = self.window(lease.ttl_ms);
        let ttl = i64::from(lease.ttl_ms);
        let margin = (window - ttl).min(ttl).max(0);
        lease.deadline_ms.saturating_sub(margin)
    }

    fn wanted_timer(&self, lease: &Lease) -> Option<i64> {
        match lease.state {
            State::Healthy if self.rules.self_preservation.is_some() => {
                Some(self.overdue_at(lease))
            }
            State::Healthy | State::Overdue => Some(lease.deadline_ms),
            State::Unhealthy if lease.ephemeral() => Some(lease.deadline_ms),
            _ => None,
        }
    }

    /// Makes sure the heap wakes the lease no later than it wants: an earlier wish pushes a new
    /// entry; a later one waits for the current entry to fire and be re-pushed (beats, the hot
    /// path, only ever move deadlines later and so touch no heap at all).
    fn rearm(&mut self, slot: u32) {
        let lease = self.slots[slot as usize];
        if let Some(at) = self.wanted_timer(&lease)
            && at < lease.armed_at
        {
            self.timers.push(Reverse((at, slot)));
            self.slots[slot as usize].armed_at = at;
        }
    }

    /// Changes one lease and keeps counts and timers in step.
    fn modify(&mut self, slot: u32, change: impl FnOnce(&mut Lease)) {
        let lease = &mut self.slots[slot as usize];
        let (state_before, risk_before) = (lease.state, lease.at_risk());
        change(lease);
        let (state_after, risk_after) = (lease.state, lease.at_risk());
        if state_before != state_after {
            self.counts[state_before as usize] -= 1;
            self.counts[state_after as usize] += 1;
        }
        match (risk_before, risk_after) {
            (false, true) => self.overdue_at_risk += 1,
            (true, false) => self.overdue_at_risk -= 1,
            _ => {}
        }
        self.rearm(slot);
    }

    fn hash(&self, id: &InstanceKey) -> u64 {
        hash_with(self.seed, id)
    }

    fn find(&self, id: &InstanceKey) -> Option<u32> {
        let slots = &self.slots;
        self.index
            .find(self.hash(id), |slot| slots[*slot as usize].id == *id)
            .copied()
    }

    fn insert(&mut self, lease: Lease) -> u32 {
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slots[slot as usize] = lease;
                slot
            }
            None => {
                self.slots.push(lease);
                (self.slots.len() - 1) as u32
            }
        };
        let hash = self.hash(&lease.id);
        let (slots, seed) = (&self.slots, self.seed);
        self.index.insert_unique(hash, slot, |slot| {
            hash_with(seed, &slots[*slot as usize].id)
        });
        self.counts[lease.state as usize] += 1;
        if lease.at_risk() {
            self.overdue_at_risk += 1;
        }
        self.slots[slot as usize].armed_at = NOT_ARMED;
        self.rearm(slot);
        slot
    }

    fn remove(&mut self, slot: u32) {
        let lease = self.slots[slot as usize];
        let hash = self.hash(&lease.id);
        if let Ok(entry) = self.index.find_entry(hash, |s| *s == slot) {
            entry.remove();
        }
        self.counts[lease.state as usize] -= 1;
        if lease.at_risk() {
            self.overdue_at_risk -= 1;
        }
        self.release(lease.service);
        // Stale heap entries of this slot are recognised by `armed_at` (or by the new occupant's
        // `armed_at`, which differs unless it wants the very same time, which is then right).
        self.slots[slot as usize] = Lease::VACANT;
        self.free.push(slot);
    }

    fn intern(&mut self, namespace: &str, service: &str) -> u32 {
        let key = service_key(namespace, service);
        if let Some(index) = self.service_index.get(&key) {
            self.services[*index as usize].refs += 1;
            return *index;
        }
        let entry = Service {
            namespace: namespace.into(),
            service: service.into(),
            refs: 1,
        };
        let index = match self.free_services.pop() {
            Some(index) => {
                self.services[index as usize] = entry;
                index
            }
            None => {
                self.services.push(entry);
                (self.services.len() - 1) as u32
            }
        };
        self.service_index.insert(key, index);
        index
    }

    fn release(&mut self, index: u32) {
        let Some(entry) = self.services.get_mut(index as usize) else {
            return;
        };
        entry.refs = entry.refs.saturating_sub(1);
        if entry.refs == 0 {
            let key = service_key(&entry.namespace, &entry.service);
            self.service_index.remove(&key);
            self.free_services.push(index);
        }
    }

    fn instance_ref(&self, lease: &Lease) -> InstanceRef {
        let service = &self.services[lease.service as usize];
        InstanceRef {
            id: lease.id,
            namespace: Arc::clone(&service.namespace),
            service: Arc::clone(&service.service),
            generation: lease.generation,
            after_sequence: lease.subject_seq,
        }
    }
}

/// A keyed folded multiply over the first 16 bytes of the id: fast, and every output bit depends
/// on every input bit, so bucket choice cannot be steered without the key.
fn hash_with(seed: u64, id: &InstanceKey) -> u64 {
    let mut low = [0u8; 8];
    let mut high = [0u8; 8];
    low.copy_from_slice(&id[..8]);
    high.copy_from_slice(&id[8..16]);
    let product = u128::from(u64::from_le_bytes(low) ^ seed)
        * u128::from(u64::from_le_bytes(high) ^ 0x9E37_79B9_7F4A_7C15);
    (product >> 64) as u64 ^ product as u64
}
