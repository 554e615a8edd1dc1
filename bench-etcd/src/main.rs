//! `bench-etcd`: the peer side of `cargo xtask bench`. Drives etcd lease keep-alives through the
//! `etcd-client` crate exactly the way the bench drives our unary heartbeats: `--leases` leases,
//! `--concurrency` workers over `--connections` connections, each worker renewing its own
//! leases (`w, w + concurrency, ...`) in turn with one keep-alive in flight, for a warm-up and
//! then a measured window.
//!
//! It prints `BEGIN` when the measured window starts and `END` when it ends (so that the bench
//! samples the CPU of etcd and of this process at those moments), then one line
//! `RESULT {json}` with the keep-alives per second and their latency.
//!
//! ```text
//! bench-etcd --endpoint http://127.0.0.1:2379 --leases 200 --concurrency 64 \
//!     [--connections 4] [--warmup-ms 1000] [--measure-ms 5000]
//! ```
//!
//! It lives outside the registry's workspace because etcd-client needs a system `protoc`.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use etcd_client::{Client, LeaseKeepAliveStream, LeaseKeeper};

struct Options {
    endpoint: String,
    leases: usize,
    concurrency: usize,
    connections: usize,
    warmup: Duration,
    measure: Duration,
    ttl_seconds: i64,
}

fn options() -> Result<Options> {
    let mut options = Options {
        endpoint: String::new(),
        leases: 200,
        concurrency: 64,
        connections: 4,
        warmup: Duration::from_secs(1),
        measure: Duration::from_secs(5),
        ttl_seconds: 60,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| -> Result<String> {
            args.next().with_context(|| format!("{name} needs a value"))
        };
        let number = |text: String, name: &str| -> Result<u64> {
            text.parse()
                .with_context(|| format!("{name} takes a number, not {text:?}"))
        };
        match arg.as_str() {
            "--endpoint" => options.endpoint = value("--endpoint")?,
            "--leases" => options.leases = number(value("--leases")?, "--leases")? as usize,
            "--concurrency" => {
                options.concurrency = number(value("--concurrency")?, "--concurrency")? as usize;
            }
            "--connections" => {
                options.connections = number(value("--connections")?, "--connections")? as usize;
            }
            "--warmup-ms" => {
                options.warmup =
                    Duration::from_millis(number(value("--warmup-ms")?, "--warmup-ms")?);
            }
            "--measure-ms" => {
                options.measure =
                    Duration::from_millis(number(value("--measure-ms")?, "--measure-ms")?);
            }
            "--ttl-seconds" => {
                options.ttl_seconds = number(value("--ttl-seconds")?, "--ttl-seconds")? as i64;
            }
            "-h" | "--help" => {
                println!(
                    "bench-etcd --endpoint URL [--leases N] [--concurrency C] [--connections K] \
                     [--warmup-ms MS] [--measure-ms MS] [--ttl-seconds S]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    ensure!(!options.endpoint.is_empty(), "--endpoint is required");
    ensure!(
        options.concurrency > 0 && options.leases >= options.concurrency,
        "--leases must be at least --concurrency (each worker renews leases of its own)"
    );
    options.connections = options.connections.clamp(1, options.concurrency);
    Ok(options)
}

/// Latencies of one worker, in microseconds, for calls completed inside the window.
struct Tally {
    latencies_us: Vec<u64>,
}

async fn worker(
    mut keepers: Vec<(LeaseKeeper, LeaseKeepAliveStream)>,
    begin: Instant,
    end: Instant,
) -> Result<Tally> {
    let mut latencies_us = Vec::new();
    let mut next = 0;
    loop {
        let sent = Instant::now();
        if sent >= end {
            break;
        }
        let count = keepers.len();
        let (keeper, stream) = &mut keepers[next % count];
        next += 1;
        keeper.keep_alive().await?;
        let response = stream
            .message()
            .await?
            .context("etcd closed a keep-alive stream")?;
        ensure!(response.ttl() > 0, "lease {} expired", response.id());
        let done = Instant::now();
        if done >= begin && done <= end {
            latencies_us.push(u64::try_from((done - sent).as_micros()).unwrap_or(u64::MAX));
        }
    }
    Ok(Tally { latencies_us })
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64 / 1000.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let options = options()?;
    let mut clients = Vec::with_capacity(options.connections);
    for _ in 0..options.connections {
        clients.push(
            Client::connect([options.endpoint.as_str()], None)
                .await
                .with_context(|| format!("connecting to etcd at {}", options.endpoint))?,
        );
    }
    // Grant the leases and open their keep-alive streams; worker w gets w, w + C, ...
    let mut per_worker: Vec<Vec<(LeaseKeeper, LeaseKeepAliveStream)>> =
        (0..options.concurrency).map(|_| Vec::new()).collect();
    let mut granted = Vec::with_capacity(options.leases);
    for lease in 0..options.leases {
        let worker = lease % options.concurrency;
        let client = &mut clients[worker % options.connections];
        let id = client.lease_grant(options.ttl_seconds, None).await?.id();
        granted.push(id);
        per_worker[worker].push(client.lease_keep_alive(id).await?);
    }
    let begin = Instant::now() + options.warmup;
    let end = begin + options.measure;
    let tasks: Vec<_> = per_worker
        .into_iter()
        .map(|keepers| tokio::spawn(worker(keepers, begin, end)))
        .collect();
    tokio::time::sleep_until(begin.into()).await;
    println!("BEGIN");
    std::io::stdout().flush()?;
    tokio::time::sleep_until(end.into()).await;
    println!("END");
    std::io::stdout().flush()?;
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await??.latencies_us);
    }
    latencies.sort_unstable();
    let seconds = options.measure.as_secs_f64();
    let result = serde_json::json!({
        "bench": "etcd-lease-keepalive",
        "leases": options.leases,
        "concurrency": options.concurrency,
        "connections": options.connections,
        "calls": latencies.len(),
        "calls_per_second": latencies.len() as f64 / seconds,
        "latency": {
            "count": latencies.len(),
            "p50_ms": percentile(&latencies, 50.0),
            "p90_ms": percentile(&latencies, 90.0),
            "p99_ms": percentile(&latencies, 99.0),
            "max_ms": latencies.last().map_or(0.0, |us| *us as f64 / 1000.0),
            "mean_ms": if latencies.is_empty() { 0.0 } else {
                latencies.iter().sum::<u64>() as f64 / latencies.len() as f64 / 1000.0
            },
        },
    });
    println!("RESULT {result}");
    // Revoke what we granted, so that a later level starts from the same etcd state.
    let client = &mut clients[0];
    for id in granted {
        client.lease_revoke(id).await?;
    }
    Ok(())
}
