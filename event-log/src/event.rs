//! Domain events: what happened to instances, in the past tense.
//!
//! # Wire format
//!
//! Every event travels as one JSON object, the envelope:
//!
//! ```json
//! {"event_type":"InstanceRegistered","schema_version":1,
//!  "event_id":"0190f5c2-...","occurred_at":"2026-11-21T08:00:00.123Z",
//!  "namespace":"default","service":"echo","instance_id":"f66fb94d...",
//!  "payload":{"host":"10.0.0.1","port":8080, ...}}
//! ```
//!
//! `event_type` names the payload type and `schema_version` its version. A reader refuses (with
//! [`Error::UnsupportedSchemaVersion`]) a version newer than it knows instead of guessing; older
//! versions stay readable forever. Fields are only ever *added* within a version when they are
//! optional (`#[serde(default)]`); any other change is a new version.
//!
//! Events about the whole engine (self-preservation) have empty `namespace`, `service` and
//! `instance_id`; [`HeartbeatsReceived`] batches beats of many instances and leaves them empty too.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use time::OffsetDateTime;

use crate::error::{Error, Result};

/// Milliseconds since the Unix epoch, UTC, as recorded by the server that accepted the command.
pub type UnixMillis = i64;

/// Current wall-clock time in Unix milliseconds. The one place the crate reads the clock; the
/// health engine's core never calls it and takes time as an input instead.
pub fn now_millis() -> UnixMillis {
    (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as UnixMillis
}

/// Converts Unix milliseconds to a timestamp (saturating at the representable range).
pub fn millis_to_datetime(millis: UnixMillis) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(millis) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// Health check configuration of an instance. Only client heartbeats (TTL leases) exist today.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    /// Expected interval between heartbeats, in milliseconds.
    pub ttl_ms: u64,
}

/// Where an instance runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Location {
    /// Region, e.g. `eu-west`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub region: String,
    /// Zone within the region.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub zone: String,
    /// Campus (data centre) within the zone.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub campus: String,
}

impl Location {
    /// True when no field is set.
    pub fn is_empty(&self) -> bool {
        self.region.is_empty() && self.zone.is_empty() && self.campus.is_empty()
    }
}

/// An instance was registered, or registered again (an idempotent update of the same address).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRegistered {
    /// Host name or IP address.
    pub host: String,
    /// Port, 1..=65535.
    pub port: u16,
    /// Application protocol, free text (`grpc`, `http`, ...).
    #[serde(default)]
    pub protocol: String,
    /// Version of the instance's software, free text.
    #[serde(default)]
    pub version: String,
    /// Load-balancing weight; `None` keeps the current weight (100 for a new instance), so that
    /// an operator's weight change survives the instance registering again.
    #[serde(default)]
    pub weight: Option<u32>,
    /// Instance metadata; replaces the previous metadata entirely.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Heartbeat lease, or `None` when health checking is disabled (never expired).
    pub health_check: Option<HealthCheck>,
    /// Ephemeral instances are removed after their lease has been dead for the delete timeout;
    /// persistent ones are only marked unhealthy.
    pub ephemeral: bool,
    /// `Some` sets isolation; `None` keeps the current isolation (false for a new instance).
    #[serde(default)]
    pub isolate: Option<bool>,
    /// Where the instance runs.
    #[serde(default, skip_serializing_if = "Location::is_empty")]
    pub location: Location,
}

/// An instance was deregistered by a client or an operator.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceDeregistered {}

/// One heartbeat inside a [`HeartbeatsReceived`] batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Beat {
    /// The instance that beat.
    #[serde(rename = "i")]
    pub instance_id: String,
    /// When the accepting server received the beat. Lease deadlines are computed from this time,
    /// not from when the health engine reads the event.
    #[serde(rename = "t")]
    pub at_ms: UnixMillis,
}

/// A batch of heartbeats, appended once per group commit (many beats, one message). Lives on the
/// heartbeat stream, not on the instance event stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatsReceived {
    /// The beats, in the order the server accepted them.
    pub beats: Vec<Beat>,
}

/// A status-change command was applied: each field that is `Some` changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceStatusChanged {
    /// New isolation flag; isolated instances are hidden from discovery by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isolate: Option<bool>,
    /// New weight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// New metadata, replacing the previous metadata entirely.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, String>>,
}

/// The health engine found no heartbeat for `ratio x TTL`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceTurnedUnhealthy {
    /// The last heartbeat the engine knew of, if any.
    pub last_heartbeat_ms: Option<UnixMillis>,
    /// The deadline that passed: last heartbeat (or lease start) plus `ratio x TTL`.
    pub deadline_ms: UnixMillis,
    /// Lease generation: the stream sequence of the registration that started the lease.
    pub generation: u64,
}

/// A heartbeat arrived for an unhealthy instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceTurnedHealthy {
    /// The heartbeat that revived the instance.
    pub heartbeat_ms: UnixMillis,
    /// Lease generation, see [`InstanceTurnedUnhealthy::generation`].
    pub generation: u64,
}

/// An ephemeral instance stayed dead for the delete timeout and was removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceExpired {
    /// The last heartbeat the engine knew of, if any.
    pub last_heartbeat_ms: Option<UnixMillis>,
    /// The expiry deadline that passed.
    pub deadline_ms: UnixMillis,
    /// Lease generation, see [`InstanceTurnedUnhealthy::generation`].
    pub generation: u64,
}

/// The health engine saw too many leases about to expire at once and stopped expiring them,
/// suspecting itself (partition, pause) rather than the fleet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelfPreservationEntered {
    /// Leases that would have expired within the window.
    pub expiring: u64,
    /// Leases the engine holds.
    pub total: u64,
}

/// Heartbeats returned; the engine resumed expiring, with fresh expiry windows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelfPreservationExited {
    /// Leases the engine holds.
    pub total: u64,
}

/// Every event the registry records. The variant name is the `event_type` on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// See [`InstanceRegistered`].
    InstanceRegistered(InstanceRegistered),
    /// See [`InstanceDeregistered`].
    InstanceDeregistered(InstanceDeregistered),
    /// See [`HeartbeatsReceived`].
    HeartbeatsReceived(HeartbeatsReceived),
    /// See [`InstanceStatusChanged`].
    InstanceStatusChanged(InstanceStatusChanged),
    /// See [`InstanceTurnedUnhealthy`].
    InstanceTurnedUnhealthy(InstanceTurnedUnhealthy),
    /// See [`InstanceTurnedHealthy`].
    InstanceTurnedHealthy(InstanceTurnedHealthy),
    /// See [`InstanceExpired`].
    InstanceExpired(InstanceExpired),
    /// See [`SelfPreservationEntered`].
    SelfPreservationEntered(SelfPreservationEntered),
    /// See [`SelfPreservationExited`].
    SelfPreservationExited(SelfPreservationExited),
}

/// The type of an event, without its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventType {
    /// [`InstanceRegistered`]
    InstanceRegistered,
    /// [`InstanceDeregistered`]
    InstanceDeregistered,
    /// [`HeartbeatsReceived`]
    HeartbeatsReceived,
    /// [`InstanceStatusChanged`]
    InstanceStatusChanged,
    /// [`InstanceTurnedUnhealthy`]
    InstanceTurnedUnhealthy,
    /// [`InstanceTurnedHealthy`]
    InstanceTurnedHealthy,
    /// [`InstanceExpired`]
    InstanceExpired,
    /// [`SelfPreservationEntered`]
    SelfPreservationEntered,
    /// [`SelfPreservationExited`]
    SelfPreservationExited,
}

impl EventType {
    /// Every event type, in declaration order.
    pub const ALL: [EventType; 9] = [
        EventType::InstanceRegistered,
        EventType::InstanceDeregistered,
        EventType::HeartbeatsReceived,
        EventType::InstanceStatusChanged,
        EventType::InstanceTurnedUnhealthy,
        EventType::InstanceTurnedHealthy,
        EventType::InstanceExpired,
        EventType::SelfPreservationEntered,
        EventType::SelfPreservationExited,
    ];

    /// The name used on the wire (`event_type`).
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::InstanceRegistered => "InstanceRegistered",
            EventType::InstanceDeregistered => "InstanceDeregistered",
            EventType::HeartbeatsReceived => "HeartbeatsReceived",
            EventType::InstanceStatusChanged => "InstanceStatusChanged",
            EventType::InstanceTurnedUnhealthy => "InstanceTurnedUnhealthy",
            EventType::InstanceTurnedHealthy => "InstanceTurnedHealthy",
            EventType::InstanceExpired => "InstanceExpired",
            EventType::SelfPreservationEntered => "SelfPreservationEntered",
            EventType::SelfPreservationExited => "SelfPreservationExited",
        }
    }

    /// Parses a wire name.
    pub fn parse(name: &str) -> Option<EventType> {
        EventType::ALL.into_iter().find(|t| t.as_str() == name)
    }

    /// The newest schema version of this type that this build writes and reads.
    pub fn schema_version(self) -> u16 {
        1
    }
}

impl std::fmt::Display for EventType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Event {
    /// The type of this event.
    pub fn event_type(&self) -> EventType {
        match self {
            Event::InstanceRegistered(_) => EventType::InstanceRegistered,
            Event::InstanceDeregistered(_) => EventType::InstanceDeregistered,
            Event::HeartbeatsReceived(_) => EventType::HeartbeatsReceived,
            Event::InstanceStatusChanged(_) => EventType::InstanceStatusChanged,
            Event::InstanceTurnedUnhealthy(_) => EventType::InstanceTurnedUnhealthy,
            Event::InstanceTurnedHealthy(_) => EventType::InstanceTurnedHealthy,
            Event::InstanceExpired(_) => EventType::InstanceExpired,
            Event::SelfPreservationEntered(_) => EventType::SelfPreservationEntered,
            Event::SelfPreservationExited(_) => EventType::SelfPreservationExited,
        }
    }

    fn payload_json(&self) -> Result<String> {
        let json = match self {
            Event::InstanceRegistered(p) => serde_json::to_string(p),
            Event::InstanceDeregistered(p) => serde_json::to_string(p),
            Event::HeartbeatsReceived(p) => serde_json::to_string(p),
            Event::InstanceStatusChanged(p) => serde_json::to_string(p),
            Event::InstanceTurnedUnhealthy(p) => serde_json::to_string(p),
            Event::InstanceTurnedHealthy(p) => serde_json::to_string(p),
            Event::InstanceExpired(p) => serde_json::to_string(p),
            Event::SelfPreservationEntered(p) => serde_json::to_string(p),
            Event::SelfPreservationExited(p) => serde_json::to_string(p),
        };
        json.map_err(|e| Error::Malformed(e.to_string()))
    }

    fn from_payload(event_type: EventType, payload: &str) -> Result<Event> {
        fn parse<'a, T: Deserialize<'a>>(event_type: EventType, payload: &'a str) -> Result<T> {
            serde_json::from_str(payload)
                .map_err(|e| Error::Malformed(format!("{event_type} payload: {e}")))
        }
        Ok(match event_type {
            EventType::InstanceRegistered => Event::InstanceRegistered(parse(event_type, payload)?),
            EventType::InstanceDeregistered => {
                Event::InstanceDeregistered(parse(event_type, payload)?)
            }
            EventType::HeartbeatsReceived => Event::HeartbeatsReceived(parse(event_type, payload)?),
            EventType::InstanceStatusChanged => {
                Event::InstanceStatusChanged(parse(event_type, payload)?)
            }
            EventType::InstanceTurnedUnhealthy => {
                Event::InstanceTurnedUnhealthy(parse(event_type, payload)?)
            }
            EventType::InstanceTurnedHealthy => {
                Event::InstanceTurnedHealthy(parse(event_type, payload)?)
            }
            EventType::InstanceExpired => Event::InstanceExpired(parse(event_type, payload)?),
            EventType::SelfPreservationEntered => {
                Event::SelfPreservationEntered(parse(event_type, payload)?)
            }
            EventType::SelfPreservationExited => {
                Event::SelfPreservationExited(parse(event_type, payload)?)
            }
        })
    }
}

/// An event with its identity and addressing: the unit appended to the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Unique id of the event: a UUIDv7 for commands, a deterministic string for health
    /// transitions (so that a transition appended twice is deduplicated by the log).
    pub event_id: String,
    /// When the event happened, by the clock of the server that recorded it.
    pub occurred_at: OffsetDateTime,
    /// Namespace of the instance, empty for engine-wide events.
    pub namespace: String,
    /// Service of the instance, empty for engine-wide events.
    pub service: String,
    /// Instance id, empty for engine-wide events and heartbeat batches.
    pub instance_id: String,
    /// What happened.
    pub event: Event,
}

#[derive(Serialize, Deserialize)]
struct WireEnvelope<'a> {
    event_type: &'a str,
    schema_version: u16,
    event_id: &'a str,
    #[serde(with = "time::serde::rfc3339")]
    occurred_at: OffsetDateTime,
    #[serde(default)]
    namespace: &'a str,
    #[serde(default)]
    service: &'a str,
    #[serde(default)]
    instance_id: &'a str,
    #[serde(borrow)]
    payload: &'a RawValue,
}

#[derive(Deserialize)]
struct WireEnvelopeOwned {
    event_type: String,
    schema_version: u16,
    event_id: String,
    #[serde(with = "time::serde::rfc3339")]
    occurred_at: OffsetDateTime,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    service: String,
    #[serde(default)]
    instance_id: String,
    payload: Box<RawValue>,
}

impl Envelope {
    /// A new envelope for an instance event, with a fresh UUIDv7 id and `occurred_at` now.
    pub fn new(
        namespace: impl Into<String>,
        service: impl Into<String>,
        instance_id: impl Into<String>,
        event: Event,
    ) -> Envelope {
        Envelope {
            event_id: uuid::Uuid::now_v7().to_string(),
            occurred_at: OffsetDateTime::now_utc(),
            namespace: namespace.into(),
            service: service.into(),
            instance_id: instance_id.into(),
            event,
        }
    }

    /// The type of the carried event.
    pub fn event_type(&self) -> EventType {
        self.event.event_type()
    }

    /// `occurred_at` in Unix milliseconds.
    pub fn occurred_at_ms(&self) -> UnixMillis {
        (self.occurred_at.unix_timestamp_nanos() / 1_000_000) as UnixMillis
    }

    /// Encodes the envelope as its JSON wire form.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let payload = self.event.payload_json()?;
        let payload =
            RawValue::from_string(payload).map_err(|e| Error::Malformed(e.to_string()))?;
        let event_type = self.event_type();
        let wire = WireEnvelope {
            event_type: event_type.as_str(),
            schema_version: event_type.schema_version(),
            event_id: &self.event_id,
            occurred_at: self.occurred_at,
            namespace: &self.namespace,
            service: &self.service,
            instance_id: &self.instance_id,
            payload: &payload,
        };
        serde_json::to_vec(&wire).map_err(|e| Error::Malformed(e.to_string()))
    }

    /// Decodes the JSON wire form, refusing unknown types and newer schema versions.
    pub fn decode(bytes: &[u8]) -> Result<Envelope> {
        let wire: WireEnvelopeOwned =
            serde_json::from_slice(bytes).map_err(|e| Error::Malformed(e.to_string()))?;
        let event_type =
            EventType::parse(&wire.event_type).ok_or_else(|| Error::UnknownEventType {
                event_type: wire.event_type.clone(),
            })?;
        if wire.schema_version == 0 || wire.schema_version > event_type.schema_version() {
            return Err(Error::UnsupportedSchemaVersion {
                event_type: wire.event_type,
                found: wire.schema_version,
                supported: event_type.schema_version(),
            });
        }
        let event = Event::from_payload(event_type, wire.payload.get())?;
        Ok(Envelope {
            event_id: wire.event_id,
            occurred_at: wire.occurred_at,
            namespace: wire.namespace,
            service: wire.service,
            instance_id: wire.instance_id,
            event,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registered() -> Envelope {
        Envelope::new(
            "default",
            "echo",
            crate::instance_id("default", "echo", "10.0.0.1", 8080),
            Event::InstanceRegistered(InstanceRegistered {
                host: "10.0.0.1".into(),
                port: 8080,
                protocol: "grpc".into(),
                version: "1.2.3".into(),
                weight: Some(100),
                metadata: BTreeMap::from([("zone".into(), "a".into())]),
                health_check: Some(HealthCheck { ttl_ms: 5000 }),
                ephemeral: true,
                isolate: None,
                location: Location::default(),
            }),
        )
    }

    #[test]
    fn envelope_round_trips_through_json() {
        let envelope = registered();
        let bytes = envelope.encode().unwrap();
        let decoded = Envelope::decode(&bytes).unwrap();
        // RFC 3339 keeps nanoseconds, so the round trip is exact.
        assert_eq!(decoded, envelope);
    }

    #[test]
    fn wire_form_is_the_documented_one() {
        let mut envelope = registered();
        envelope.event_id = "id-1".into();
        envelope.occurred_at = time::macros::datetime!(2026-11-21 08:00:00.123 UTC);
        let json: serde_json::Value = serde_json::from_slice(&envelope.encode().unwrap()).unwrap();
        assert_eq!(json["event_type"], "InstanceRegistered");
        assert_eq!(json["schema_version"], 1);
        assert_eq!(json["event_id"], "id-1");
        assert_eq!(json["occurred_at"], "2026-11-21T08:00:00.123Z");
        assert_eq!(json["namespace"], "default");
        assert_eq!(json["service"], "echo");
        assert_eq!(
            json["instance_id"],
            "f66fb94da5404b4c8a541173874f53eb60f82440"
        );
        assert_eq!(json["payload"]["port"], 8080);
        assert_eq!(json["payload"]["health_check"]["ttl_ms"], 5000);
        assert_eq!(json["payload"]["isolate"], serde_json::Value::Null);
    }

    #[test]
    fn newer_schema_versions_are_refused_not_guessed() {
        let mut json: serde_json::Value =
            serde_json::from_slice(&registered().encode().unwrap()).unwrap();
        json["schema_version"] = 2.into();
        let err = Envelope::decode(&serde_json::to_vec(&json).unwrap()).unwrap_err();
        assert!(
            matches!(
                err,
                Error::UnsupportedSchemaVersion {
                    found: 2,
                    supported: 1,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn unknown_types_and_garbage_are_errors() {
        let mut json: serde_json::Value =
            serde_json::from_slice(&registered().encode().unwrap()).unwrap();
        json["event_type"] = "InstanceTeleported".into();
        let err = Envelope::decode(&serde_json::to_vec(&json).unwrap()).unwrap_err();
        assert!(
            matches!(err, Error::UnknownEventType { ref event_type } if event_type == "InstanceTeleported")
        );
        assert!(matches!(
            Envelope::decode(b"\xff\x00not json"),
            Err(Error::Malformed(_))
        ));
        json["event_type"] = "InstanceRegistered".into();
        json["payload"]["port"] = 70000.into();
        assert!(matches!(
            Envelope::decode(&serde_json::to_vec(&json).unwrap()),
            Err(Error::Malformed(_))
        ));
    }

    #[test]
    fn every_type_name_parses_back() {
        for event_type in EventType::ALL {
            assert_eq!(EventType::parse(event_type.as_str()), Some(event_type));
        }
        assert_eq!(EventType::parse("instanceregistered"), None);
    }

    #[test]
    fn heartbeat_batches_are_compact() {
        let beats = (0..1000)
            .map(|n| Beat {
                instance_id: crate::instance_id("ns", "svc", "10.0.0.1", n),
                at_ms: 1_790_000_000_000 + i64::from(n),
            })
            .collect();
        let envelope = Envelope::new(
            "",
            "",
            "",
            Event::HeartbeatsReceived(HeartbeatsReceived { beats }),
        );
        let bytes = envelope.encode().unwrap();
        assert!(
            bytes.len() < 70 * 1000,
            "{} bytes for 1000 beats",
            bytes.len()
        );
        assert_eq!(Envelope::decode(&bytes).unwrap(), envelope);
    }
}
