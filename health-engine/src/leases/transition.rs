//! What the lease core decides, and how each decision becomes one event on the log.
//!
//! Event ids are deterministic and built only from data every engine reading the same log agrees
//! on, so that a restarted engine, a redelivery or two engines overlapping for a moment produce
//! the same message id and JetStream stores the transition once:
//!
//! | transition                | event id                                             |
//! |---------------------------|------------------------------------------------------|
//! | `InstanceTurnedUnhealthy` | `health:<id>:<generation>:unhealthy:<last beat ms>`  |
//! | `InstanceTurnedHealthy`   | `health:<id>:<generation>:healthy:<beat ms>`         |
//! | `InstanceExpired`         | `health:<id>:<generation>:expired`                   |
//! | `SelfPreservationEntered` | `health:self-preservation:entered:<after sequence>`  |
//! | `SelfPreservationExited`  | `health:self-preservation:exited:<after sequence>`   |
//!
//! The unhealthy id names the beat after which the silence began rather than the deadline: two
//! engines that saw the same beats agree on it even if one restarted (and so computed a later,
//! conservative deadline). Within one generation a lease can only turn unhealthy again after a
//! newer beat revived it, so the ids of repeated cycles differ. An instance expires at most once
//! per generation. Self-preservation events are keyed by the last sequence on their subject.

use std::sync::Arc;

use event_log::event::{
    Event, InstanceExpired, InstanceTurnedHealthy, InstanceTurnedUnhealthy,
    SelfPreservationEntered, SelfPreservationExited, UnixMillis, millis_to_datetime,
};
use event_log::{Append, Envelope, Streams};

use super::{InstanceKey, format_instance_id};

/// The subject kind of the self-preservation events (`Streams::system_subject`).
pub const SELF_PRESERVATION_SUBJECT: &str = "self-preservation";

/// The instance a transition is about, with what the append needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceRef {
    /// Instance id.
    pub id: InstanceKey,
    /// Namespace.
    pub namespace: Arc<str>,
    /// Service.
    pub service: Arc<str>,
    /// Lease generation: the stream sequence of the registration that started the lease.
    pub generation: u64,
    /// Last sequence known on the instance's subject: the append expects it to still be last.
    pub after_sequence: u64,
}

/// One decision of the core.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// The core's time when it decided (becomes `occurred_at`).
    pub at_ms: UnixMillis,
    /// What was decided.
    pub kind: TransitionKind,
}

/// The kinds of decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransitionKind {
    /// The deadline passed without a beat.
    TurnedUnhealthy {
        /// The instance.
        instance: InstanceRef,
        /// Newest beat known (the registration counts as one).
        last_heartbeat_ms: UnixMillis,
        /// The deadline that passed.
        deadline_ms: UnixMillis,
    },
    /// A live beat arrived for an unhealthy instance.
    TurnedHealthy {
        /// The instance.
        instance: InstanceRef,
        /// The beat.
        heartbeat_ms: UnixMillis,
    },
    /// An ephemeral instance stayed unhealthy for the delete timeout.
    Expired {
        /// The instance.
        instance: InstanceRef,
        /// Newest beat known.
        last_heartbeat_ms: UnixMillis,
        /// The expiry deadline that passed.
        deadline_ms: UnixMillis,
    },
    /// Too many leases at risk at once.
    SelfPreservationEntered {
        /// Leases at risk.
        at_risk: u64,
        /// Leases held.
        total: u64,
        /// Last sequence known on the self-preservation subject.
        after_sequence: u64,
    },
    /// Heartbeats returned.
    SelfPreservationExited {
        /// Leases held.
        total: u64,
        /// Last sequence known on the self-preservation subject.
        after_sequence: u64,
    },
}

/// The subject a transition is appended on, as a grouping key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SubjectKey {
    /// An instance subject.
    Instance(InstanceKey),
    /// The self-preservation subject.
    SelfPreservation,
}

impl Transition {
    /// The instance, for instance transitions.
    pub fn instance(&self) -> Option<&InstanceRef> {
        match &self.kind {
            TransitionKind::TurnedUnhealthy { instance, .. }
            | TransitionKind::TurnedHealthy { instance, .. }
            | TransitionKind::Expired { instance, .. } => Some(instance),
            TransitionKind::SelfPreservationEntered { .. }
            | TransitionKind::SelfPreservationExited { .. } => None,
        }
    }

    /// The subject it is appended on.
    pub fn subject_key(&self) -> SubjectKey {
        match self.instance() {
            Some(instance) => SubjectKey::Instance(instance.id),
            None => SubjectKey::SelfPreservation,
        }
    }

    /// The sequence the append expects to be last on the subject.
    pub fn after_sequence(&self) -> u64 {
        match &self.kind {
            TransitionKind::TurnedUnhealthy { instance, .. }
            | TransitionKind::TurnedHealthy { instance, .. }
            | TransitionKind::Expired { instance, .. } => instance.after_sequence,
            TransitionKind::SelfPreservationEntered { after_sequence, .. }
            | TransitionKind::SelfPreservationExited { after_sequence, .. } => *after_sequence,
        }
    }

    /// Changes the expected last subject sequence (after a sequence moved under us).
    pub fn set_after_sequence(&mut self, sequence: u64) {
        match &mut self.kind {
            TransitionKind::TurnedUnhealthy { instance, .. }
            | TransitionKind::TurnedHealthy { instance, .. }
            | TransitionKind::Expired { instance, .. } => instance.after_sequence = sequence,
            TransitionKind::SelfPreservationEntered { after_sequence, .. }
            | TransitionKind::SelfPreservationExited { after_sequence, .. } => {
                *after_sequence = sequence
            }
        }
    }

    /// The deterministic event id (see the module documentation).
    pub fn event_id(&self) -> String {
        match &self.kind {
            TransitionKind::TurnedUnhealthy {
                instance,
                last_heartbeat_ms,
                ..
            } => format!(
                "health:{}:{}:unhealthy:{last_heartbeat_ms}",
                format_instance_id(&instance.id),
                instance.generation
            ),
            TransitionKind::TurnedHealthy {
                instance,
                heartbeat_ms,
            } => format!(
                "health:{}:{}:healthy:{heartbeat_ms}",
                format_instance_id(&instance.id),
                instance.generation
            ),
            TransitionKind::Expired { instance, .. } => format!(
                "health:{}:{}:expired",
                format_instance_id(&instance.id),
                instance.generation
            ),
            TransitionKind::SelfPreservationEntered { after_sequence, .. } => {
                format!("health:{SELF_PRESERVATION_SUBJECT}:entered:{after_sequence}")
            }
            TransitionKind::SelfPreservationExited { after_sequence, .. } => {
                format!("health:{SELF_PRESERVATION_SUBJECT}:exited:{after_sequence}")
            }
        }
    }

    /// The event, in its envelope.
    pub fn envelope(&self) -> Envelope {
        let (instance, event) = match &self.kind {
            TransitionKind::TurnedUnhealthy {
                instance,
                last_heartbeat_ms,
                deadline_ms,
            } => (
                Some(instance),
                Event::InstanceTurnedUnhealthy(InstanceTurnedUnhealthy {
                    last_heartbeat_ms: Some(*last_heartbeat_ms),
                    deadline_ms: *deadline_ms,
                    generation: instance.generation,
                }),
            ),
            TransitionKind::TurnedHealthy {
                instance,
                heartbeat_ms,
            } => (
                Some(instance),
                Event::InstanceTurnedHealthy(InstanceTurnedHealthy {
                    heartbeat_ms: *heartbeat_ms,
                    generation: instance.generation,
                }),
            ),
            TransitionKind::Expired {
                instance,
                last_heartbeat_ms,
                deadline_ms,
            } => (
                Some(instance),
                Event::InstanceExpired(InstanceExpired {
                    last_heartbeat_ms: Some(*last_heartbeat_ms),
                    deadline_ms: *deadline_ms,
                    generation: instance.generation,
                }),
            ),
            TransitionKind::SelfPreservationEntered { at_risk, total, .. } => (
                None,
                Event::SelfPreservationEntered(SelfPreservationEntered {
                    expiring: *at_risk,
                    total: *total,
                }),
            ),
            TransitionKind::SelfPreservationExited { total, .. } => (
                None,
                Event::SelfPreservationExited(SelfPreservationExited { total: *total }),
            ),
        };
        let (namespace, service, instance_id) = match instance {
            Some(instance) => (
                instance.namespace.to_string(),
                instance.service.to_string(),
                format_instance_id(&instance.id),
            ),
            None => (String::new(), String::new(), String::new()),
        };
        Envelope {
            event_id: self.event_id(),
            occurred_at: millis_to_datetime(self.at_ms),
            namespace,
            service,
            instance_id,
            event,
        }
    }

    /// The append: on the instance (or self-preservation) subject, with the event id as message
    /// id and the expected last subject sequence.
    pub fn append(&self, streams: &Streams) -> event_log::Result<Append> {
        let envelope = self.envelope();
        let append = match self.subject_key() {
            SubjectKey::Instance(_) => Append::event(streams, &envelope)?,
            SubjectKey::SelfPreservation => {
                Append::event_on(streams.system_subject(SELF_PRESERVATION_SUBJECT), &envelope)?
            }
        };
        Ok(append.expecting_last_subject_sequence(self.after_sequence()))
    }

    /// The subject string.
    pub fn subject(&self, streams: &Streams) -> String {
        match self.instance() {
            Some(instance) => streams.instance_subject(
                &instance.namespace,
                &instance.service,
                &format_instance_id(&instance.id),
            ),
            None => streams.system_subject(SELF_PRESERVATION_SUBJECT),
        }
    }
}
