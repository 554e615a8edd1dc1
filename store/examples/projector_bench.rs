//! Projector benchmark: projected events per second and lag, against real NATS JetStream and
//! PostgreSQL.
//!
//! ```text
//! cargo run --release -p store --example projector_bench -- [--events N] [--instances M]
//!     [--rate R] [--batch-size B] [--smoke]
//! ```
//!
//! Reads `NATS_URL` and `DATABASE_URL` (defaults: the local servers), creates its own stream
//! prefix and database, and removes both at the end. Two phases over the same mixed workload
//! (registrations, status changes, health transitions, deregistrations, expiries):
//!
//! * **catch-up**: N events are appended first, then the projector starts and applies them:
//!   the throughput of a projector working through a backlog;
//! * **live**: N more events are appended at a steady `--rate` (default 10,000 events/s, the
//!   registration target of the benchmarks issue) while the projector runs: the lag (events
//!   behind and age of the oldest unapplied event) sampled every 10 ms, and the end-to-end rate.
//!
//! Then the consistency check compares the tables with the fold of the stream. Prints a table and
//! one line `RESULT {json}` on stdout.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use event_log::{EventLog, JetStreamConfig, JetStreamLog, Streams};
use store::workload::{Workload, append_all};
use store::{Config, Projector};
use tokio_util::sync::CancellationToken;

struct Args {
    events: usize,
    instances: usize,
    rate: usize,
    batch_size: usize,
    smoke: bool,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        events: 100_000,
        instances: 0,
        rate: 10_000,
        batch_size: Config::new("").batch_size,
        smoke: false,
    };
    let mut iter = std::env::args().skip(1);
    while let Some(arg) = iter.next() {
        let mut value = |name: &str| -> Result<usize> {
            iter.next()
                .with_context(|| format!("{name} needs a value"))?
                .parse()
                .with_context(|| format!("{name} takes a number"))
        };
        match arg.as_str() {
            "--events" => args.events = value("--events")?,
            "--instances" => args.instances = value("--instances")?,
            "--rate" => args.rate = value("--rate")?.max(100),
            "--batch-size" => args.batch_size = value("--batch-size")?,
            "--smoke" => args.smoke = true,
            "-h" | "--help" => {
                println!(
                    "usage: projector_bench [--events N] [--instances M] [--rate R] [--batch-size B] [--smoke]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    if args.smoke {
        args.events = args.events.min(5_000);
    }
    if args.instances == 0 {
        // Each instance sees a handful of events: mostly registrations at first, then changes.
        args.instances = (args.events / 4).max(1);
    }
    Ok(args)
}

/// CPU time (user + system) of this process so far, from /proc (Linux clock ticks of 10 ms).
fn process_cpu() -> Option<Duration> {
    cpu_of("/proc/self/stat")
}

/// CPU time of the process whose `/proc/PID/stat` is `path`.
fn cpu_of(path: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let after_name = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let user: u64 = fields.get(11)?.parse().ok()?;
    let system: u64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_millis((user + system) * 10))
}

/// CPU time of the projector's PostgreSQL backend so far, when the server runs on this machine.
async fn backend_cpu(admin: &tokio_postgres::Client, database: &str) -> Option<Duration> {
    let row = admin
        .query_opt(
            "SELECT pid FROM pg_stat_activity
             WHERE datname = $1 AND application_name = 'registry-store-projector'",
            &[&database],
        )
        .await
        .ok()??;
    let pid: i32 = row.get(0);
    cpu_of(&format!("/proc/{pid}/stat"))
}

fn percentile(sorted: &[u64], fraction: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let index = ((sorted.len() as f64 - 1.0) * fraction).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// Appends at `rate` events per second: a slice every 10 ms, catching up after a slow tick so
/// that the average holds.
async fn append_paced(
    log: &dyn EventLog,
    appends: Vec<event_log::Append>,
    rate: usize,
) -> Result<u64> {
    let per_tick = (rate / 100).max(1);
    let mut ticker = tokio::time::interval(Duration::from_millis(10));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut last = 0;
    let mut appends = appends.into_iter().peekable();
    while appends.peek().is_some() {
        ticker.tick().await;
        let slice: Vec<_> = appends.by_ref().take(per_tick).collect();
        last = last.max(append_all(log, slice).await?);
    }
    Ok(last)
}

struct Phase {
    events: u64,
    elapsed: Duration,
    /// This process: the projector, plus the appender in the live phase.
    cpu: Duration,
    /// The projector's PostgreSQL backend, when measurable.
    backend_cpu: Option<Duration>,
}

impl Phase {
    fn rate(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = parse_args()?;
    let nats_url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
    let admin_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let suffix = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    let prefix = format!("bench{suffix}");
    let database = format!("bench_{suffix}");

    let log = Arc::new(
        JetStreamLog::connect(&nats_url, Streams::new(&prefix), JetStreamConfig::default())
            .await
            .with_context(|| format!("connecting to NATS at {nats_url}"))?,
    );
    log.ensure_streams().await?;
    let (admin, connection) = tokio_postgres::connect(&admin_url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connecting to PostgreSQL at {admin_url}"))?;
    tokio::spawn(connection);
    admin
        .batch_execute(&format!("CREATE DATABASE \"{database}\""))
        .await?;
    let database_url = xtask::harness::database_url_for(&admin_url, &database)?;

    let outcome = run(&args, log.clone(), &database_url, &admin, &database).await;

    // Clean up whatever happened.
    let jetstream = async_nats::jetstream::new(log.client().clone());
    for stream in [
        log.streams().events_stream(),
        log.streams().heartbeats_stream(),
    ] {
        let _ = jetstream.delete_stream(stream).await;
    }
    let _ = admin
        .batch_execute(&format!(
            "DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)"
        ))
        .await;
    outcome
}

async fn run(
    args: &Args,
    log: Arc<JetStreamLog>,
    database_url: &str,
    admin: &tokio_postgres::Client,
    database: &str,
) -> Result<()> {
    let dyn_log: Arc<dyn EventLog> = log.clone();
    let mut workload = Workload::new(42, args.instances, (args.instances / 100).max(1));
    store::migrate(database_url).await?;

    // Catch-up: the backlog first, then the projector.
    let appends = workload.appends(log.streams(), args.events)?;
    let append_started = Instant::now();
    let backlog = append_all(log.as_ref(), appends).await?;
    let append_rate = args.events as f64 / append_started.elapsed().as_secs_f64();

    let config = Config {
        batch_size: args.batch_size,
        ..Config::new(database_url)
    };
    let projector = Projector::new(config.clone(), dyn_log.clone());
    let handle = projector.handle();
    let shutdown = CancellationToken::new();
    let cpu_before = process_cpu().unwrap_or_default();
    let started = Instant::now();
    let task = tokio::spawn(projector.run(shutdown.clone()));
    handle
        .wait_for_sequence(backlog)
        .await
        .context("the projector stopped during catch-up")?;
    let backend_after_catch_up = backend_cpu(admin, database).await;
    let catch_up = Phase {
        events: backlog,
        elapsed: started.elapsed(),
        cpu: process_cpu().unwrap_or_default().saturating_sub(cpu_before),
        // The backend was started by this projector at the start of the phase.
        backend_cpu: backend_after_catch_up,
    };
    let batches_catch_up = handle.progress().batches_applied;

    // Live: append while it projects, sample the lag.
    let appends = workload.appends(log.streams(), args.events)?;
    let sampler = {
        let handle = handle.clone();
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let mut lag_ms = Vec::new();
            let mut lag_events = Vec::new();
            let mut ticker = tokio::time::interval(Duration::from_millis(10));
            while !stopped.is_cancelled() {
                ticker.tick().await;
                let progress = handle.progress();
                lag_ms.push(progress.lag.as_millis() as u64);
                lag_events.push(progress.lag_events);
            }
            (lag_ms, lag_events)
        });
        (stop, task)
    };
    let cpu_before = process_cpu().unwrap_or_default();
    let started = Instant::now();
    let last = append_paced(log.as_ref(), appends, args.rate).await?;
    let appended_in = started.elapsed();
    handle
        .wait_for_sequence(last)
        .await
        .context("the projector stopped during the live phase")?;
    let backend_after_live = backend_cpu(admin, database).await;
    let live = Phase {
        events: last - backlog,
        elapsed: started.elapsed(),
        cpu: process_cpu().unwrap_or_default().saturating_sub(cpu_before),
        backend_cpu: backend_after_live
            .zip(backend_after_catch_up)
            .map(|(after, before)| after.saturating_sub(before)),
    };
    sampler.0.cancel();
    let (mut lag_ms, mut lag_events) = sampler.1.await?;
    lag_ms.sort_unstable();
    lag_events.sort_unstable();
    let progress = handle.progress();
    shutdown.cancel();
    task.await??;

    let check_started = Instant::now();
    let report = store::check(&config, dyn_log.as_ref()).await?;
    let check_elapsed = check_started.elapsed();
    if !report.is_consistent() {
        eprintln!("{report}");
    }

    let lag_p50 = percentile(&lag_ms, 0.50);
    let lag_p99 = percentile(&lag_ms, 0.99);
    let lag_max = lag_ms.last().copied().unwrap_or(0);
    let lag_events_p99 = percentile(&lag_events, 0.99);
    let lag_events_max = lag_events.last().copied().unwrap_or(0);
    let batches = progress.batches_applied;

    println!(
        "projector benchmark: {} events per phase over {} instances, batch size {}",
        args.events, args.instances, args.batch_size
    );
    let seconds = |cpu: Option<Duration>| {
        cpu.map_or_else(
            || "-".to_owned(),
            |cpu| format!("{:.2}s", cpu.as_secs_f64()),
        )
    };
    println!(
        "{:<34} {:>10} {:>8} {:>10} {:>10}",
        "phase", "events/s", "events", "cpu bench", "cpu pg"
    );
    println!(
        "{:<34} {:>10.0} {:>8} {:>10} {:>10}",
        "append (pipelined, 512 in flight)", append_rate, args.events, "-", "-"
    );
    for (name, phase) in [
        ("projector catch-up (backlog)".to_owned(), &catch_up),
        (
            format!("projector live (appends at {}/s)", args.rate),
            &live,
        ),
    ] {
        println!(
            "{:<34} {:>10.0} {:>8} {:>10} {:>10}",
            name,
            phase.rate(),
            phase.events,
            seconds(Some(phase.cpu)),
            seconds(phase.backend_cpu)
        );
    }
    println!(
        "(cpu bench: this process, i.e. the projector, and the appender in the live phase; \
         cpu pg: the projector's PostgreSQL backend)"
    );
    println!(
        "live lag: p50 {lag_p50} ms, p99 {lag_p99} ms, max {lag_max} ms; events behind p99 {lag_events_p99}, max {lag_events_max}"
    );
    println!(
        "batches: {batches_catch_up} in catch-up, {} in total; appends of the live phase took {:.2} s",
        batches,
        appended_in.as_secs_f64()
    );
    println!(
        "consistency check: {} ({} instances, {:.2} s)",
        if report.is_consistent() {
            "no difference"
        } else {
            "DIFFERENCES"
        },
        report.instances_in_stream,
        check_elapsed.as_secs_f64()
    );
    let result = serde_json::json!({
        "bench": "projector",
        "events_per_phase": args.events,
        "instances": args.instances,
        "batch_size": args.batch_size,
        "append_events_per_s": append_rate.round(),
        "catchup_events_per_s": catch_up.rate().round(),
        "catchup_seconds": catch_up.elapsed.as_secs_f64(),
        "catchup_cpu_seconds": catch_up.cpu.as_secs_f64(),
        "catchup_postgres_cpu_seconds": catch_up.backend_cpu.map(|cpu| cpu.as_secs_f64()),
        "live_append_rate": args.rate,
        "live_events_per_s": live.rate().round(),
        "live_seconds": live.elapsed.as_secs_f64(),
        "live_cpu_seconds": live.cpu.as_secs_f64(),
        "live_postgres_cpu_seconds": live.backend_cpu.map(|cpu| cpu.as_secs_f64()),
        "lag_p50_ms": lag_p50,
        "lag_p99_ms": lag_p99,
        "lag_max_ms": lag_max,
        "lag_events_p99": lag_events_p99,
        "lag_events_max": lag_events_max,
        "batches": batches,
        "consistent": report.is_consistent(),
        "check_seconds": check_elapsed.as_secs_f64(),
        "smoke": args.smoke,
    });
    println!("RESULT {result}");
    if !report.is_consistent() {
        bail!("the tables differ from the fold of the stream");
    }
    Ok(())
}
