//! The canonical fold of instance events into instance state.
//!
//! This is the meaning of the event stream, written once: the API's read model is built with it,
//! and the store's consistency check compares the PostgreSQL tables against it. Rules:
//!
//! * `InstanceRegistered` creates the instance, or updates every field of an existing (or
//!   deleted) one; `isolate: None` and `weight: None` keep the current isolation and weight
//!   (false and [`DEFAULT_WEIGHT`] for a new instance). A
//!   registration starts or renews the lease, so the instance is healthy from that event on.
//! * `InstanceStatusChanged` changes the fields it carries.
//! * `InstanceTurnedUnhealthy` / `InstanceTurnedHealthy` set `healthy` and record the transition
//!   and the last heartbeat they report.
//! * `InstanceDeregistered` and `InstanceExpired` delete the instance: it stays in the fold as a
//!   tombstone (`deleted`) so that revisions keep increasing and a consumer can tell "gone" from
//!   "never seen".
//! * Events on unknown or deleted instances other than a registration change nothing.
//! * `revision` is the stream sequence of the last event applied to the instance.

use std::collections::{BTreeMap, HashMap};

use crate::Envelope;
use crate::event::{Event, EventType, HealthCheck, Location, UnixMillis};

/// Weight of an instance registered without one.
pub const DEFAULT_WEIGHT: u32 = 100;

/// The state of one instance after folding its events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceState {
    /// Instance id.
    pub id: String,
    /// Namespace.
    pub namespace: String,
    /// Service.
    pub service: String,
    /// Host.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Protocol.
    pub protocol: String,
    /// Version.
    pub version: String,
    /// Weight.
    pub weight: u32,
    /// Metadata.
    pub metadata: BTreeMap<String, String>,
    /// Heartbeat lease, `None` when health checking is disabled.
    pub health_check: Option<HealthCheck>,
    /// Ephemeral (expired when dead) or persistent (only marked unhealthy).
    pub ephemeral: bool,
    /// Hidden from discovery by default.
    pub isolate: bool,
    /// Location.
    pub location: Location,
    /// Health as decided by the health engine.
    pub healthy: bool,
    /// Deregistered or expired.
    pub deleted: bool,
    /// Stream sequence of the last event applied.
    pub revision: u64,
    /// When the first registration happened.
    pub created_at_ms: UnixMillis,
    /// When the last applied event happened.
    pub updated_at_ms: UnixMillis,
    /// Last heartbeat reported by a health transition, if any.
    pub last_heartbeat_ms: Option<UnixMillis>,
    /// Last health transition (`InstanceTurnedHealthy`/`Unhealthy`/`Expired`) and when.
    pub last_transition: Option<(EventType, UnixMillis)>,
}

/// What applying one event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The instance changed (created, updated or deleted).
    Changed,
    /// The event does not change instance state (heartbeats, engine events, events on unknown
    /// instances, or a sequence already applied).
    Ignored,
}

/// Instance states keyed by instance id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fold {
    instances: HashMap<String, InstanceState>,
}

impl Fold {
    /// An empty fold.
    pub fn new() -> Fold {
        Fold::default()
    }

    /// The state of one instance (tombstones included).
    pub fn get(&self, instance_id: &str) -> Option<&InstanceState> {
        self.instances.get(instance_id)
    }

    /// Every instance (tombstones included), in no particular order.
    pub fn instances(&self) -> impl Iterator<Item = &InstanceState> {
        self.instances.values()
    }

    /// Number of instances (tombstones included).
    pub fn len(&self) -> usize {
        self.instances.len()
    }

    /// True when nothing was ever registered.
    pub fn is_empty(&self) -> bool {
        self.instances.is_empty()
    }

    /// Seeds the fold with the state of one instance known from elsewhere (a projection's stored
    /// row, say), replacing what the fold held for that id. Events applied afterwards build on it
    /// exactly as if the fold had produced that state itself, so a projection can load only the
    /// instances a batch touches and still apply the canonical rules.
    pub fn restore(&mut self, state: InstanceState) {
        self.instances.insert(state.id.clone(), state);
    }

    /// Applies the event stored at `sequence`. Sequences at or below the instance's revision
    /// were already applied and are ignored, which makes replays and redeliveries harmless.
    pub fn apply(&mut self, sequence: u64, envelope: &Envelope) -> Applied {
        let at = envelope.occurred_at_ms();
        if self
            .instances
            .get(&envelope.instance_id)
            .is_some_and(|existing| sequence <= existing.revision)
        {
            return Applied::Ignored;
        }
        if let Event::InstanceRegistered(registered) = &envelope.event {
            let previous = self.instances.get(&envelope.instance_id);
            let live_previous = previous.filter(|state| !state.deleted);
            let state = InstanceState {
                id: envelope.instance_id.clone(),
                namespace: envelope.namespace.clone(),
                service: envelope.service.clone(),
                host: registered.host.clone(),
                port: registered.port,
                protocol: registered.protocol.clone(),
                version: registered.version.clone(),
                weight: registered
                    .weight
                    .or_else(|| live_previous.map(|state| state.weight))
                    .unwrap_or(DEFAULT_WEIGHT),
                metadata: registered.metadata.clone(),
                health_check: registered.health_check.clone(),
                ephemeral: registered.ephemeral,
                isolate: registered
                    .isolate
                    .unwrap_or_else(|| live_previous.is_some_and(|state| state.isolate)),
                location: registered.location.clone(),
                healthy: true,
                deleted: false,
                revision: sequence,
                created_at_ms: live_previous.map_or(at, |state| state.created_at_ms),
                updated_at_ms: at,
                last_heartbeat_ms: live_previous.and_then(|state| state.last_heartbeat_ms),
                last_transition: live_previous.and_then(|state| state.last_transition),
            };
            self.instances.insert(envelope.instance_id.clone(), state);
            return Applied::Changed;
        }
        let Some(state) = self.instances.get_mut(&envelope.instance_id) else {
            return Applied::Ignored;
        };
        if state.deleted {
            return Applied::Ignored;
        }
        match &envelope.event {
            Event::InstanceStatusChanged(change) => {
                if let Some(isolate) = change.isolate {
                    state.isolate = isolate;
                }
                if let Some(weight) = change.weight {
                    state.weight = weight;
                }
                if let Some(metadata) = &change.metadata {
                    state.metadata = metadata.clone();
                }
            }
            Event::InstanceTurnedUnhealthy(turned) => {
                state.healthy = false;
                state.last_heartbeat_ms = turned.last_heartbeat_ms.or(state.last_heartbeat_ms);
                state.last_transition = Some((EventType::InstanceTurnedUnhealthy, at));
            }
            Event::InstanceTurnedHealthy(turned) => {
                state.healthy = true;
                state.last_heartbeat_ms = Some(turned.heartbeat_ms);
                state.last_transition = Some((EventType::InstanceTurnedHealthy, at));
            }
            Event::InstanceExpired(expired) => {
                state.deleted = true;
                state.healthy = false;
                state.last_heartbeat_ms = expired.last_heartbeat_ms.or(state.last_heartbeat_ms);
                state.last_transition = Some((EventType::InstanceExpired, at));
            }
            Event::InstanceDeregistered(_) => {
                state.deleted = true;
            }
            Event::InstanceRegistered(_)
            | Event::HeartbeatsReceived(_)
            | Event::SelfPreservationEntered(_)
            | Event::SelfPreservationExited(_) => return Applied::Ignored,
        }
        state.revision = sequence;
        state.updated_at_ms = at;
        Applied::Changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{
        InstanceDeregistered, InstanceRegistered, InstanceStatusChanged, InstanceTurnedHealthy,
        InstanceTurnedUnhealthy,
    };

    fn envelope(event: Event) -> Envelope {
        Envelope::new("ns", "svc", "id-1", event)
    }

    fn registered(isolate: Option<bool>) -> Event {
        Event::InstanceRegistered(InstanceRegistered {
            host: "10.0.0.1".into(),
            port: 80,
            protocol: String::new(),
            version: String::new(),
            weight: None,
            metadata: BTreeMap::new(),
            health_check: Some(HealthCheck { ttl_ms: 1000 }),
            ephemeral: true,
            isolate,
            location: Location::default(),
        })
    }

    #[test]
    fn isolation_survives_re_registration_unless_set() {
        let mut fold = Fold::new();
        fold.apply(1, &envelope(registered(None)));
        let isolate = InstanceStatusChanged {
            isolate: Some(true),
            ..Default::default()
        };
        fold.apply(2, &envelope(Event::InstanceStatusChanged(isolate)));
        fold.apply(3, &envelope(registered(None)));
        assert!(fold.get("id-1").unwrap().isolate);
        fold.apply(4, &envelope(registered(Some(false))));
        assert!(!fold.get("id-1").unwrap().isolate);
        assert_eq!(fold.get("id-1").unwrap().revision, 4);
    }

    #[test]
    fn restored_state_continues_like_a_folded_one() {
        let mut folded = Fold::new();
        folded.apply(1, &envelope(registered(Some(true))));
        let mut restored = Fold::new();
        restored.restore(folded.get("id-1").unwrap().clone());
        let change = InstanceStatusChanged {
            weight: Some(7),
            ..Default::default()
        };
        for fold in [&mut folded, &mut restored] {
            // Sequence 1 is already in the restored state and must be ignored there too.
            assert_eq!(fold.apply(1, &envelope(registered(None))), Applied::Ignored);
            fold.apply(2, &envelope(Event::InstanceStatusChanged(change.clone())));
        }
        assert_eq!(folded, restored);
        assert_eq!(restored.get("id-1").unwrap().weight, 7);
    }

    #[test]
    fn health_transitions_and_deletion() {
        let mut fold = Fold::new();
        fold.apply(1, &envelope(registered(None)));
        assert!(fold.get("id-1").unwrap().healthy);
        let unhealthy = InstanceTurnedUnhealthy {
            last_heartbeat_ms: Some(5),
            deadline_ms: 3005,
            generation: 1,
        };
        assert_eq!(
            fold.apply(2, &envelope(Event::InstanceTurnedUnhealthy(unhealthy))),
            Applied::Changed
        );
        let state = fold.get("id-1").unwrap();
        assert!(!state.healthy);
        assert_eq!(state.last_heartbeat_ms, Some(5));
        let healthy = InstanceTurnedHealthy {
            heartbeat_ms: 4000,
            generation: 1,
        };
        fold.apply(3, &envelope(Event::InstanceTurnedHealthy(healthy.clone())));
        assert!(fold.get("id-1").unwrap().healthy);
        // A replayed sequence is ignored.
        assert_eq!(
            fold.apply(3, &envelope(Event::InstanceTurnedHealthy(healthy))),
            Applied::Ignored
        );
        fold.apply(
            4,
            &envelope(Event::InstanceDeregistered(InstanceDeregistered {})),
        );
        let state = fold.get("id-1").unwrap();
        assert!(state.deleted);
        assert_eq!(state.revision, 4);
        let change = InstanceStatusChanged {
            weight: Some(1),
            ..Default::default()
        };
        assert_eq!(
            fold.apply(5, &envelope(Event::InstanceStatusChanged(change))),
            Applied::Ignored
        );
        fold.apply(6, &envelope(registered(None)));
        let state = fold.get("id-1").unwrap();
        assert!(!state.deleted && !state.isolate && state.healthy);
    }
}
