//! Outages against real `registryd` processes: the API server is killed and started again
//! while a provider heartbeats and a consumer discovers.

mod support;

use std::time::Duration;

use event_log::EventType;
use futures::StreamExt;
use sdk::{
    Consumer, ConsumerConfig, EventStream, Events, InstanceSpec, Instances, LeaseStatus, Provider,
    ProviderConfig, Scope, StartAt,
};
use support::{Registryd, WAIT, client};
use xtask::harness::TestEnv;

/// Reads `stream` until an event of `wanted` type for `instance_id` arrives; returns its
/// sequence.
async fn next_event(stream: &mut EventStream, wanted: EventType, instance_id: &str) -> u64 {
    let found = tokio::time::timeout(WAIT, async {
        while let Some(event) = stream.next().await {
            let event = event.expect("events decode");
            if event.envelope.event_type() == wanted && event.envelope.instance_id == instance_id {
                return event.sequence;
            }
        }
        panic!("event stream ended");
    })
    .await;
    found.unwrap_or_else(|_| panic!("no {wanted} for {instance_id} within {WAIT:?}"))
}

/// Waits until the subscription's view satisfies `check`.
async fn view_until(
    subscription: &mut sdk::Subscription,
    what: &str,
    mut check: impl FnMut(&Instances) -> bool,
) -> Instances {
    let current = subscription.current();
    if check(&current) {
        return current;
    }
    tokio::time::timeout(WAIT, async {
        loop {
            let next = subscription.changed().await.expect("subscription open");
            if check(&next) {
                return next;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for the consumer to see {what}"))
}

/// The API process dies while the health engine (a separate process) keeps running: the
/// instance turns unhealthy during the outage, the consumer keeps answering from its cache and
/// says it is stale, and once the API is back on the same port the provider's heartbeats make
/// the instance healthy again, with the same id and no duplicate, and the consumer catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_restart_provider_recovers_and_consumer_serves_from_cache() {
    let env = TestEnv::nats_only().await.expect("NATS");
    let _engine = Registryd::start(
        &env,
        "engine",
        &[
            "--unhealthy-ratio",
            "2",
            "--delete-timeout",
            "120s",
            "--no-self-preservation",
        ],
    )
    .await;
    let mut api = Registryd::start(&env, "api", &[]).await;
    let client = client(&[api.endpoint()]);

    let events = Events::connect(&env.nats_url, &env.prefix)
        .await
        .expect("events");
    let mut history = events
        .follow(Scope::service("default", "echo"), StartAt::Beginning)
        .await
        .expect("follow");

    let provider = Provider::new(client.clone());
    let spec = InstanceSpec::new("default", "echo", "10.0.0.1", 8080)
        .ttl(Duration::from_secs(1))
        .metadata("zone", "a");
    let id = spec.id();
    let mut handle = provider.register(spec).await.expect("register");
    assert_eq!(handle.id(), id);
    assert_eq!(
        handle.registered().heartbeat_interval,
        Some(Duration::from_secs(1))
    );
    next_event(&mut history, EventType::InstanceRegistered, &id).await;

    let consumer = Consumer::with_config(client.clone(), ConsumerConfig { initial_wait: WAIT });
    let mut subscription = consumer
        .subscribe("default", "echo")
        .await
        .expect("subscribe");
    let before = view_until(&mut subscription, "the instance", |v| {
        v.routable().len() == 1
    })
    .await;
    assert!(!before.is_stale());

    // Heartbeats flow: the status turns Active with an acknowledged beat.
    let status = tokio::time::timeout(
        WAIT,
        handle.wait_for(|s| {
            matches!(
                s,
                LeaseStatus::Active {
                    last_heartbeat: Some(_),
                    ..
                }
            )
        }),
    )
    .await;
    assert!(
        status.is_ok(),
        "no acknowledged heartbeat: {:?}",
        handle.status()
    );

    // --- outage ---
    api.kill().await;
    let status = tokio::time::timeout(
        WAIT,
        handle.wait_for(|s| matches!(s, LeaseStatus::Unreachable { .. })),
    )
    .await;
    assert!(
        status.is_ok(),
        "provider did not notice: {:?}",
        handle.status()
    );
    let stale = view_until(
        &mut subscription,
        "the cache turn stale",
        Instances::is_stale,
    )
    .await;
    assert_eq!(
        stale.len(),
        1,
        "the cache still serves the last known instance"
    );

    // The engine, still running, marks the silent instance unhealthy.
    let unhealthy_at = next_event(&mut history, EventType::InstanceTurnedUnhealthy, &id).await;
    // Discovery answers from the cache, at once, and says how stale it is.
    let started = std::time::Instant::now();
    let during = consumer
        .discover("default", "echo")
        .await
        .expect("cached answer");
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "served from cache"
    );
    assert_eq!(during.len(), 1);
    assert_eq!(during.iter().next().unwrap().id, id);
    assert!(
        during
            .staleness()
            .is_some_and(|stale| stale > Duration::ZERO)
    );

    // --- recovery on the same port ---
    api.resume().await;
    let status = tokio::time::timeout(
        WAIT,
        handle.wait_for(|s| {
            matches!(
                s,
                LeaseStatus::Active {
                    last_heartbeat: Some(_),
                    ..
                }
            )
        }),
    )
    .await;
    assert!(
        status.is_ok(),
        "provider did not recover: {:?}\n{}",
        handle.status(),
        api.log()
    );
    let healthy_at = next_event(&mut history, EventType::InstanceTurnedHealthy, &id).await;
    assert!(healthy_at > unhealthy_at);

    // The consumer resumed and caught up with both transitions.
    let after = view_until(&mut subscription, "the instance healthy again", |v| {
        !v.is_stale() && v.revision() >= healthy_at && v.healthy().len() == 1
    })
    .await;
    assert_eq!(after.len(), 1, "no duplicate");
    assert_eq!(after.iter().next().unwrap().id, id, "same id");

    // The provider kept its registration: the server never lost the instance.
    let stats = provider.stats();
    assert_eq!(stats.registrations, 1, "{stats:?}");
    assert_eq!(stats.not_found, 0, "{stats:?}");
    assert!(stats.streams_opened >= 2, "{stats:?}");
    let services = client.list_services("default").await.expect("list");
    assert_eq!(services.len(), 1);
    assert_eq!((services[0].total, services[0].healthy), (1, 1));

    // Graceful shutdown deregisters, and the consumer sees the instance go.
    let report = provider.shutdown().await;
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.deregistered, std::slice::from_ref(&id));
    next_event(&mut history, EventType::InstanceDeregistered, &id).await;
    view_until(&mut subscription, "the instance gone", Instances::is_empty).await;
    assert_eq!(handle.status(), LeaseStatus::Deregistered);
}

/// An embedded (in-memory) server loses everything when it restarts: the provider's next
/// heartbeat gets NOT_FOUND and it registers the instance again, same id, once; the consumer,
/// whose revision is now ahead of the new log, takes the fresh snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_instances_are_registered_again_after_not_found() {
    let env = TestEnv::nats_only().await.expect("NATS");
    let mut api = Registryd::start(&env, "api", &["--embedded"]).await;
    let client = client(&[api.endpoint()]);
    let provider = Provider::with_config(
        client.clone(),
        ProviderConfig {
            jitter: 0.0,
            ..ProviderConfig::default()
        },
    );
    // Several events first, so that the consumer's revision is ahead of the restarted log.
    let mut others = Vec::new();
    for port in 9001..9004 {
        let handle = provider
            .register(
                InstanceSpec::new("default", "other", "10.0.0.2", port).ttl(Duration::from_secs(1)),
            )
            .await
            .expect("register other");
        others.push(handle);
    }
    let spec = InstanceSpec::new("default", "echo", "10.0.0.1", 8080).ttl(Duration::from_secs(1));
    let id = spec.id();
    let mut handle = provider.register(spec).await.expect("register");
    let consumer = Consumer::new(client.clone());
    let mut subscription = consumer
        .subscribe("default", "echo")
        .await
        .expect("subscribe");
    // A few status changes, so that the service's revision in the lost log is above anything
    // the four re-registrations can reach in the new one.
    for weight in [10, 20, 30] {
        client
            .update_instance(&id, sdk::InstanceUpdate::default().weight(weight))
            .await
            .expect("update");
    }
    let before = view_until(&mut subscription, "the updates", |v| {
        v.iter().any(|i| i.weight == 30)
    })
    .await;
    let old_revision = before.revision();
    assert!(old_revision > 4, "{old_revision}");

    api.kill().await;
    api.resume().await;
    let restarted = tokio::time::Instant::now();

    // Every instance is answered NOT_FOUND and registered again (the counters show it), then
    // its beats are acknowledged again.
    support::eventually(
        "four re-registrations",
        Duration::from_millis(20),
        || async { provider.stats().registrations >= 8 },
    )
    .await;
    let status = tokio::time::timeout(
        WAIT,
        handle.wait_for(|s| {
            matches!(s, LeaseStatus::Active { last_heartbeat: Some(at), .. } if *at > restarted)
        }),
    )
    .await;
    assert!(status.is_ok(), "{:?}", handle.status());
    let stats = provider.stats();
    assert!(stats.not_found >= 4, "{stats:?}");
    assert_eq!(
        stats.registrations, 8,
        "each of the four registered once more: {stats:?}"
    );

    let instance = client.get_instance(&id).await.expect("known again");
    assert!(instance.healthy);
    let after = view_until(&mut subscription, "the instance in the new log", |v| {
        !v.is_stale() && v.len() == 1 && v.revision() < old_revision
    })
    .await;
    assert_eq!(after.iter().next().unwrap().id, id);
    let services = client.list_services("default").await.expect("list");
    let echo = services
        .iter()
        .find(|s| s.name == "echo")
        .expect("echo listed");
    assert_eq!(echo.total, 1, "no duplicate");
    drop(others);
    assert!(provider.shutdown().await.is_clean());
}

/// Two API servers over one event log: when the first dies, the provider's heartbeat stream
/// and the consumer's watch move to the second without losing anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_to_the_next_server() {
    let env = TestEnv::nats_only().await.expect("NATS");
    let mut first = Registryd::start(&env, "api", &[]).await;
    let second = Registryd::start(&env, "api", &[]).await;
    let client = client(&[first.endpoint(), second.endpoint()]);
    let provider = Provider::new(client.clone());
    let spec = InstanceSpec::new("default", "echo", "10.0.0.1", 8080).ttl(Duration::from_secs(1));
    let mut handle = provider.register(spec).await.expect("register");
    let consumer = Consumer::new(client.clone());
    let mut subscription = consumer
        .subscribe("default", "echo")
        .await
        .expect("subscribe");
    view_until(&mut subscription, "the instance", |v| v.len() == 1).await;
    tokio::time::timeout(
        WAIT,
        handle.wait_for(|s| {
            matches!(
                s,
                LeaseStatus::Active {
                    last_heartbeat: Some(_),
                    ..
                }
            )
        }),
    )
    .await
    .expect("beating");

    first.kill().await;
    let killed = tokio::time::Instant::now();
    tokio::time::timeout(
        WAIT,
        handle.wait_for(
            |s| matches!(s, LeaseStatus::Active { last_heartbeat: Some(at), .. } if *at > killed),
        ),
    )
    .await
    .expect("the provider's beats reach the second server");
    assert_eq!(client.current_endpoint(), second.endpoint());
    // The consumer's watch moved too: a change made now reaches it.
    let updated = client
        .update_instance(handle.id(), sdk::InstanceUpdate::default().weight(7))
        .await
        .expect("update through the second server");
    assert_eq!(updated.weight, 7);
    let view = view_until(&mut subscription, "the new weight", |v| {
        v.iter().any(|i| i.weight == 7)
    })
    .await;
    assert!(!view.is_stale());
    let stats = provider.stats();
    assert_eq!((stats.registrations, stats.not_found), (1, 0), "{stats:?}");
    assert!(stats.stream_failures >= 1, "{stats:?}");
    handle.deregister().await.expect("deregister");
    view_until(&mut subscription, "the instance gone", Instances::is_empty).await;
}
