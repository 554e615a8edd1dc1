//! Input rules: wire requests in, validated domain commands out.
//!
//! Every rule is checked and every violation reported at once, each naming its field, so a
//! client fixes its request in one go. The limits are the ones documented in
//! `proto/registry/v1/registry.proto`.

use std::collections::BTreeMap;
use std::net::IpAddr;

use event_log::event::{HealthCheck, Location};
use sdk::proto;

use crate::error::{Error, Result, Violation};

/// Longest namespace or service name, in bytes.
pub const MAX_NAME_BYTES: usize = 128;
/// Shortest heartbeat TTL.
pub const MIN_TTL_MS: u64 = 1_000;
/// Longest heartbeat TTL.
pub const MAX_TTL_MS: u64 = 300_000;
/// Highest weight.
pub const MAX_WEIGHT: u32 = 10_000;
/// Most metadata entries per instance.
pub const MAX_METADATA_ENTRIES: usize = 64;
/// Longest metadata key, in bytes.
pub const MAX_METADATA_KEY_BYTES: usize = 128;
/// Longest metadata value, in bytes.
pub const MAX_METADATA_VALUE_BYTES: usize = 512;
/// Longest protocol string.
pub const MAX_PROTOCOL_BYTES: usize = 32;
/// Longest version string.
pub const MAX_VERSION_BYTES: usize = 64;
/// Longest location field and request id.
pub const MAX_SHORT_TEXT_BYTES: usize = 128;
/// Most instances in one heartbeat batch.
pub const MAX_BATCH: usize = 1_000;

/// A validated registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
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
    /// Weight, if set (unset keeps the current weight).
    pub weight: Option<u32>,
    /// Metadata.
    pub metadata: BTreeMap<String, String>,
    /// Lease, if health checking is on.
    pub health_check: Option<HealthCheck>,
    /// Ephemeral or persistent.
    pub ephemeral: bool,
    /// Isolation to set, if any.
    pub isolate: Option<bool>,
    /// Location.
    pub location: Location,
    /// Client request id, if any.
    pub request_id: Option<String>,
}

/// A validated reference to an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// By id (40 lowercase hex digits).
    Id(String),
    /// By address.
    Address {
        /// Namespace.
        namespace: String,
        /// Service.
        service: String,
        /// Host.
        host: String,
        /// Port.
        port: u16,
    },
}

impl Target {
    /// The instance id this reference names.
    pub fn instance_id(&self) -> String {
        match self {
            Target::Id(id) => id.clone(),
            Target::Address {
                namespace,
                service,
                host,
                port,
            } => event_log::instance_id(namespace, service, host, *port),
        }
    }
}

/// A validated status change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    /// Which instance.
    pub target: Target,
    /// New isolation.
    pub isolate: Option<bool>,
    /// New weight.
    pub weight: Option<u32>,
    /// New metadata.
    pub metadata: Option<BTreeMap<String, String>>,
    /// Expected revision for optimistic concurrency.
    pub expected_revision: Option<u64>,
    /// Client request id.
    pub request_id: Option<String>,
}

#[derive(Default)]
struct Checker {
    violations: Vec<Violation>,
}

impl Checker {
    fn fail(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.violations.push(Violation::new(field, description));
    }

    fn finish<T>(self, value: T) -> Result<T> {
        if self.violations.is_empty() {
            Ok(value)
        } else {
            Err(Error::Invalid(self.violations))
        }
    }

    fn name(&mut self, field: &str, value: &str) {
        if value.is_empty() {
            self.fail(field, "must not be empty");
        } else if value.len() > MAX_NAME_BYTES {
            self.fail(field, format!("must be at most {MAX_NAME_BYTES} bytes"));
        } else if let Some(bad) = value.chars().find(|c| !is_name_char(*c)) {
            self.fail(
                field,
                format!("character {bad:?} not allowed: use letters, digits and -_.:@"),
            );
        }
    }

    fn host(&mut self, field: &str, value: &str) {
        if value.is_empty() {
            self.fail(field, "must not be empty");
        } else if !is_host(value) {
            self.fail(field, "must be an IP address or a DNS name");
        }
    }

    fn port(&mut self, field: &str, value: u32) -> u16 {
        match u16::try_from(value) {
            Ok(port) if port > 0 => port,
            _ => {
                self.fail(field, "must be between 1 and 65535");
                0
            }
        }
    }

    fn short_text(&mut self, field: &str, value: &str, max: usize) {
        if value.len() > max {
            self.fail(field, format!("must be at most {max} bytes"));
        } else if value.chars().any(char::is_control) {
            self.fail(field, "must not contain control characters");
        }
    }

    fn weight(&mut self, field: &str, value: u32) {
        if value > MAX_WEIGHT {
            self.fail(field, format!("must be between 0 and {MAX_WEIGHT}"));
        }
    }

    fn metadata(&mut self, field: &str, metadata: &std::collections::HashMap<String, String>) {
        if metadata.len() > MAX_METADATA_ENTRIES {
            self.fail(field, format!("at most {MAX_METADATA_ENTRIES} entries"));
            return;
        }
        let mut keys: Vec<&String> = metadata.keys().collect();
        keys.sort();
        for key in keys {
            let entry = format!("{field}[{key:?}]");
            if key.is_empty() {
                self.fail(&entry, "keys must not be empty");
            } else if key.len() > MAX_METADATA_KEY_BYTES {
                self.fail(
                    &entry,
                    format!("keys must be at most {MAX_METADATA_KEY_BYTES} bytes"),
                );
            } else if key.chars().any(char::is_control) {
                self.fail(&entry, "keys must not contain control characters");
            }
            let value = &metadata[key];
            if value.len() > MAX_METADATA_VALUE_BYTES {
                self.fail(
                    &entry,
                    format!("values must be at most {MAX_METADATA_VALUE_BYTES} bytes"),
                );
            } else if value.chars().any(char::is_control) {
                self.fail(&entry, "values must not contain control characters");
            }
        }
    }

    fn request_id(&mut self, field: &str, value: &str) -> Option<String> {
        self.short_text(field, value, MAX_SHORT_TEXT_BYTES);
        (!value.is_empty()).then(|| value.to_owned())
    }

    fn target(&mut self, field: &str, reference: Option<&proto::InstanceRef>) -> Target {
        use proto::instance_ref::Target as Wire;
        match reference.and_then(|r| r.target.as_ref()) {
            None => {
                self.fail(field, "required: an instance id or address");
                Target::Id(String::new())
            }
            Some(Wire::Id(id)) => {
                if !event_log::id::is_instance_id(id) {
                    self.fail(format!("{field}.id"), "must be 40 lowercase hex digits");
                }
                Target::Id(id.clone())
            }
            Some(Wire::Address(address)) => {
                self.name(&format!("{field}.address.namespace"), &address.namespace);
                self.name(&format!("{field}.address.service"), &address.service);
                self.host(&format!("{field}.address.host"), &address.host);
                let port = self.port(&format!("{field}.address.port"), address.port);
                Target::Address {
                    namespace: address.namespace.clone(),
                    service: address.service.clone(),
                    host: address.host.clone(),
                    port,
                }
            }
        }
    }
}

/// Letters, digits and `-_.:@`.
pub fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '@')
}

/// An IP address, or a DNS name of labels made of letters, digits, `-` and `_` (1..=63 bytes
/// each, not starting or ending with `-`; at most 253 bytes in all).
pub fn is_host(value: &str) -> bool {
    if value.parse::<IpAddr>().is_ok() {
        return true;
    }
    let name = value.strip_suffix('.').unwrap_or(value);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        // A name made only of digits and dots would be a malformed IPv4 address.
        && !name.bytes().all(|b| b.is_ascii_digit() || b == b'.')
}

/// Validates a registration.
pub fn registration(request: &proto::RegisterInstanceRequest) -> Result<Registration> {
    let mut check = Checker::default();
    check.name("namespace", &request.namespace);
    check.name("service", &request.service);
    check.host("host", &request.host);
    let port = check.port("port", request.port);
    check.short_text("protocol", &request.protocol, MAX_PROTOCOL_BYTES);
    check.short_text("version", &request.version, MAX_VERSION_BYTES);
    if let Some(weight) = request.weight {
        check.weight("weight", weight);
    }
    check.metadata("metadata", &request.metadata);
    let health_check = request.health_check.as_ref().map(|hc| {
        if !(MIN_TTL_MS..=MAX_TTL_MS).contains(&hc.ttl_ms) {
            check.fail(
                "health_check.ttl_ms",
                format!("must be between {MIN_TTL_MS} and {MAX_TTL_MS} (1 s to 5 min)"),
            );
        }
        HealthCheck { ttl_ms: hc.ttl_ms }
    });
    let location = request.location.clone().unwrap_or_default();
    check.short_text("location.region", &location.region, MAX_SHORT_TEXT_BYTES);
    check.short_text("location.zone", &location.zone, MAX_SHORT_TEXT_BYTES);
    check.short_text("location.campus", &location.campus, MAX_SHORT_TEXT_BYTES);
    let request_id = check.request_id("request_id", &request.request_id);
    check.finish(Registration {
        namespace: request.namespace.clone(),
        service: request.service.clone(),
        host: request.host.clone(),
        port,
        protocol: request.protocol.clone(),
        version: request.version.clone(),
        weight: request.weight,
        metadata: request
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        health_check,
        ephemeral: request.ephemeral.unwrap_or(true),
        isolate: request.isolate,
        location: Location {
            region: location.region,
            zone: location.zone,
            campus: location.campus,
        },
        request_id,
    })
}

/// Validates an instance reference (`field` names it in errors).
pub fn target(field: &str, reference: Option<&proto::InstanceRef>) -> Result<Target> {
    let mut check = Checker::default();
    let target = check.target(field, reference);
    check.finish(target)
}

/// Validates a deregistration: the target and the request id.
pub fn deregistration(
    request: &proto::DeregisterInstanceRequest,
) -> Result<(Target, Option<String>)> {
    let mut check = Checker::default();
    let target = check.target("instance", request.instance.as_ref());
    let request_id = check.request_id("request_id", &request.request_id);
    check.finish((target, request_id))
}

/// Validates a status change.
pub fn update(request: &proto::UpdateInstanceRequest) -> Result<Update> {
    let mut check = Checker::default();
    let target = check.target("instance", request.instance.as_ref());
    if let Some(weight) = request.weight {
        check.weight("weight", weight);
    }
    if let Some(metadata) = &request.metadata {
        check.metadata("metadata.entries", &metadata.entries);
    }
    if request.isolate.is_none() && request.weight.is_none() && request.metadata.is_none() {
        check.fail(
            "isolate",
            "nothing to change: set isolate, weight or metadata",
        );
    }
    let request_id = check.request_id("request_id", &request.request_id);
    check.finish(Update {
        target,
        isolate: request.isolate,
        weight: request.weight,
        metadata: request.metadata.as_ref().map(|m| {
            m.entries
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        }),
        expected_revision: request.expected_revision,
        request_id,
    })
}

/// Validates a heartbeat batch's size; each reference is checked on its own by the caller so
/// one bad entry does not fail the others.
pub fn batch_size(count: usize) -> Result<()> {
    if count > MAX_BATCH {
        return Err(Error::invalid(
            "instances",
            format!("at most {MAX_BATCH} instances per batch, got {count}"),
        ));
    }
    Ok(())
}

/// Validates a namespace/service pair for reads.
pub fn service(namespace: &str, service: &str) -> Result<()> {
    let mut check = Checker::default();
    check.name("namespace", namespace);
    check.name("service", service);
    check.finish(())
}

/// Validates a namespace for reads.
pub fn namespace(namespace: &str) -> Result<()> {
    let mut check = Checker::default();
    check.name("namespace", namespace);
    check.finish(())
}

/// Validates a metadata selector.
pub fn selector(metadata: &std::collections::HashMap<String, String>) -> Result<()> {
    let mut check = Checker::default();
    check.metadata("metadata_selector", metadata);
    check.finish(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> proto::RegisterInstanceRequest {
        proto::RegisterInstanceRequest {
            namespace: "default".into(),
            service: "DEFAULT_GROUP@@com.example.Echo".into(),
            host: "10.0.0.1".into(),
            port: 8080,
            health_check: Some(proto::HealthCheck { ttl_ms: 1000 }),
            ..Default::default()
        }
    }

    fn fields(result: Result<Registration>) -> Vec<String> {
        match result {
            Err(Error::Invalid(violations)) => violations.into_iter().map(|v| v.field).collect(),
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn a_valid_registration_gets_defaults() {
        let registration = registration(&valid()).unwrap();
        assert_eq!(registration.weight, None);
        assert!(registration.ephemeral);
        assert_eq!(registration.isolate, None);
        assert_eq!(registration.request_id, None);
    }

    #[test]
    fn each_rule_names_its_field() {
        let mut request = valid();
        request.namespace.clear();
        request.service = "a/b".into();
        request.host = "-bad-.example".into();
        request.port = 70_000;
        request.health_check = Some(proto::HealthCheck { ttl_ms: 0 });
        request.weight = Some(MAX_WEIGHT + 1);
        request.metadata.insert(String::new(), "x".into());
        assert_eq!(
            fields(registration(&request)),
            [
                "namespace",
                "service",
                "host",
                "port",
                "weight",
                "metadata[\"\"]",
                "health_check.ttl_ms"
            ]
        );
    }

    #[test]
    fn port_zero_is_refused() {
        let mut request = valid();
        request.port = 0;
        assert_eq!(fields(registration(&request)), ["port"]);
    }

    #[test]
    fn hosts() {
        for good in [
            "10.0.0.1",
            "::1",
            "fe80::1",
            "svc.example.com",
            "my_host",
            "a-b.c",
            "localhost.",
        ] {
            assert!(is_host(good), "{good}");
        }
        for bad in [
            "",
            "a..b",
            "-a",
            "a-",
            "256.1.1.1",
            "1.2.3",
            "a b",
            "x".repeat(64).as_str(),
        ] {
            assert!(!is_host(bad), "{bad}");
        }
    }

    #[test]
    fn updates_need_a_change() {
        let request = proto::UpdateInstanceRequest {
            instance: Some(proto::InstanceRef {
                target: Some(proto::instance_ref::Target::Id("ab".into())),
            }),
            ..Default::default()
        };
        match update(&request) {
            Err(Error::Invalid(violations)) => {
                let fields: Vec<_> = violations.iter().map(|v| v.field.as_str()).collect();
                assert_eq!(fields, ["instance.id", "isolate"]);
            }
            other => panic!("{other:?}"),
        }
    }
}
