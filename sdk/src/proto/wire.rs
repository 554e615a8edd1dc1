//! Wire-compatible forms of registry.v1 messages for the hot paths.
//!
//! A `repeated Instance instances = 3` field and a `repeated bytes instances = 3` field holding
//! each instance's encoding are the same bytes on the wire: both are length-delimited entries
//! with tag 3. So a server can keep every instance encoded once, when it changes, and answer
//! Discover by copying those bytes; and a client that only counts or forwards instances can
//! skip decoding them. Clients that want the instances decode [`super::DiscoverResponse`]
//! from the same bytes as usual.

use prost::Message as _;
use prost::bytes::Bytes;

/// [`super::DiscoverResponse`] with its instances kept encoded.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EncodedDiscoverResponse {
    /// The caller's revision is current: no instances follow.
    #[prost(bool, tag = "1")]
    pub not_modified: bool,
    /// Revision of the service's instance set.
    #[prost(uint64, tag = "2")]
    pub revision: u64,
    /// Each instance's protobuf encoding (an [`super::Instance`]).
    #[prost(bytes = "bytes", repeated, tag = "3")]
    pub instances: Vec<Bytes>,
}

/// The encoding of `instance`, as [`EncodedDiscoverResponse::instances`] holds it.
pub fn encode_instance(instance: &super::Instance) -> Bytes {
    Bytes::from(instance.encode_to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{DiscoverResponse, HealthCheck, Instance};

    fn instance(id: &str) -> Instance {
        Instance {
            id: id.into(),
            namespace: "prod".into(),
            service: "orders".into(),
            host: "10.0.0.1".into(),
            port: 8080,
            weight: 100,
            metadata: [("zone".to_owned(), "a".to_owned())].into(),
            health_check: Some(HealthCheck { ttl_ms: 5000 }),
            healthy: true,
            revision: 42,
            ..Default::default()
        }
    }

    #[test]
    fn encoded_and_decoded_forms_are_the_same_bytes() {
        let instances = vec![instance("a"), instance("b"), Instance::default()];
        let decoded = DiscoverResponse {
            not_modified: false,
            revision: 7,
            instances: instances.clone(),
        };
        let encoded = EncodedDiscoverResponse {
            not_modified: false,
            revision: 7,
            instances: instances.iter().map(encode_instance).collect(),
        };
        assert_eq!(decoded.encode_to_vec(), encoded.encode_to_vec());
        let back = DiscoverResponse::decode(&encoded.encode_to_vec()[..]).unwrap();
        assert_eq!(back, decoded);
        let raw = EncodedDiscoverResponse::decode(&decoded.encode_to_vec()[..]).unwrap();
        assert_eq!(raw, encoded);
    }
}
