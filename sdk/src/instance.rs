//! The SDK's own instance types: what a provider registers ([`InstanceSpec`]) and what a
//! consumer sees ([`Instance`]), converted explicitly from and to the `registry.v1` wire types,
//! so that protobuf stays at the edge and a malformed answer becomes an error, not a panic.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use crate::proto;

/// Where an instance runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Location {
    /// Region, e.g. `eu-west`.
    pub region: String,
    /// Zone within the region.
    pub zone: String,
    /// Campus (data centre) within the zone.
    pub campus: String,
}

impl Location {
    fn from_proto(location: Option<proto::Location>) -> Location {
        location
            .map(|l| Location {
                region: l.region,
                zone: l.zone,
                campus: l.campus,
            })
            .unwrap_or_default()
    }

    fn to_proto(&self) -> Option<proto::Location> {
        (*self != Location::default()).then(|| proto::Location {
            region: self.region.clone(),
            zone: self.zone.clone(),
            campus: self.campus.clone(),
        })
    }
}

/// What a provider registers: the address plus everything a consumer should know about it.
///
/// The instance id is derived from the address (`hex(sha1("{ns}##{svc}##{host}##{port}"))`), so
/// registering the same address again updates the instance instead of duplicating it.
///
/// ```
/// use std::time::Duration;
/// use sdk::InstanceSpec;
///
/// let spec = InstanceSpec::new("default", "echo", "10.0.0.1", 8080)
///     .ttl(Duration::from_secs(5))
///     .protocol("grpc")
///     .metadata("zone", "a")
///     .weight(200);
/// assert_eq!(spec.id(), "f66fb94da5404b4c8a541173874f53eb60f82440");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceSpec {
    /// Namespace (1..=128 bytes of letters, digits and `-_.:@`).
    pub namespace: String,
    /// Service name (same rules as the namespace).
    pub service: String,
    /// IP address or DNS name.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Application protocol, free text (`grpc`, `http`, ...).
    pub protocol: String,
    /// Version of the instance's software, free text.
    pub version: String,
    /// Load-balancing weight (0..=10000); `None`: the server's default (100).
    pub weight: Option<u32>,
    /// Metadata, matched by consumers' selectors.
    pub metadata: BTreeMap<String, String>,
    /// Heartbeat lease; `None` disables health checking (the instance is never marked
    /// unhealthy, and the provider sends no heartbeats for it).
    pub ttl: Option<Duration>,
    /// `false` for a persistent instance (only marked unhealthy, never removed by the server).
    pub ephemeral: bool,
    /// `Some` sets isolation on registration; `None` keeps what an operator set.
    pub isolate: Option<bool>,
    /// Where the instance runs.
    pub location: Location,
}

/// The default heartbeat lease of [`InstanceSpec::new`]: 5 seconds (an instance turns unhealthy
/// after about 15 s without heartbeats with the server's default ratio of 3).
pub const DEFAULT_TTL: Duration = Duration::from_secs(5);

impl InstanceSpec {
    /// An ephemeral instance at `host:port` with the default TTL ([`DEFAULT_TTL`]).
    pub fn new(
        namespace: impl Into<String>,
        service: impl Into<String>,
        host: impl Into<String>,
        port: u16,
    ) -> InstanceSpec {
        InstanceSpec {
            namespace: namespace.into(),
            service: service.into(),
            host: host.into(),
            port,
            protocol: String::new(),
            version: String::new(),
            weight: None,
            metadata: BTreeMap::new(),
            ttl: Some(DEFAULT_TTL),
            ephemeral: true,
            isolate: None,
            location: Location::default(),
        }
    }

    /// The instance id the registry derives from the address.
    ///
    /// ```
    /// let spec = sdk::InstanceSpec::new("default", "echo", "10.0.0.1", 8080);
    /// assert_eq!(spec.id().len(), 40);
    /// ```
    pub fn id(&self) -> String {
        event_log::instance_id(&self.namespace, &self.service, &self.host, self.port)
    }

    /// Sets the heartbeat lease (1 s to 5 min on the server).
    pub fn ttl(mut self, ttl: Duration) -> InstanceSpec {
        self.ttl = Some(ttl);
        self
    }

    /// Disables health checking: no lease, no heartbeats.
    pub fn without_health_check(mut self) -> InstanceSpec {
        self.ttl = None;
        self
    }

    /// Sets the application protocol.
    pub fn protocol(mut self, protocol: impl Into<String>) -> InstanceSpec {
        self.protocol = protocol.into();
        self
    }

    /// Sets the software version.
    pub fn version(mut self, version: impl Into<String>) -> InstanceSpec {
        self.version = version.into();
        self
    }

    /// Sets the load-balancing weight.
    pub fn weight(mut self, weight: u32) -> InstanceSpec {
        self.weight = Some(weight);
        self
    }

    /// Adds one metadata entry.
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> InstanceSpec {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// Makes the instance persistent: never removed by the server, only marked unhealthy.
    pub fn persistent(mut self) -> InstanceSpec {
        self.ephemeral = false;
        self
    }

    /// Sets isolation on registration.
    pub fn isolate(mut self, isolate: bool) -> InstanceSpec {
        self.isolate = Some(isolate);
        self
    }

    /// Sets the location.
    pub fn location(mut self, location: Location) -> InstanceSpec {
        self.location = location;
        self
    }

    pub(crate) fn to_request(&self, request_id: &str) -> proto::RegisterInstanceRequest {
        proto::RegisterInstanceRequest {
            namespace: self.namespace.clone(),
            service: self.service.clone(),
            host: self.host.clone(),
            port: u32::from(self.port),
            protocol: self.protocol.clone(),
            version: self.version.clone(),
            weight: self.weight,
            metadata: self
                .metadata
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            health_check: self.ttl.map(|ttl| proto::HealthCheck {
                ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
            }),
            ephemeral: Some(self.ephemeral),
            isolate: self.isolate,
            location: self.location.to_proto(),
            request_id: request_id.to_owned(),
        }
    }
}

/// One registered instance, as discovered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// Instance id (40 lowercase hex digits).
    pub id: String,
    /// Namespace.
    pub namespace: String,
    /// Service.
    pub service: String,
    /// Host.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Application protocol.
    pub protocol: String,
    /// Software version.
    pub version: String,
    /// Load-balancing weight; 0 takes no traffic.
    pub weight: u32,
    /// Metadata.
    pub metadata: BTreeMap<String, String>,
    /// Heartbeat lease (`None`: not health-checked).
    pub ttl: Option<Duration>,
    /// Ephemeral (removed when its lease is long dead) or persistent.
    pub ephemeral: bool,
    /// Isolated instances should take no traffic.
    pub isolated: bool,
    /// The health engine's verdict.
    pub healthy: bool,
    /// Where it runs.
    pub location: Location,
    /// Event-log sequence of the last change to this instance.
    pub revision: u64,
    /// When it was first registered.
    pub created_at: Option<SystemTime>,
    /// When it last changed.
    pub updated_at: Option<SystemTime>,
}

impl Instance {
    /// `host:port`.
    ///
    /// ```
    /// # let instance = sdk::Instance::example();
    /// assert_eq!(instance.address(), "10.0.0.1:8080");
    /// ```
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// True when the instance should take traffic: healthy, not isolated, weight above 0.
    ///
    /// ```
    /// # let instance = sdk::Instance::example();
    /// assert!(instance.is_routable());
    /// ```
    pub fn is_routable(&self) -> bool {
        self.healthy && !self.isolated && self.weight > 0
    }

    /// A healthy instance `default/echo` at `10.0.0.1:8080`, for documentation and tests.
    #[doc(hidden)]
    pub fn example() -> Instance {
        Instance {
            id: event_log::instance_id("default", "echo", "10.0.0.1", 8080),
            namespace: "default".into(),
            service: "echo".into(),
            host: "10.0.0.1".into(),
            port: 8080,
            protocol: String::new(),
            version: String::new(),
            weight: 100,
            metadata: BTreeMap::new(),
            ttl: Some(DEFAULT_TTL),
            ephemeral: true,
            isolated: false,
            healthy: true,
            location: Location::default(),
            revision: 1,
            created_at: None,
            updated_at: None,
        }
    }

    /// Converts a wire instance, refusing one that breaks the protocol's guarantees.
    pub(crate) fn from_proto(instance: proto::Instance) -> Result<Instance, String> {
        if !event_log::id::is_instance_id(&instance.id) {
            return Err(format!(
                "instance id {:?} is not 40 hex digits",
                instance.id
            ));
        }
        let port = u16::try_from(instance.port)
            .ok()
            .filter(|port| *port > 0)
            .ok_or_else(|| format!("instance {} has port {}", instance.id, instance.port))?;
        Ok(Instance {
            port,
            namespace: instance.namespace,
            service: instance.service,
            host: instance.host,
            protocol: instance.protocol,
            version: instance.version,
            weight: instance.weight,
            metadata: instance.metadata.into_iter().collect(),
            ttl: instance
                .health_check
                .map(|hc| Duration::from_millis(hc.ttl_ms)),
            ephemeral: instance.ephemeral,
            isolated: instance.isolate,
            healthy: instance.healthy,
            location: Location::from_proto(instance.location),
            revision: instance.revision,
            created_at: instance.created_at.and_then(system_time),
            updated_at: instance.updated_at.and_then(system_time),
            id: instance.id,
        })
    }
}

fn system_time(timestamp: prost_types::Timestamp) -> Option<SystemTime> {
    SystemTime::try_from(timestamp).ok()
}

/// A successful registration as the server answered it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    /// The instance id.
    pub instance_id: String,
    /// Event-log sequence of the registration.
    pub revision: u64,
    /// When the server wants the first heartbeat (`None` without health checking).
    pub heartbeat_interval: Option<Duration>,
}

/// A status change for [`Client::update_instance`](crate::Client::update_instance): each field
/// that is `Some` changes.
///
/// ```
/// let change = sdk::InstanceUpdate::default().isolate(true).weight(0);
/// assert_eq!(change.isolate, Some(true));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstanceUpdate {
    /// Isolate or un-isolate.
    pub isolate: Option<bool>,
    /// New weight.
    pub weight: Option<u32>,
    /// New metadata, replacing the old entirely.
    pub metadata: Option<BTreeMap<String, String>>,
    /// Apply only if the instance is still at this revision (else a `Conflict` error).
    pub expected_revision: Option<u64>,
}

impl InstanceUpdate {
    /// Sets isolation.
    pub fn isolate(mut self, isolate: bool) -> InstanceUpdate {
        self.isolate = Some(isolate);
        self
    }

    /// Sets the weight.
    pub fn weight(mut self, weight: u32) -> InstanceUpdate {
        self.weight = Some(weight);
        self
    }

    /// Replaces the metadata.
    pub fn metadata(mut self, metadata: BTreeMap<String, String>) -> InstanceUpdate {
        self.metadata = Some(metadata);
        self
    }

    /// Applies only at this revision.
    pub fn expected_revision(mut self, revision: u64) -> InstanceUpdate {
        self.expected_revision = Some(revision);
        self
    }
}

/// One service of a namespace with its instance counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSummary {
    /// Namespace.
    pub namespace: String,
    /// Service name.
    pub name: String,
    /// Live instances.
    pub total: u32,
    /// Healthy instances.
    pub healthy: u32,
    /// Isolated instances.
    pub isolated: u32,
    /// Service revision.
    pub revision: u64,
}

/// One namespace with its counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceSummary {
    /// Namespace.
    pub name: String,
    /// Services in it.
    pub services: u32,
    /// Live instances in it.
    pub instances: u32,
}

pub(crate) fn by_id(id: &str) -> Option<proto::InstanceRef> {
    Some(proto::InstanceRef {
        target: Some(proto::instance_ref::Target::Id(id.to_owned())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_becomes_the_documented_request() {
        let spec = InstanceSpec::new("default", "echo", "10.0.0.1", 8080)
            .ttl(Duration::from_millis(1500))
            .metadata("zone", "a")
            .persistent();
        let request = spec.to_request("r1");
        assert_eq!(request.port, 8080);
        assert_eq!(
            request.health_check,
            Some(proto::HealthCheck { ttl_ms: 1500 })
        );
        assert_eq!(request.ephemeral, Some(false));
        assert_eq!(request.isolate, None);
        assert_eq!(request.location, None);
        assert_eq!(request.metadata.get("zone").map(String::as_str), Some("a"));
        assert_eq!(request.request_id, "r1");
        let no_check = InstanceSpec::new("a", "b", "c", 1).without_health_check();
        assert_eq!(no_check.to_request("r").health_check, None);
    }

    #[test]
    fn malformed_wire_instances_are_refused_not_trusted() {
        let good = proto::Instance {
            id: event_log::instance_id("default", "echo", "10.0.0.1", 8080),
            host: "10.0.0.1".into(),
            port: 8080,
            weight: 100,
            healthy: true,
            ..Default::default()
        };
        let instance = Instance::from_proto(good.clone()).unwrap();
        assert!(instance.is_routable());
        assert_eq!(instance.address(), "10.0.0.1:8080");
        let bad_port = proto::Instance {
            port: 70_000,
            ..good.clone()
        };
        assert!(Instance::from_proto(bad_port).is_err());
        let bad_id = proto::Instance {
            id: "nope".into(),
            ..good
        };
        assert!(Instance::from_proto(bad_id).is_err());
    }
}
