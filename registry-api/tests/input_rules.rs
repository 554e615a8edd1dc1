//! Property tests of the input rules through a real server: random requests never break the
//! server, invalid ones are rejected naming the right field and append nothing, valid ones
//! round-trip through Discover.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::result_large_err)]

mod support;

use std::collections::HashMap;

use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use sdk::proto;
use support::*;
use tonic::Code;

/// A field to break, and how.
#[derive(Debug, Clone)]
enum Breakage {
    None,
    EmptyNamespace,
    LongService(usize),
    BadServiceChar(char),
    BadHost(String),
    Port(u32),
    Ttl(u64),
    Weight(u32),
    TooManyMetadata(usize),
    LongMetadataValue(usize),
}

impl Breakage {
    fn field(&self) -> Option<&'static str> {
        Some(match self {
            Breakage::None => return None,
            Breakage::EmptyNamespace => "namespace",
            Breakage::LongService(_) | Breakage::BadServiceChar(_) => "service",
            Breakage::BadHost(_) => "host",
            Breakage::Port(_) => "port",
            Breakage::Ttl(_) => "health_check.ttl_ms",
            Breakage::Weight(_) => "weight",
            Breakage::TooManyMetadata(_) => "metadata",
            Breakage::LongMetadataValue(_) => "metadata[\"big\"]",
        })
    }
}

fn breakage() -> impl Strategy<Value = Breakage> {
    prop_oneof![
        3 => Just(Breakage::None),
        1 => Just(Breakage::EmptyNamespace),
        1 => (129usize..400).prop_map(Breakage::LongService),
        1 => prop::sample::select(vec!['/', ' ', '*', '>', '#', 'é', '\n']).prop_map(Breakage::BadServiceChar),
        1 => prop::sample::select(vec!["", "a b", "-x", "x..y", "999.1.1.1", "host_with_bad!char"])
            .prop_map(|h| Breakage::BadHost(h.to_owned())),
        1 => prop_oneof![Just(0u32), 65_536u32..u32::MAX].prop_map(Breakage::Port),
        1 => prop_oneof![0u64..1000, 300_001u64..u64::MAX].prop_map(Breakage::Ttl),
        1 => (10_001u32..u32::MAX).prop_map(Breakage::Weight),
        1 => (65usize..100).prop_map(Breakage::TooManyMetadata),
        1 => (513usize..2000).prop_map(Breakage::LongMetadataValue),
    ]
}

fn valid_request() -> impl Strategy<Value = proto::RegisterInstanceRequest> {
    (
        "[a-zA-Z0-9_.:@-]{1,40}",
        "[a-zA-Z0-9_.:@-]{1,40}",
        prop_oneof![
            "[a-z]([a-z0-9-]{0,18}[a-z0-9])?(\\.[a-z]([a-z0-9-]{0,18}[a-z0-9])?){0,3}",
            (0u8..=255, 0u8..=255, 0u8..=255, 1u8..=254)
                .prop_map(|(a, b, c, d)| format!("{a}.{b}.{c}.{d}")),
            Just("::1".to_owned()),
        ],
        1u32..=65_535,
        proptest::option::of(1_000u64..=300_000),
        proptest::option::of(0u32..=10_000),
        prop::collection::hash_map("[a-z]{1,10}", "[ -~]{0,40}", 0..5),
        proptest::option::of(any::<bool>()),
    )
        .prop_map(
            |(namespace, service, host, port, ttl, weight, metadata, ephemeral)| {
                proto::RegisterInstanceRequest {
                    namespace,
                    service,
                    host,
                    port,
                    weight,
                    metadata,
                    health_check: ttl.map(|ttl_ms| proto::HealthCheck { ttl_ms }),
                    ephemeral,
                    ..Default::default()
                }
            },
        )
}

fn apply(
    mut request: proto::RegisterInstanceRequest,
    breakage: &Breakage,
) -> proto::RegisterInstanceRequest {
    match breakage {
        Breakage::None => {}
        Breakage::EmptyNamespace => request.namespace.clear(),
        Breakage::LongService(length) => request.service = "s".repeat(*length),
        Breakage::BadServiceChar(c) => request.service.push(*c),
        Breakage::BadHost(host) => request.host = host.clone(),
        Breakage::Port(port) => request.port = *port,
        Breakage::Ttl(ttl_ms) => {
            request.health_check = Some(proto::HealthCheck { ttl_ms: *ttl_ms })
        }
        Breakage::Weight(weight) => request.weight = Some(*weight),
        Breakage::TooManyMetadata(count) => {
            request.metadata = (0..*count)
                .map(|n| (format!("k{n}"), String::new()))
                .collect::<HashMap<_, _>>();
        }
        Breakage::LongMetadataValue(length) => {
            request.metadata.insert("big".into(), "v".repeat(*length));
        }
    }
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_registrations_obey_the_rules() {
    let api = start().await;
    let handle = tokio::runtime::Handle::current();
    let client = api.client.clone();
    let log = std::sync::Arc::clone(&api.log);
    let outcome = tokio::task::spawn_blocking(move || {
        let mut runner = TestRunner::new(ProptestConfig {
            cases: 64,
            failure_persistence: None,
            ..ProptestConfig::default()
        });
        runner.run(&(valid_request(), breakage()), |(request, breakage)| {
            let request = apply(request, &breakage);
            let mut client = client.clone();
            let log = std::sync::Arc::clone(&log);
            handle.block_on(async move {
                let before = last_sequences(&log).await;
                let result = client.register_instance(request.clone()).await;
                match breakage.field() {
                    Some(field) => {
                        let status = result.expect_err("an invalid request must be refused");
                        prop_assert_eq!(status.code(), Code::InvalidArgument);
                        let fields = bad_fields(&status);
                        prop_assert!(
                            fields.iter().any(|f| f == field),
                            "{:?} does not name {}",
                            fields,
                            field
                        );
                        prop_assert_eq!(last_sequences(&log).await, before, "nothing appended");
                    }
                    None => {
                        let registered = result
                            .map_err(|s| TestCaseError::fail(format!("{s:?}")))?
                            .into_inner();
                        let found = client
                            .get_instance(proto::GetInstanceRequest {
                                instance: by_id(&registered.instance_id),
                            })
                            .await
                            .map_err(|s| TestCaseError::fail(format!("{s:?}")))?
                            .into_inner()
                            .instance
                            .unwrap();
                        prop_assert_eq!(&found.namespace, &request.namespace);
                        prop_assert_eq!(&found.service, &request.service);
                        prop_assert_eq!(&found.host, &request.host);
                        prop_assert_eq!(found.port, request.port);
                        prop_assert_eq!(found.weight, request.weight.unwrap_or(100));
                        prop_assert_eq!(&found.metadata, &request.metadata);
                        prop_assert_eq!(found.ephemeral, request.ephemeral.unwrap_or(true));
                        prop_assert_eq!(
                            found.health_check.map(|h| h.ttl_ms),
                            request.health_check.map(|h| h.ttl_ms)
                        );
                    }
                }
                Ok(())
            })
        })
    })
    .await
    .unwrap();
    outcome.unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Whatever arrives, validation answers without panicking, and an accepted registration
    /// keeps every field.
    #[test]
    fn validation_never_panics(
        namespace in ".{0,140}",
        service in ".{0,140}",
        host in ".{0,70}",
        port in any::<u32>(),
        ttl in proptest::option::of(any::<u64>()),
        weight in proptest::option::of(any::<u32>()),
        metadata in prop::collection::hash_map(
            prop_oneof![".{0,12}", ".{120,140}"],
            prop_oneof![".{0,12}", ".{500,600}"],
            0..70,
        ),
        protocol in ".{0,40}",
        request_id in ".{0,140}",
    ) {
        let request = proto::RegisterInstanceRequest {
            namespace, service, host, port, weight, metadata, protocol, request_id,
            health_check: ttl.map(|ttl_ms| proto::HealthCheck { ttl_ms }),
            ..Default::default()
        };
        match registry_api::validate::registration(&request) {
            Ok(valid) => {
                prop_assert_eq!(&valid.namespace, &request.namespace);
                prop_assert_eq!(u32::from(valid.port), request.port);
                prop_assert_eq!(valid.metadata.len(), request.metadata.len());
            }
            Err(registry_api::Error::Invalid(violations)) => prop_assert!(!violations.is_empty()),
            Err(other) => prop_assert!(false, "unexpected error {other:?}"),
        }
    }
}
