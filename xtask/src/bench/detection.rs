//! Detection precision, end to end: a fresh `registryd` gets `leases` registrations with a
//! short TTL, each beaten through StreamHeartbeats once per TTL from the moment it is
//! registered, as clients do; once all are registered and have beaten for two TTLs they stop
//! beating on a schedule spread over a few seconds. An independent JetStream subscriber (plain
//! async-nats, untyped JSON) records when each `InstanceTurnedUnhealthy` reaches it; its
//! lateness is that arrival time minus the `deadline_ms` carried in the event. The engine's own
//! decision lateness (`occurred_at - deadline_ms`) is reported next to it, and so is every
//! transition that came before the lease stopped beating (premature: a false suspicion).
//!
//! Self-preservation is switched off for this run (`--no-self-preservation`): every lease
//! stops, which is exactly what it is designed to hold back.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, ensure};
use sdk::proto;
use sdk::proto::registry_client::RegistryClient;
use serde_json::json;
use tonic::transport::Channel;

use super::api;
use super::procfs::{self, CpuUse, Processes};
use super::stats::Samples;
use crate::process::Subscriber;

/// Sizes of the run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    pub(crate) leases: usize,
    pub(crate) ttl_ms: u64,
    pub(crate) stop_spread: Duration,
    pub(crate) streams: usize,
}

const TICK: Duration = Duration::from_millis(10);

/// Instance ids as registrations complete (registration order is not completion order).
type Ids = Arc<Vec<OnceLock<String>>>;

/// When the leases stop beating, known once every lease is registered.
#[derive(Clone)]
struct Schedule {
    from: Arc<OnceLock<Instant>>,
    spread: Duration,
    leases: usize,
}

impl Schedule {
    fn stop_at(&self, n: usize) -> Option<Instant> {
        self.from
            .get()
            .map(|from| *from + self.spread.mul_f64(n as f64 / self.leases as f64))
    }

    fn last_stop(&self) -> Option<Instant> {
        self.stop_at(self.leases.saturating_sub(1))
    }
}

/// Registers every lease with `concurrency` calls in flight; returns the registration latency.
async fn register(
    clients: Vec<RegistryClient<Channel>>,
    ids: Ids,
    plan: Plan,
    concurrency: usize,
) -> Result<Samples> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for worker in 0..concurrency {
        let mut client = clients[worker % clients.len()].clone();
        let (next, ids) = (Arc::clone(&next), Arc::clone(&ids));
        workers.push(tokio::spawn(async move {
            let mut latencies = Samples::default();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= plan.leases {
                    break;
                }
                let request = api::registration(n, (plan.leases / 100).max(1), plan.ttl_ms);
                let sent = Instant::now();
                let response = api::bounded(client.register_instance(request)).await?;
                latencies.push(sent.elapsed());
                let _ = ids[n].set(response.instance_id);
            }
            Ok::<_, anyhow::Error>(latencies)
        }));
    }
    let mut latencies = Samples::default();
    for worker in workers {
        latencies.extend(worker.await??);
    }
    Ok(latencies)
}

/// Beats every registered lease once per TTL (leases spread over the TTL's 10 ms phases) until
/// its stop time; returns the beats sent.
async fn beat(
    clients: Vec<RegistryClient<Channel>>,
    ids: Ids,
    plan: Plan,
    schedule: Schedule,
) -> Result<u64> {
    let mut senders = Vec::new();
    let mut readers = Vec::new();
    for stream in 0..plan.streams {
        let mut client = clients[stream % clients.len()].clone();
        let (sender, receiver) = tokio::sync::mpsc::channel::<proto::BatchHeartbeatRequest>(64);
        let mut responses = client
            .stream_heartbeats(tokio_stream::wrappers::ReceiverStream::new(receiver))
            .await?
            .into_inner();
        senders.push(sender);
        readers.push(tokio::spawn(async move {
            let mut not_ok = 0u64;
            while let Some(response) = responses.message().await? {
                not_ok += response
                    .results
                    .iter()
                    .filter(|r| r.status != proto::heartbeat_result::Status::Ok as i32)
                    .count() as u64;
            }
            Ok::<_, anyhow::Error>(not_ok)
        }));
    }
    let phases = usize::try_from(plan.ttl_ms / 10).unwrap_or(1).max(1);
    let mut interval = tokio::time::interval(TICK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut round = 0usize;
    let mut sent = 0u64;
    let mut next_stream = 0usize;
    loop {
        interval.tick().await;
        let now = Instant::now();
        if schedule.last_stop().is_some_and(|last| now > last + TICK) {
            break;
        }
        let phase = round % phases;
        round += 1;
        let due: Vec<proto::InstanceRef> = (phase..plan.leases)
            .step_by(phases)
            .filter(|n| schedule.stop_at(*n).is_none_or(|stop| now < stop))
            .filter_map(|n| ids[n].get().map(|id| api::by_id(id)))
            .collect();
        for chunk in due.chunks(api::MAX_BATCH) {
            sent += chunk.len() as u64;
            let request = proto::BatchHeartbeatRequest {
                instances: chunk.to_vec(),
            };
            senders[next_stream % senders.len()]
                .send(request)
                .await
                .map_err(|_| anyhow!("a heartbeat stream closed"))?;
            next_stream += 1;
        }
    }
    drop(senders);
    for reader in readers {
        let not_ok = reader.await??;
        ensure!(not_ok == 0, "{not_ok} heartbeats were not recorded");
    }
    Ok(sent)
}

/// One `InstanceTurnedUnhealthy` as the subscriber saw it.
struct Observed {
    instance_id: String,
    at: Instant,
    lateness_ms: f64,
    decided_ms: Option<f64>,
}

/// Follows the events stream from its start until `stop`, keeping the unhealthy transitions.
async fn observe(
    mut subscriber: Subscriber,
    stop: Arc<AtomicBool>,
    unhealthy: Arc<AtomicUsize>,
) -> Result<(Vec<Observed>, usize)> {
    let mut observed = Vec::new();
    let mut turned_healthy = 0;
    while !stop.load(Ordering::Relaxed) {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(200);
        let Some(event) = subscriber.next(deadline).await? else {
            continue;
        };
        match event.json["event_type"].as_str() {
            Some("InstanceTurnedUnhealthy") => {}
            Some("InstanceTurnedHealthy") => {
                turned_healthy += 1;
                continue;
            }
            _ => continue,
        }
        let deadline_ms = event.json["payload"]["deadline_ms"]
            .as_f64()
            .ok_or_else(|| anyhow!("TurnedUnhealthy without deadline_ms: {}", event.json))?;
        let decided_ms = event.json["occurred_at"].as_str().and_then(|text| {
            time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
                .ok()
                .map(|occurred| occurred.unix_timestamp_nanos() as f64 / 1e6 - deadline_ms)
        });
        unhealthy.fetch_add(1, Ordering::Relaxed);
        observed.push(Observed {
            instance_id: event.json["instance_id"].as_str().unwrap_or("").to_owned(),
            at: event.at,
            lateness_ms: event.received_unix_ms - deadline_ms,
            decided_ms,
        });
    }
    Ok((observed, turned_healthy))
}

/// Runs the scenario against the registryd at `address` (started with self-preservation off)
/// whose events stream has prefix `prefix`.
pub(crate) async fn run(
    address: &str,
    nats_url: &str,
    prefix: &str,
    registryd_pid: u32,
    processes: &Processes,
    plan: Plan,
) -> Result<serde_json::Value> {
    let clients = api::connect(address, plan.streams.max(4)).await?;
    let ids: Ids = Arc::new((0..plan.leases).map(|_| OnceLock::new()).collect());
    let schedule = Schedule {
        from: Arc::new(OnceLock::new()),
        spread: plan.stop_spread,
        leases: plan.leases,
    };
    let subscriber = Subscriber::start(nats_url, prefix, None).await?;
    let stop_observing = Arc::new(AtomicBool::new(false));
    let unhealthy = Arc::new(AtomicUsize::new(0));
    let observer = tokio::spawn(observe(
        subscriber,
        Arc::clone(&stop_observing),
        Arc::clone(&unhealthy),
    ));
    let rss_before = procfs::rss_bytes(registryd_pid);
    let beater = tokio::spawn(beat(
        clients.clone(),
        Arc::clone(&ids),
        plan,
        schedule.clone(),
    ));

    let registering = Instant::now();
    let registration = register(clients, Arc::clone(&ids), plan, 256.min(plan.leases)).await;
    let registration_seconds = registering.elapsed().as_secs_f64();
    if registration.is_err() {
        // Let the beater end too, then report the registration failure.
        let _ = schedule.from.set(Instant::now());
    }
    let registration = registration?;
    let rss_registered = procfs::rss_bytes(registryd_pid);
    let ttl = Duration::from_millis(plan.ttl_ms);
    let stop_from = Instant::now() + 2 * ttl;
    let _ = schedule.from.set(stop_from);
    let last_stop = schedule.last_stop().unwrap_or(stop_from);

    tokio::time::sleep_until(stop_from.into()).await;
    let before = processes.sample();
    let beats_sent = beater.await??;
    // Wait for the last deadline (3 TTLs after the last stop) and a bounded grace period.
    let give_up = last_stop + 3 * ttl + Duration::from_secs(30);
    let index: std::collections::HashMap<String, usize> = ids
        .iter()
        .enumerate()
        .filter_map(|(n, id)| Some((id.get()?.clone(), n)))
        .collect();
    while Instant::now() < give_up && unhealthy.load(Ordering::Relaxed) < plan.leases {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop_observing.store(true, Ordering::Relaxed);
    let after = processes.sample();
    let (events, turned_healthy) = observer.await??;

    let mut lateness = Vec::new();
    let mut decided = Vec::new();
    let mut premature = 0usize;
    let mut duplicates = 0usize;
    let mut seen = vec![false; plan.leases];
    for event in &events {
        let Some(&n) = index.get(&event.instance_id) else {
            continue;
        };
        if schedule.stop_at(n).is_none_or(|stop| event.at < stop) {
            // Declared dead while it was still beating.
            premature += 1;
            continue;
        }
        if std::mem::replace(&mut seen[n], true) {
            duplicates += 1;
            continue;
        }
        lateness.push(event.lateness_ms);
        if let Some(ms) = event.decided_ms {
            decided.push(ms);
        }
    }
    let transitions = lateness.len();
    // Does the server still take writes? (A registry wedged by a burst of transitions would
    // explain missing ones.)
    let mut probe_client = api::connect(address, 1).await?.remove(0);
    let mut probe = api::registration(plan.leases, 1, 300_000);
    probe.service = "probe".into();
    let writes_after = match tokio::time::timeout(
        Duration::from_secs(5),
        probe_client.register_instance(probe),
    )
    .await
    {
        Ok(Ok(_)) => "acknowledged".to_owned(),
        Ok(Err(status)) => format!("refused: {status}"),
        Err(_) => "no answer within 5 s: registryd no longer acknowledges writes".to_owned(),
    };
    let cpu = CpuUse::between(&before, &after);
    Ok(json!({
        "leases": plan.leases,
        "ttl_ms": plan.ttl_ms,
        "window_ms": 3 * plan.ttl_ms,
        "stop_spread_ms": plan.stop_spread.as_millis() as u64,
        "heartbeat_streams": plan.streams,
        "beats_sent": beats_sent,
        "registration_seconds": registration_seconds,
        "registration_latency": registration.summary(),
        "lateness_observed_ms": super::stats::signed_summary(&mut lateness),
        "lateness_decided_ms": super::stats::signed_summary(&mut decided),
        "transitions_observed": transitions,
        "premature_transitions": premature,
        "duplicate_transitions": duplicates,
        "turned_healthy_events": turned_healthy,
        "all_observed": transitions == plan.leases,
        "registration_after_the_run": writes_after,
        "registryd_rss_bytes_before_registration": rss_before,
        "registryd_rss_bytes_with_leases": rss_registered,
        "cpu": cpu,
    }))
}
