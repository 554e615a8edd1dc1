//! Detection precision, end to end: a fresh `registryd` holds `leases` leases with a short TTL,
//! beaten through StreamHeartbeats once per TTL as clients do; then they stop beating on a
//! schedule spread over a few seconds. An independent JetStream subscriber (plain async-nats,
//! untyped JSON) records when each `InstanceTurnedUnhealthy` reaches it; its lateness is that
//! arrival time minus the `deadline_ms` carried in the event. The engine's own decision
//! lateness (`occurred_at - deadline_ms`) is reported next to it.
//!
//! Self-preservation is switched off for this run (`--no-self-preservation`): every lease
//! stops, which is exactly what it is designed to hold back.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use sdk::proto;
use serde_json::json;

use super::api::{self, Population};
use super::procfs::{self, CpuUse, Processes};
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

fn unix_ms_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |since| since.as_secs_f64() * 1000.0)
}

/// Beats every lease once per TTL (leases spread over the TTL's 10 ms phases) until each one's
/// stop time; returns the beats sent.
async fn beat(
    clients: Vec<sdk::proto::registry_client::RegistryClient<tonic::transport::Channel>>,
    population: Population,
    plan: Plan,
    stop_at: Arc<dyn Fn(usize) -> Instant + Send + Sync>,
    last_stop: Instant,
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
    while Instant::now() <= last_stop + TICK {
        interval.tick().await;
        let now = Instant::now();
        let phase = round % phases;
        round += 1;
        let due: Vec<usize> = (phase..plan.leases)
            .step_by(phases)
            .filter(|n| now < stop_at(*n))
            .collect();
        for chunk in due.chunks(api::MAX_BATCH) {
            let request = proto::BatchHeartbeatRequest {
                instances: chunk
                    .iter()
                    .map(|n| api::by_id(&population.ids[*n]))
                    .collect(),
            };
            sent += chunk.len() as u64;
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
        if not_ok > 0 {
            return Err(anyhow!("{not_ok} heartbeats were not recorded"));
        }
    }
    Ok(sent)
}

/// Runs the scenario against the registryd at `address` (started with self-preservation off)
/// whose events stream has prefix `prefix`.
pub(crate) async fn run(
    address: &str,
    nats_url: &str,
    prefix: &str,
    database_url: &str,
    registryd_pid: u32,
    processes: &Processes,
    plan: Plan,
) -> Result<serde_json::Value> {
    let clients = api::connect(address, plan.streams).await?;
    let rss_before = procfs::rss_bytes(registryd_pid);
    let registered = api::register(
        &clients,
        database_url,
        processes,
        plan.leases,
        (plan.leases / 100).max(1),
        256.min(plan.leases),
        plan.ttl_ms,
    )
    .await?;
    let rss_registered = procfs::rss_bytes(registryd_pid);
    let population = registered.population.clone();
    let index: Arc<HashMap<String, usize>> = Arc::new(
        population
            .ids
            .iter()
            .enumerate()
            .map(|(n, id)| (id.clone(), n))
            .collect(),
    );

    let mut subscriber =
        Subscriber::start(nats_url, prefix, Some(registered.last_revision)).await?;
    let ttl = Duration::from_millis(plan.ttl_ms);
    let window_ms = 3.0 * plan.ttl_ms as f64;
    // Two TTLs of beating first, so that every lease has a recent beat, then the stops.
    let stop_from = Instant::now() + 2 * ttl;
    let leases = plan.leases;
    let spread = plan.stop_spread;
    let stop_at: Arc<dyn Fn(usize) -> Instant + Send + Sync> =
        Arc::new(move |n: usize| stop_from + spread.mul_f64(n as f64 / leases as f64));
    let last_stop = stop_at(leases.saturating_sub(1));
    let beater = tokio::spawn(beat(
        clients.clone(),
        population.clone(),
        plan,
        Arc::clone(&stop_at),
        last_stop,
    ));

    let observe_until =
        tokio::time::Instant::from_std(last_stop + 3 * ttl) + Duration::from_secs(30);
    tokio::time::sleep_until(stop_from.into()).await;
    let before = processes.sample();
    let mut observed: Vec<f64> = Vec::with_capacity(leases);
    let mut decided: Vec<f64> = Vec::with_capacity(leases);
    let mut premature = 0usize;
    let mut turned_healthy = 0usize;
    let mut seen = vec![false; leases];
    let mut duplicates = 0usize;
    let mut last_arrival = Instant::now();
    while observed.len() + premature < leases {
        let Some(event) = subscriber.next(observe_until).await? else {
            break;
        };
        match event.json["event_type"].as_str() {
            Some("InstanceTurnedUnhealthy") => {}
            Some("InstanceTurnedHealthy") => {
                turned_healthy += 1;
                continue;
            }
            _ => continue,
        }
        let Some(&n) = event.json["instance_id"]
            .as_str()
            .and_then(|id| index.get(id))
        else {
            continue;
        };
        if std::mem::replace(&mut seen[n], true) {
            duplicates += 1;
            continue;
        }
        last_arrival = event.at;
        if event.at < stop_at(n) {
            // Declared dead while it was still beating.
            premature += 1;
            continue;
        }
        let deadline_ms = event.json["payload"]["deadline_ms"]
            .as_f64()
            .ok_or_else(|| anyhow!("TurnedUnhealthy without deadline_ms: {}", event.json))?;
        observed.push(event.received_unix_ms - deadline_ms);
        if let Some(occurred) = event.json["occurred_at"].as_str().and_then(|text| {
            time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()
        }) {
            decided.push(occurred.unix_timestamp_nanos() as f64 / 1e6 - deadline_ms);
        }
    }
    let after = processes.sample();
    let beats_sent = beater.await??;
    let received_all = observed.len() + premature == leases;
    let cpu = CpuUse::between(&before, &after);
    let lateness = super::stats::signed_summary(&mut observed);
    let decision = super::stats::signed_summary(&mut decided);
    let rss_json = |rss: Option<u64>| rss.map(|bytes| json!(bytes));
    Ok(json!({
        "leases": leases,
        "ttl_ms": plan.ttl_ms,
        "window_ms": window_ms,
        "stop_spread_ms": plan.stop_spread.as_millis() as u64,
        "heartbeat_streams": plan.streams,
        "beats_sent": beats_sent,
        "lateness_observed_ms": lateness,
        "lateness_decided_ms": decision,
        "transitions_observed": observed.len(),
        "premature_transitions": premature,
        "duplicate_transitions": duplicates,
        "turned_healthy_events": turned_healthy,
        "all_observed": received_all,
        "observation_seconds": last_arrival.saturating_duration_since(stop_from).as_secs_f64(),
        "finished_at_unix_ms": unix_ms_now(),
        "registration": registered.json,
        "registryd_rss_bytes_before_registration": rss_json(rss_before),
        "registryd_rss_bytes_with_leases": rss_json(rss_registered),
        "cpu": cpu,
    }))
}
