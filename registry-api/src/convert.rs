//! Domain state to wire types. Wire types stay at the edge: only this crate and `sdk` know
//! protobuf.

use event_log::event::UnixMillis;
use event_log::fold::InstanceState;
use sdk::proto;

/// A timestamp from Unix milliseconds.
pub fn timestamp(millis: UnixMillis) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: millis.div_euclid(1000),
        nanos: i32::try_from(millis.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

/// The wire form of an instance.
pub fn instance(state: &InstanceState) -> proto::Instance {
    proto::Instance {
        id: state.id.clone(),
        namespace: state.namespace.clone(),
        service: state.service.clone(),
        host: state.host.clone(),
        port: u32::from(state.port),
        protocol: state.protocol.clone(),
        version: state.version.clone(),
        weight: state.weight,
        metadata: state
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        health_check: state
            .health_check
            .as_ref()
            .map(|hc| proto::HealthCheck { ttl_ms: hc.ttl_ms }),
        ephemeral: state.ephemeral,
        isolate: state.isolate,
        healthy: state.healthy,
        location: (!state.location.is_empty()).then(|| proto::Location {
            region: state.location.region.clone(),
            zone: state.location.zone.clone(),
            campus: state.location.campus.clone(),
        }),
        revision: state.revision,
        created_at: Some(timestamp(state.created_at_ms)),
        updated_at: Some(timestamp(state.updated_at_ms)),
    }
}
