//! The naming API against real NATS JetStream: every RPC, read your writes, idempotent
//! retries, optimistic concurrency, "not modified", watches, and strict input rules.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use event_log::event::Event;
use event_log::{EventLog, StreamKind};
use futures::StreamExt;
use sdk::proto;
use support::*;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_then_heartbeat_and_discover_read_your_writes() {
    let mut api = start().await;
    for port in 1..=20 {
        let registered = api
            .client
            .register_instance(registration("echo", port))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            registered.instance_id,
            event_log::instance_id("default", "echo", "10.0.0.1", port as u16)
        );
        assert_eq!(registered.heartbeat_interval_ms, 1000);
        // Straight after the write, on the same server: the instance is there.
        let beat = api
            .client
            .heartbeat(proto::HeartbeatRequest {
                instance: by_id(&registered.instance_id),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(beat.heartbeat_interval_ms, 1000);
        let found = api
            .client
            .discover(proto::DiscoverRequest {
                namespace: "default".into(),
                service: "echo".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(found.instances.len(), port as usize);
        assert!(found.revision >= registered.revision);
    }
    // The beat is in the heartbeat stream once the call has returned.
    let (events, heartbeats) = last_sequences(&api.log).await;
    assert_eq!(events, 20);
    assert!(heartbeats >= 1);
    let mut records = api
        .log
        .replay(StreamKind::Heartbeats, 0, None)
        .await
        .unwrap();
    let mut beats = 0;
    while beats < 20 {
        let record = tokio::time::timeout(WAIT, records.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let Event::HeartbeatsReceived(batch) = record.decode().unwrap().event else {
            panic!("only heartbeat batches on the heartbeat stream")
        };
        beats += batch.beats.len();
    }
    assert_eq!(beats, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_names_the_field_and_appends_nothing() {
    let mut api = start().await;
    let cases: Vec<(proto::RegisterInstanceRequest, &str)> = vec![
        (
            proto::RegisterInstanceRequest {
                namespace: String::new(),
                ..registration("echo", 80)
            },
            "namespace",
        ),
        (
            proto::RegisterInstanceRequest {
                service: String::new(),
                ..registration("echo", 80)
            },
            "service",
        ),
        (registration("echo", 0), "port"),
        (registration("echo", 65_536), "port"),
        (registration("echo", 70_000), "port"),
        (
            proto::RegisterInstanceRequest {
                health_check: Some(proto::HealthCheck { ttl_ms: 0 }),
                ..registration("echo", 80)
            },
            "health_check.ttl_ms",
        ),
        (
            proto::RegisterInstanceRequest {
                host: "bad host".into(),
                ..registration("echo", 80)
            },
            "host",
        ),
        (
            proto::RegisterInstanceRequest {
                weight: Some(10_001),
                ..registration("echo", 80)
            },
            "weight",
        ),
    ];
    for (request, field) in cases {
        let status = api.client.register_instance(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert_eq!(bad_fields(&status), [field], "{status:?}");
        assert!(status.message().contains(field), "{}", status.message());
    }
    for reference in [
        by_id(""),
        by_id("not-an-id"),
        by_address("", 80),
        by_address("echo", 0),
        by_address("echo", 70_000),
        None,
    ] {
        let status = api
            .client
            .heartbeat(proto::HeartbeatRequest {
                instance: reference,
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(bad_fields(&status)[0].starts_with("instance"), "{status:?}");
    }
    assert_eq!(last_sequences(&api.log).await, (0, 0), "nothing appended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_instances_are_not_found_and_deregistration_removes() {
    let mut api = start().await;
    let status = api
        .client
        .heartbeat(proto::HeartbeatRequest {
            instance: by_address("echo", 80),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    api.client
        .register_instance(registration("echo", 80))
        .await
        .unwrap();
    let removed = api
        .client
        .deregister_instance(proto::DeregisterInstanceRequest {
            instance: by_address("echo", 80),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(removed.revision, 2);
    let status = api
        .client
        .heartbeat(proto::HeartbeatRequest {
            instance: by_address("echo", 80),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = api
        .client
        .deregister_instance(proto::DeregisterInstanceRequest {
            instance: by_address("echo", 80),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_with_the_same_request_id_apply_once() {
    let mut api = start().await;
    let request = proto::RegisterInstanceRequest {
        request_id: "r-1".into(),
        ..registration("echo", 80)
    };
    let first = api
        .client
        .register_instance(request.clone())
        .await
        .unwrap()
        .into_inner();
    let again = api
        .client
        .register_instance(request)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.revision, again.revision);
    let update = proto::UpdateInstanceRequest {
        instance: by_id(&first.instance_id),
        isolate: Some(true),
        request_id: "r-2".into(),
        ..Default::default()
    };
    api.client.update_instance(update.clone()).await.unwrap();
    api.client.update_instance(update).await.unwrap();
    let deregister = proto::DeregisterInstanceRequest {
        instance: by_id(&first.instance_id),
        request_id: "r-3".into(),
    };
    let gone = api
        .client
        .deregister_instance(deregister.clone())
        .await
        .unwrap()
        .into_inner();
    let gone_again = api
        .client
        .deregister_instance(deregister)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(gone.revision, gone_again.revision);
    assert_eq!(
        last_sequences(&api.log).await.0,
        3,
        "each request applied once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_updates_conflict_instead_of_overwriting() {
    let mut api = start().await;
    let registered = api
        .client
        .register_instance(registration("echo", 80))
        .await
        .unwrap()
        .into_inner();
    let update = |weight, expected| proto::UpdateInstanceRequest {
        instance: by_id(&registered.instance_id),
        weight: Some(weight),
        expected_revision: Some(expected),
        ..Default::default()
    };
    // Two writers read revision 1; the first wins, the second is told to retry.
    let winner = api
        .client
        .update_instance(update(5, registered.revision))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(winner.instance.as_ref().unwrap().weight, 5);
    let loser = api
        .client
        .update_instance(update(7, registered.revision))
        .await
        .unwrap_err();
    assert_eq!(loser.code(), Code::Aborted, "{loser:?}");
    let current = winner.instance.unwrap().revision;
    let retried = api
        .client
        .update_instance(update(7, current))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retried.instance.unwrap().weight, 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discover_filters_and_answers_not_modified() {
    let mut api = start().await;
    let mut first = registration("echo", 80);
    first.metadata.insert("zone".into(), "a".into());
    let first = api
        .client
        .register_instance(first)
        .await
        .unwrap()
        .into_inner();
    let second = api
        .client
        .register_instance(registration("echo", 81))
        .await
        .unwrap()
        .into_inner();
    api.client
        .update_instance(proto::UpdateInstanceRequest {
            instance: by_id(&second.instance_id),
            isolate: Some(true),
            ..Default::default()
        })
        .await
        .unwrap();
    let discover = |revision, include_isolated, selector: &[(&str, &str)]| proto::DiscoverRequest {
        namespace: "default".into(),
        service: "echo".into(),
        include_isolated,
        metadata_selector: selector
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        revision,
        ..Default::default()
    };
    let visible = api
        .client
        .discover(discover(0, false, &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        visible.instances.len(),
        1,
        "isolated instances hidden by default"
    );
    assert_eq!(visible.instances[0].id, first.instance_id);
    let all = api
        .client
        .discover(discover(0, true, &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.instances.len(), 2);
    let zone_a = api
        .client
        .discover(discover(0, true, &[("zone", "a")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(zone_a.instances.len(), 1);
    let unchanged = api
        .client
        .discover(discover(all.revision, true, &[]))
        .await
        .unwrap()
        .into_inner();
    assert!(unchanged.not_modified);
    assert!(unchanged.instances.is_empty());
    assert_eq!(unchanged.revision, all.revision);
    let stale = api
        .client
        .discover(discover(all.revision - 1, true, &[]))
        .await
        .unwrap()
        .into_inner();
    assert!(!stale.not_modified);
    assert_eq!(
        stale.instances, all.instances,
        "the same answer, rebuilt or not"
    );
    // A change replaces the answers built before it.
    api.client
        .update_instance(proto::UpdateInstanceRequest {
            instance: by_id(&second.instance_id),
            isolate: Some(false),
            ..Default::default()
        })
        .await
        .unwrap();
    let after = api
        .client
        .discover(discover(0, false, &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.instances.len(), 2, "no longer isolated, so visible");
    assert!(after.revision > all.revision);
    assert!(after.instances.iter().all(|instance| !instance.isolate));
    let unknown = api
        .client
        .discover(proto::DiscoverRequest {
            namespace: "default".into(),
            service: "nobody".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(unknown.instances.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_and_streamed_heartbeats_answer_per_instance() {
    let mut api = start().await;
    let known = api
        .client
        .register_instance(registration("echo", 80))
        .await
        .unwrap()
        .into_inner();
    let batch = proto::BatchHeartbeatRequest {
        instances: vec![
            by_id(&known.instance_id).unwrap(),
            by_address("echo", 81).unwrap(),
            by_id("zz").unwrap(),
        ],
    };
    let results = api
        .client
        .batch_heartbeat(batch.clone())
        .await
        .unwrap()
        .into_inner()
        .results;
    use proto::heartbeat_result::Status;
    let statuses: Vec<_> = results.iter().map(|r| r.status()).collect();
    assert_eq!(statuses, [Status::Ok, Status::NotFound, Status::Invalid]);
    assert_eq!(results[0].heartbeat_interval_ms, 1000);

    let too_big = proto::BatchHeartbeatRequest {
        instances: vec![by_id(&known.instance_id).unwrap(); 1001],
    };
    let status = api.client.batch_heartbeat(too_big).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(bad_fields(&status), ["instances"]);

    let outbound = futures::stream::iter(vec![batch.clone(); 5]);
    let mut responses = api
        .client
        .stream_heartbeats(outbound)
        .await
        .unwrap()
        .into_inner();
    let mut answered = 0;
    while let Some(response) = responses.next().await {
        let response = response.unwrap();
        assert_eq!(response.results.len(), 3);
        assert_eq!(response.results[0].status(), Status::Ok);
        answered += 1;
    }
    assert_eq!(answered, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_namespaces_and_services_with_counts() {
    let mut api = start().await;
    for port in [80, 81, 82] {
        api.client
            .register_instance(registration("echo", port))
            .await
            .unwrap();
    }
    let mut other = registration("billing", 90);
    other.namespace = "prod".into();
    api.client.register_instance(other).await.unwrap();
    api.client
        .update_instance(proto::UpdateInstanceRequest {
            instance: by_address("echo", 82),
            isolate: Some(true),
            ..Default::default()
        })
        .await
        .unwrap();
    let namespaces = api
        .client
        .list_namespaces(proto::ListNamespacesRequest {})
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = namespaces
        .namespaces
        .iter()
        .map(|n| (n.name.as_str(), n.services, n.instances))
        .collect();
    assert_eq!(names, [("default", 1, 3), ("prod", 1, 1)]);
    let services = api
        .client
        .list_services(proto::ListServicesRequest {
            namespace: "default".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .services;
    assert_eq!(services.len(), 1);
    assert_eq!(
        (services[0].total, services[0].healthy, services[0].isolated),
        (3, 3, 1)
    );
    let got = api
        .client
        .get_instance(proto::GetInstanceRequest {
            instance: by_address("echo", 82),
        })
        .await
        .unwrap()
        .into_inner()
        .instance
        .unwrap();
    assert!(got.isolate);
    assert_eq!(got.port, 82);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_sends_a_snapshot_then_changes_and_resumes() {
    let mut api = start().await;
    api.client
        .register_instance(registration("echo", 80))
        .await
        .unwrap();
    let request = |from_revision| proto::WatchRequest {
        namespace: "default".into(),
        service: "echo".into(),
        from_revision,
    };
    let mut watch = api.client.watch(request(0)).await.unwrap().into_inner();
    let first = tokio::time::timeout(WAIT, watch.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let Some(proto::watch_response::Body::Snapshot(snapshot)) = first.body else {
        panic!("{first:?}")
    };
    assert_eq!(snapshot.instances.len(), 1);
    let second = api
        .client
        .register_instance(registration("echo", 81))
        .await
        .unwrap()
        .into_inner();
    let change = tokio::time::timeout(WAIT, watch.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(change.revision, second.revision);
    let Some(proto::watch_response::Body::Change(change_body)) = change.body else {
        panic!()
    };
    assert_eq!(change_body.kind(), proto::instance_change::Kind::Upserted);
    assert_eq!(change_body.instance.unwrap().port, 81);
    drop(watch);

    // While nobody watches, two more changes; resuming from the last seen revision replays
    // exactly those, in order, without a snapshot.
    api.client
        .register_instance(registration("echo", 82))
        .await
        .unwrap();
    let gone = api
        .client
        .deregister_instance(proto::DeregisterInstanceRequest {
            instance: by_address("echo", 80),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut resumed = api
        .client
        .watch(request(change.revision))
        .await
        .unwrap()
        .into_inner();
    let a = tokio::time::timeout(WAIT, resumed.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let b = tokio::time::timeout(WAIT, resumed.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        matches!(a.body, Some(proto::watch_response::Body::Change(ref c)) if c.instance.as_ref().unwrap().port == 82)
    );
    let Some(proto::watch_response::Body::Change(deleted)) = b.body else {
        panic!("{b:?}")
    };
    assert_eq!(deleted.kind(), proto::instance_change::Kind::Deleted);
    assert_eq!(b.revision, gone.revision);
    // A revision from the future gets a snapshot.
    let mut future = api
        .client
        .watch(request(gone.revision + 1000))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(WAIT, future.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        matches!(first.body, Some(proto::watch_response::Body::Snapshot(ref s)) if s.instances.len() == 2)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_watcher_gets_a_fresh_snapshot_and_blocks_nobody() {
    let config = registry_api::Config {
        read_model: registry_api::read_model::Config {
            watcher_buffer: 8,
            ..Default::default()
        },
        ..Default::default()
    };
    let env = xtask::harness::TestEnv::nats_only().await.unwrap();
    let mut api = start_with(env, config).await;
    let request = proto::WatchRequest {
        namespace: "default".into(),
        service: "echo".into(),
        from_revision: 0,
    };
    // This watcher, on its own connection with small HTTP/2 windows, never reads until the end.
    let slow_channel = tonic::transport::Endpoint::from_shared(format!("http://{}", api.address))
        .unwrap()
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .connect()
        .await
        .unwrap();
    let mut slow_client = sdk::proto::registry_client::RegistryClient::new(slow_channel)
        .max_decoding_message_size(16 << 20);
    let mut slow = slow_client
        .watch(request.clone())
        .await
        .unwrap()
        .into_inner();
    let mut fast = api.client.watch(request).await.unwrap().into_inner();
    let first = tokio::time::timeout(WAIT, fast.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(
        first.body,
        Some(proto::watch_response::Body::Snapshot(_))
    ));
    let mut last_revision = 0;
    for port in 1..=300 {
        // Writes keep completing while the slow watcher does not read.
        // Big messages, so the slow watcher's transport buffers fill up quickly.
        let mut request = registration("echo", port);
        for key in 0..16 {
            request.metadata.insert(format!("k{key}"), "v".repeat(400));
        }
        let registered = tokio::time::timeout(WAIT, api.client.register_instance(request))
            .await
            .expect("a slow watcher must not block writes")
            .unwrap()
            .into_inner();
        last_revision = registered.revision;
        let change = tokio::time::timeout(WAIT, fast.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(
            change.revision, registered.revision,
            "the fast watcher sees every change in order"
        );
    }
    // The slow watcher eventually converges on the full state through a fresh snapshot.
    let mut seen_snapshot_after_start = false;
    let mut revision = 0;
    let mut count = 0;
    while revision < last_revision {
        let message = tokio::time::timeout(WAIT, slow.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        revision = message.revision;
        match message.body {
            Some(proto::watch_response::Body::Snapshot(snapshot)) => {
                if revision > 0 {
                    seen_snapshot_after_start = true;
                }
                count = snapshot.instances.len();
            }
            Some(proto::watch_response::Body::Change(_)) => count += 1,
            None => panic!("empty watch message"),
        }
    }
    assert!(
        seen_snapshot_after_start,
        "the lagging watcher was resynchronised by a snapshot"
    );
    assert_eq!(count, 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_service_reports_serving() {
    let api = start().await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", api.address))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: "registry.v1.Registry".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status();
        if status == tonic_health::pb::health_check_response::ServingStatus::Serving {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never became SERVING"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weight_and_isolation_survive_re_registration() {
    let mut api = start().await;
    let registered = api
        .client
        .register_instance(registration("echo", 80))
        .await
        .unwrap()
        .into_inner();
    api.client
        .update_instance(proto::UpdateInstanceRequest {
            instance: by_id(&registered.instance_id),
            weight: Some(7),
            isolate: Some(true),
            ..Default::default()
        })
        .await
        .unwrap();
    // The instance restarts and registers again without saying weight or isolation.
    api.client
        .register_instance(registration("echo", 80))
        .await
        .unwrap();
    let instance = api
        .client
        .get_instance(proto::GetInstanceRequest {
            instance: by_id(&registered.instance_id),
        })
        .await
        .unwrap()
        .into_inner()
        .instance
        .unwrap();
    assert_eq!((instance.weight, instance.isolate), (7, true));
    // Saying them changes them.
    let mut explicit = registration("echo", 80);
    explicit.weight = Some(50);
    explicit.isolate = Some(false);
    api.client.register_instance(explicit).await.unwrap();
    let instance = api
        .client
        .get_instance(proto::GetInstanceRequest {
            instance: by_id(&registered.instance_id),
        })
        .await
        .unwrap()
        .into_inner()
        .instance
        .unwrap();
    assert_eq!((instance.weight, instance.isolate), (50, false));
}
