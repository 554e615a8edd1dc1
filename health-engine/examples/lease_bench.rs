//! Lease benchmark: detection precision, lease operations per second, bytes per lease.
//!
//! ```text
//! cargo run --release -p health-engine --example lease_bench -- [--leases N] [--smoke]
//! ```
//!
//! Three measurements, one process:
//!
//! 1. **Memory** (core alone): resident-set growth while `--memory-leases` leases (default one
//!    million) are registered into a `LeaseTable`, divided by the count; next to it the table's
//!    own accounting of its capacities. RSS includes allocator slack, so it is the honest figure.
//! 2. **Lease operations per second** (core alone, one thread): heartbeats applied to a table of
//!    `--leases` leases (lookup, update, lazy timer), interleaved with `advance` calls as time
//!    moves; registrations per second are reported too.
//! 3. **Detection precision** (the real shell with real timers, over the in-memory event log):
//!    `--leases` leases (default 100,000) with a short TTL beat in batches, then stop beating on a
//!    schedule spread over a few seconds. A downstream subscriber of the events stream records
//!    when each `InstanceTurnedUnhealthy` reaches it; lateness = that time - the deadline in the
//!    event. Also reported: the engine's decision lateness (`occurred_at - deadline`). The
//!    in-memory log is pre-grown first (see `prefill`): its table growth is not the engine's.
//!
//! It prints a table, then one line `RESULT {json}` for `cargo xtask bench`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use event_log::event::{
    Beat, Event, HealthCheck, HeartbeatsReceived, InstanceRegistered, InstanceStatusChanged,
    Location, millis_to_datetime, now_millis,
};
use event_log::{Append, Envelope, EventLog, MemoryConfig, MemoryLog, StreamKind, Streams};
use futures::StreamExt;
use health_engine::leases::{LeaseTable, Rules};
use health_engine::{Config, HealthEngine, SelfPreservation};
use tokio_util::sync::CancellationToken;

struct Options {
    leases: usize,
    memory_leases: usize,
    ttl_ms: u64,
    stop_spread: Duration,
    smoke: bool,
}

fn options() -> Result<Options> {
    let mut args = std::env::args().skip(1);
    let mut leases = None;
    let mut memory_leases = None;
    let mut ttl_ms = None;
    let mut stop_spread_ms = None;
    let mut smoke = false;
    while let Some(arg) = args.next() {
        let mut value = |name: &str| -> Result<usize> {
            args.next()
                .with_context(|| format!("{name} needs a value"))?
                .parse()
                .with_context(|| format!("{name} must be a number"))
        };
        match arg.as_str() {
            "--leases" => leases = Some(value("--leases")?),
            "--memory-leases" => memory_leases = Some(value("--memory-leases")?),
            "--ttl-ms" => ttl_ms = Some(value("--ttl-ms")? as u64),
            "--stop-spread-ms" => stop_spread_ms = Some(value("--stop-spread-ms")? as u64),
            "--smoke" => smoke = true,
            "--help" | "-h" => {
                println!(
                    "lease_bench [--leases N] [--memory-leases N] [--ttl-ms MS] [--stop-spread-ms MS] \
                     [--smoke]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}"),
        }
    }
    let leases = leases.unwrap_or(if smoke { 10_000 } else { 100_000 });
    if leases == 0 {
        bail!("--leases must be positive");
    }
    Ok(Options {
        leases,
        memory_leases: memory_leases.unwrap_or(if smoke { 100_000 } else { 1_000_000 }),
        ttl_ms: ttl_ms.unwrap_or(if smoke { 200 } else { 1_000 }),
        stop_spread: Duration::from_millis(stop_spread_ms.unwrap_or(if smoke {
            500
        } else {
            5_000
        })),
        smoke,
    })
}

fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let user: f64 = fields.get(11)?.parse().ok()?;
    let system: f64 = fields.get(12)?.parse().ok()?;
    Some((user + system) / 100.0)
}

fn instance(n: usize) -> String {
    event_log::instance_id("bench", "svc", "10.0.0.1", (n % 65_535 + 1) as u16)
        .get(..8)
        .map(|prefix| format!("{prefix}{n:032x}"))
        .unwrap_or_default()
}

fn registration(id: &str, ttl_ms: u64, at_ms: i64) -> Envelope {
    let mut envelope = Envelope::new(
        "bench",
        format!("svc-{}", id.len() % 7),
        id,
        Event::InstanceRegistered(InstanceRegistered {
            host: "10.0.0.1".into(),
            port: 8080,
            protocol: String::new(),
            version: String::new(),
            weight: Some(100),
            metadata: BTreeMap::new(),
            health_check: Some(HealthCheck { ttl_ms }),
            ephemeral: false,
            isolate: None,
            location: Location::default(),
        }),
    );
    envelope.occurred_at = millis_to_datetime(at_ms);
    envelope
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

struct Memory {
    leases: usize,
    rss_per_lease: f64,
    accounted_per_lease: f64,
}

fn memory(count: usize) -> Memory {
    let rules = Rules::default();
    let before = rss_bytes().unwrap_or(0);
    let mut table = LeaseTable::new(rules);
    let start = now_millis();
    table.advance(start);
    for n in 0..count {
        let envelope = registration(&instance(n), 5_000, start);
        // Registrations cannot fail for valid ids; a failure would show as a lower count.
        let _ = table.apply(n as u64 + 1, &envelope);
    }
    let after = rss_bytes().unwrap_or(0);
    let memory = Memory {
        leases: table.len(),
        rss_per_lease: after.saturating_sub(before) as f64 / table.len().max(1) as f64,
        accounted_per_lease: table.memory_bytes() as f64 / table.len().max(1) as f64,
    };
    drop(table);
    memory
}

struct Throughput {
    beats_per_second: f64,
    registrations_per_second: f64,
}

fn throughput(count: usize, ttl_ms: u64) -> Throughput {
    let mut table = LeaseTable::new(Rules::default());
    let start = now_millis();
    table.advance(start);
    let envelopes: Vec<Envelope> = (0..count)
        .map(|n| registration(&instance(n), ttl_ms, start))
        .collect();
    let keys: Vec<_> = (0..count)
        .map(|n| health_engine::leases::parse_instance_id(&instance(n)).unwrap_or([0; 20]))
        .collect();
    let clock = Instant::now();
    for (n, envelope) in envelopes.iter().enumerate() {
        let _ = table.apply(n as u64 + 1, envelope);
    }
    let registrations_per_second = count as f64 / clock.elapsed().as_secs_f64();
    // Every lease beats once per TTL; time advances by a TTL per round, so timers fire and
    // re-arm as they do in production. Ten rounds.
    let rounds = 10;
    let clock = Instant::now();
    let mut now = start;
    for _ in 0..rounds {
        let step = ttl_ms as i64 / (count as i64 / 1000).max(1);
        for (n, key) in keys.iter().enumerate() {
            if n % 1000 == 0 {
                now += step;
                table.advance(now);
            }
            table.heartbeat(key, now);
        }
    }
    let beats_per_second = (rounds * count) as f64 / clock.elapsed().as_secs_f64();
    assert_eq!(table.counts().unhealthy, 0, "no lease missed a deadline");
    Throughput {
        beats_per_second,
        registrations_per_second,
    }
}

struct Precision {
    observed: Vec<f64>,
    decided: Vec<f64>,
    expected: usize,
    elapsed: Duration,
}

async fn precision(options: &Options) -> Result<Precision> {
    let streams = Streams::new("bench");
    let log = MemoryLog::with_config(
        streams.clone(),
        MemoryConfig {
            max_heartbeat_records: 1_000_000,
            ..MemoryConfig::default()
        },
    );
    let count = options.leases;
    let ttl_ms = options.ttl_ms;
    let window_ms = ttl_ms as i64 * 3;
    let ids: Vec<String> = (0..count).map(instance).collect();
    // The in-memory log grows its tables (a VecDeque of records, a map of message ids) while it
    // holds its lock; a growth of ~100k entries mid-run stalls every reader for tens of ms, an
    // artefact of the test double that JetStream does not have. Grow them past what the run
    // will need beforehand, with status changes of an instance nobody registered.
    prefill(&log, &streams, count).await?;
    let registered_at = now_millis();
    for chunk in ids.chunks(1_000) {
        let appends = chunk
            .iter()
            .map(|id| Append::event(&streams, &registration(id, ttl_ms, registered_at)))
            .collect::<Result<Vec<_>, _>>()?;
        for result in log.append_many(StreamKind::Events, appends).await {
            result?;
        }
    }
    let config = Config {
        unhealthy_ratio: 3.0,
        // Only unhealthy transitions are measured; expiry would add load, not information.
        delete_timeout: Duration::from_secs(3_600),
        // Every lease stops: self-preservation would (rightly) hold them back.
        self_preservation: SelfPreservation {
            enabled: false,
            ..SelfPreservation::default()
        },
        ..Config::default()
    };
    // The downstream subscriber, from the end of the registrations on.
    let filter = format!("{}.evt.>", streams.prefix());
    let from = log.last_sequence(StreamKind::Events).await? + 1;
    let mut records = log.replay(StreamKind::Events, from, Some(&filter)).await?;
    let shared: Arc<dyn EventLog> = Arc::new(log.clone());
    let engine = HealthEngine::new(config, Arc::clone(&shared))?;
    let handle = engine.handle();
    let shutdown = CancellationToken::new();
    // Beating starts right away: the registrations' deadlines run while the engine replays.
    let engine_task = tokio::spawn(engine.run(shutdown.clone()));
    let observer = tokio::spawn(async move {
        let mut observed = Vec::with_capacity(count);
        let mut decided = Vec::with_capacity(count);
        while observed.len() < count {
            let Some(Ok(record)) = records.next().await else {
                break;
            };
            let received_us =
                time::OffsetDateTime::now_utc().unix_timestamp_nanos() as f64 / 1_000.0;
            let Ok(envelope) = record.decode() else {
                continue;
            };
            if let Event::InstanceTurnedUnhealthy(turned) = &envelope.event {
                observed.push(received_us / 1_000.0 - turned.deadline_ms as f64);
                decided.push((envelope.occurred_at_ms() - turned.deadline_ms) as f64);
            }
        }
        (observed, decided)
    });

    // Beat: every lease once per TTL, in 10 ms batches by phase; once the engine has finished
    // its start-up replay (and after two TTLs at least), stop on a schedule spread over
    // `stop_spread`.
    let tick = Duration::from_millis(10);
    let phases = (ttl_ms / 10).max(1) as usize;
    let began = Instant::now();
    let spread = options.stop_spread;
    let stop_at = |from: Instant, n: usize| from + spread.mul_f64(n as f64 / count as f64);
    let mut stop_from: Option<Instant> = None;
    let mut interval = tokio::time::interval(tick);
    let mut round = 0usize;
    loop {
        interval.tick().await;
        let now = Instant::now();
        if stop_from.is_none() && handle.stats().recovered {
            stop_from = Some(now.max(began + Duration::from_millis(2 * ttl_ms)));
        }
        match stop_from {
            Some(from) if now > from + spread + tick => break,
            None if now > began + Duration::from_secs(120) => {
                bail!("the engine did not finish its start-up replay in two minutes")
            }
            _ => {}
        }
        let phase = round % phases;
        round += 1;
        let at_ms = now_millis();
        let beats: Vec<Beat> = (phase..count)
            .step_by(phases)
            .filter(|n| stop_from.is_none_or(|from| now < stop_at(from, *n)))
            .map(|n| Beat {
                instance_id: ids[n].clone(),
                at_ms,
            })
            .collect();
        for chunk in beats.chunks(1_000) {
            let envelope = Envelope::new(
                "",
                "",
                "",
                Event::HeartbeatsReceived(HeartbeatsReceived {
                    beats: chunk.to_vec(),
                }),
            );
            log.append(
                StreamKind::Heartbeats,
                Append::event_on(streams.heartbeat_subject(0), &envelope)?,
            )
            .await?;
        }
    }
    let limit = Duration::from_millis(window_ms as u64) + Duration::from_secs(30);
    let (observed, decided) = tokio::time::timeout(limit, observer)
        .await
        .context("not every lease turned unhealthy in time")??;
    let elapsed = began.elapsed();
    drop(handle);
    shutdown.cancel();
    engine_task.await??;
    Ok(Precision {
        observed,
        decided,
        expected: count,
        elapsed,
    })
}

/// Appends filler events so that, once `leases` registrations follow, the events stream holds
/// `P + 1` records, `P` a power of two large enough that the `leases` transitions of the run fit
/// the capacities then reached (`2P` records, `7/8 x 2P` message ids): no table of the in-memory
/// log grows during the run.
async fn prefill(log: &MemoryLog, streams: &Streams, leases: usize) -> Result<()> {
    let power = ((leases + 1) * 4).div_ceil(3).next_power_of_two();
    let target = (power + 1 - leases) as u64;
    let nobody = "f".repeat(40);
    let mut stored = log.last_sequence(StreamKind::Events).await?;
    while stored < target {
        let chunk = (target - stored).min(1_000);
        let appends = (0..chunk)
            .map(|_| {
                let envelope = Envelope::new(
                    "bench",
                    "filler",
                    nobody.clone(),
                    Event::InstanceStatusChanged(InstanceStatusChanged::default()),
                );
                Append::event(streams, &envelope)
            })
            .collect::<Result<Vec<_>, _>>()?;
        for result in log.append_many(StreamKind::Events, appends).await {
            stored = result?.sequence;
        }
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let options = options()?;
    let memory = memory(options.memory_leases);
    let throughput = throughput(options.leases, options.ttl_ms);
    let cpu_before = cpu_seconds().unwrap_or(0.0);
    let precision = precision(&options).await?;
    let cpu_precision = cpu_seconds().unwrap_or(0.0) - cpu_before;
    let mut observed = precision.observed.clone();
    observed.sort_by(f64::total_cmp);
    let mut decided = precision.decided.clone();
    decided.sort_by(f64::total_cmp);
    let summary = |values: &[f64]| {
        serde_json::json!({
            "p50": percentile(values, 50.0),
            "p99": percentile(values, 99.0),
            "max": values.last().copied().unwrap_or(f64::NAN),
        })
    };

    println!(
        "lease_bench ({})",
        if options.smoke { "smoke" } else { "full" }
    );
    println!(
        "  {:<46} {:>12}",
        "leases (precision / throughput)", options.leases
    );
    println!(
        "  {:<46} {:>12}",
        "TTL ms (window = 3 x TTL)", options.ttl_ms
    );
    println!(
        "  {:<46} {:>9.2} ms",
        "observed lateness p50",
        percentile(&observed, 50.0)
    );
    println!(
        "  {:<46} {:>9.2} ms",
        "observed lateness p99",
        percentile(&observed, 99.0)
    );
    println!(
        "  {:<46} {:>9.2} ms",
        "observed lateness max",
        observed.last().copied().unwrap_or(f64::NAN)
    );
    println!(
        "  {:<46} {:>9.0} ms",
        "decision lateness p99 (occurred_at - deadline)",
        percentile(&decided, 99.0)
    );
    println!(
        "  {:<46} {:>12}",
        "transitions observed / expected",
        format!("{}/{}", observed.len(), precision.expected)
    );
    println!(
        "  {:<46} {:>9.2} s",
        "CPU during the precision run (all threads)", cpu_precision
    );
    println!(
        "  {:<46} {:>12.0}",
        "lease operations (heartbeats) per second", throughput.beats_per_second
    );
    println!(
        "  {:<46} {:>12.0}",
        "registrations per second", throughput.registrations_per_second
    );
    println!(
        "  {:<46} {:>9.1} B",
        format!("bytes per lease, RSS growth ({} leases)", memory.leases),
        memory.rss_per_lease
    );
    println!(
        "  {:<46} {:>9.1} B",
        "bytes per lease, table's own accounting", memory.accounted_per_lease
    );
    let result = serde_json::json!({
        "bench": "lease",
        "smoke": options.smoke,
        "leases": options.leases,
        "ttl_ms": options.ttl_ms,
        "window_ms": options.ttl_ms * 3,
        "stop_spread_ms": options.stop_spread.as_millis() as u64,
        "lateness_observed_ms": summary(&observed),
        "lateness_decided_ms": summary(&decided),
        "transitions_observed": observed.len(),
        "transitions_expected": precision.expected,
        "precision_run_seconds": precision.elapsed.as_secs_f64(),
        "precision_run_cpu_seconds": cpu_precision,
        "lease_ops_per_second": throughput.beats_per_second,
        "registrations_per_second": throughput.registrations_per_second,
        "memory_leases": memory.leases,
        "bytes_per_lease_rss": memory.rss_per_lease,
        "bytes_per_lease_accounted": memory.accounted_per_lease,
    });
    println!("RESULT {result}");
    if observed.len() != precision.expected {
        bail!(
            "{} of {} transitions observed",
            observed.len(),
            precision.expected
        );
    }
    Ok(())
}
