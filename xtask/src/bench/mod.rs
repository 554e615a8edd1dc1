//! `cargo xtask bench [--smoke]`: the registry measured end to end on this machine, next to a
//! real peer (etcd) in the same run.
//!
//! The debug `xtask` that `cargo xtask` runs builds everything in release mode (registryd, a
//! release `xtask` that generates the load, the component benchmarks, and the etcd driver when
//! `protoc` is installed), then hands over to the release `xtask`. That one provides NATS and
//! PostgreSQL (private servers on free loopback ports, or with `--borrow-services` those of the
//! harness: `NATS_URL` / `DATABASE_URL`), runs every scenario for a bounded time on loopback,
//! prints a table and writes the JSON under `results/` with the machine, the git revision, the
//! date and the command. Every figure carries the CPU time each process used while it was
//! measured (from `/proc/<pid>/stat`): registryd, nats-server, postgres, the load generator and
//! etcd, so that per-core comparisons are possible.
//!
//! Scenarios, in run order: the component benchmarks; on one registryd: registration with the
//! projector's lag, discovery, unary heartbeats, batched and streamed heartbeats, watch latency;
//! etcd lease keep-alives next to our unary heartbeats; on a fresh registryd: detection
//! precision; then memory per lease on `registryd engine` and `registryd all`.
//!
//! Nothing here asserts performance: the targets are reported as met or not, never enforced.

mod api;
mod components;
mod detection;
mod etcd;
mod load;
mod machine;
mod memory;
mod procfs;
mod stats;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use xtask::harness::{PrivateNats, PrivatePostgres, Services};

use self::load::{LoadResult, Window};
use self::procfs::{CpuUse, Processes, Scope};
use crate::process::{Logs, Registryd, cleanup, ensure_database, release_dir, target_dir};

/// Set in the environment of the release `xtask` that runs the scenarios (its value is the
/// command line the user typed).
const CHILD_ENV: &str = "XTASK_BENCH_COMMAND";

/// Options of `cargo xtask bench`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Options {
    /// Tiny sizes: every scenario end to end in under a minute (CI runs this). Its figures
    /// say nothing about performance.
    #[arg(long)]
    smoke: bool,
    /// Run only these scenarios (comma-separated). Discovery, heartbeats and watch need the
    /// registration scenario's instances, so it runs with any of them.
    #[arg(long, value_delimiter = ',', value_enum)]
    only: Vec<Scenario>,
    /// Use NATS_URL / DATABASE_URL (when they answer) instead of private servers. Their CPU
    /// then includes whatever else uses them.
    #[arg(long)]
    borrow_services: bool,
    /// Measured seconds of each closed-loop figure (default: 5, or 1 with --smoke).
    #[arg(long)]
    seconds: Option<f64>,
    /// Folder for the JSON results (default: results/ at the workspace root).
    #[arg(long)]
    out: Option<PathBuf>,
}

impl Options {
    /// `--smoke` and nothing else, as CI runs it.
    pub(crate) fn smoke() -> Options {
        Options {
            smoke: true,
            only: Vec::new(),
            borrow_services: false,
            seconds: None,
            out: None,
        }
    }

    /// The arguments of `cargo xtask` that give these options.
    fn to_args(&self) -> Vec<String> {
        let mut args = vec!["bench".to_owned()];
        if self.smoke {
            args.push("--smoke".into());
        }
        if !self.only.is_empty() {
            let names: Vec<String> = self
                .only
                .iter()
                .filter_map(clap::ValueEnum::to_possible_value)
                .map(|value| value.get_name().to_owned())
                .collect();
            args.extend(["--only".into(), names.join(",")]);
        }
        if self.borrow_services {
            args.push("--borrow-services".into());
        }
        if let Some(seconds) = self.seconds {
            args.extend(["--seconds".into(), seconds.to_string()]);
        }
        if let Some(out) = &self.out {
            args.extend(["--out".into(), out.display().to_string()]);
        }
        args
    }
}

/// The scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Scenario {
    /// lease_bench and projector_bench.
    Components,
    /// Durable registrations per second and projector lag.
    Registration,
    /// Discover calls per second on 100,000 instances.
    Discovery,
    /// Unary Heartbeat calls per second and latency.
    Unary,
    /// BatchHeartbeat and StreamHeartbeats renewals per second.
    Batched,
    /// Status change to SDK consumer cache.
    Watch,
    /// etcd lease keep-alives, the peer.
    Etcd,
    /// Detection lateness seen by a downstream subscriber.
    Detection,
    /// RSS per lease of registryd engine and registryd all.
    Memory,
}

/// Sizes of one mode.
struct Sizes {
    window: Window,
    instances: usize,
    services: usize,
    registration_concurrency: usize,
    discovery_concurrency: Vec<usize>,
    unary_leases: usize,
    unary_concurrency: Vec<usize>,
    connections: usize,
    batch_size: usize,
    batch_concurrency: usize,
    streams: usize,
    stream_in_flight: usize,
    watch_changes: usize,
    detection: detection::Plan,
    memory_leases: Vec<usize>,
    lease_bench_args: Vec<&'static str>,
    projector_bench_args: Vec<&'static str>,
}

impl Sizes {
    fn new(options: &Options) -> Sizes {
        let smoke = options.smoke;
        let measure = options.seconds.unwrap_or(if smoke { 1.0 } else { 5.0 });
        let window = Window {
            warmup: Duration::from_secs_f64(if smoke { 0.3 } else { 1.0 }),
            measure: Duration::from_secs_f64(measure.max(0.1)),
        };
        if smoke {
            Sizes {
                window,
                instances: 2_000,
                services: 20,
                registration_concurrency: 64,
                discovery_concurrency: vec![8, 32],
                unary_leases: 32,
                unary_concurrency: vec![1, 8, 32],
                connections: 4,
                batch_size: 500,
                batch_concurrency: 4,
                streams: 2,
                stream_in_flight: 4,
                watch_changes: 20,
                detection: detection::Plan {
                    leases: 2_000,
                    ttl_ms: 1_000,
                    stop_spread: Duration::from_secs(1),
                    streams: 2,
                },
                memory_leases: vec![10_000, 50_000],
                lease_bench_args: vec!["--smoke"],
                projector_bench_args: vec!["--smoke"],
            }
        } else {
            Sizes {
                window,
                instances: 100_000,
                services: 1_000,
                registration_concurrency: 256,
                discovery_concurrency: vec![16, 64, 256],
                unary_leases: 200,
                unary_concurrency: vec![1, 16, 64, 200],
                connections: 4,
                batch_size: 1_000,
                batch_concurrency: 8,
                streams: 4,
                stream_in_flight: 8,
                watch_changes: 200,
                detection: detection::Plan {
                    leases: 100_000,
                    ttl_ms: 2_000,
                    // 5,000 leases stop per second. Faster (20,000/s over 5 s) wedges the
                    // server today: see BENCHMARKS.md, "Detection".
                    stop_spread: Duration::from_secs(20),
                    streams: 4,
                },
                memory_leases: vec![100_000, 1_000_000],
                lease_bench_args: vec![],
                projector_bench_args: vec![],
            }
        }
    }
}

/// One line of the table.
struct Row {
    scenario: &'static str,
    figure: String,
    measured: String,
    cpu: Option<CpuUse>,
}

/// One target of the issue, judged.
struct Target {
    target: &'static str,
    measured: String,
    met: Option<bool>,
}

#[derive(Default)]
struct Report {
    rows: Vec<Row>,
    targets: Vec<Target>,
    scenarios: serde_json::Map<String, Value>,
    failures: Vec<String>,
    notes: Vec<String>,
}

impl Report {
    fn row(
        &mut self,
        scenario: &'static str,
        figure: impl Into<String>,
        measured: impl Into<String>,
        cpu: Option<&CpuUse>,
    ) {
        self.rows.push(Row {
            scenario,
            figure: figure.into(),
            measured: measured.into(),
            cpu: cpu.cloned(),
        });
    }

    fn target(&mut self, target: &'static str, measured: impl Into<String>, met: Option<bool>) {
        self.targets.push(Target {
            target,
            measured: measured.into(),
            met,
        });
    }

    fn failed(&mut self, scenario: &str, error: &anyhow::Error) {
        eprintln!("bench: {scenario} FAILED: {error:#}");
        self.failures.push(format!("{scenario}: {error:#}"));
        self.scenarios.insert(
            scenario.to_owned(),
            json!({ "error": format!("{error:#}") }),
        );
    }
}

fn rate(value: f64) -> String {
    let whole = value.round() as u64;
    let digits = whole.to_string();
    let mut grouped = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    grouped
}

fn latency_text(summary: &stats::Summary) -> String {
    format!(
        "p50 {:.2} ms · p99 {:.2} ms",
        summary.p50_ms, summary.p99_ms
    )
}

fn load_text(result: &LoadResult, unit: &str) -> String {
    let mut text = format!(
        "{}{unit}/s · {}",
        rate(result.items_per_second),
        latency_text(&result.latency)
    );
    if result.errors > 0 {
        text.push_str(&format!(" · {} errors", result.errors));
    }
    text
}

/// The command that runs these options.
fn command_line(options: &Options) -> String {
    format!("cargo xtask {}", options.to_args().join(" "))
}

/// Entry point: build in release mode, then run the scenarios in the release `xtask`.
pub(crate) fn run(options: Options) -> Result<()> {
    if std::env::var_os(CHILD_ENV).is_some() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        return runtime.block_on(bench(options));
    }
    build(&options)?;
    let release = target_dir().join("release").join("xtask");
    let status = Command::new(&release)
        .args(options.to_args())
        .env(CHILD_ENV, command_line(&options))
        .current_dir(crate::root())
        .status()
        .with_context(|| format!("starting {}", release.display()))?;
    if !status.success() {
        bail!("the benchmark failed ({status})");
    }
    Ok(())
}

fn wants(options: &Options, scenario: Scenario) -> bool {
    options.only.is_empty() || options.only.contains(&scenario)
}

fn build(options: &Options) -> Result<()> {
    let mut build = crate::cargo();
    build.args([
        "build",
        "--release",
        "-p",
        "registry-api",
        "--bin",
        "registryd",
        "-p",
        "xtask",
        "--bin",
        "xtask",
        "-p",
        "health-engine",
        "--example",
        "lease_bench",
        "-p",
        "store",
        "--example",
        "projector_bench",
    ]);
    crate::run(
        build,
        "building registryd, the load generator and the component benchmarks (release)",
    )?;
    if wants(options, Scenario::Etcd) {
        if etcd::protoc_available() {
            let mut driver = crate::cargo();
            driver
                .args(["build", "--release", "--manifest-path"])
                .arg(etcd::driver_manifest())
                .env("CARGO_TARGET_DIR", target_dir());
            crate::run(driver, "building the etcd driver (bench-etcd, release)")?;
        } else {
            eprintln!(
                "xtask: protoc or libprotobuf-dev is missing, so the etcd driver cannot be built: \
                 {}",
                etcd::INSTALL
            );
        }
    }
    Ok(())
}

/// NATS and PostgreSQL for the run, with the pids that carry their CPU.
struct Backends {
    nats_url: String,
    admin_database_url: String,
    origin: &'static str,
    _services: Option<Services>,
    _nats: Option<PrivateNats>,
    _postgres: Option<PrivatePostgres>,
}

fn backends(options: &Options) -> Result<Backends> {
    if !options.borrow_services
        && let (Ok(nats), Ok(postgres)) = (PrivateNats::start(), PrivatePostgres::start())
    {
        return Ok(Backends {
            nats_url: nats.url(),
            admin_database_url: postgres.url(),
            origin: "private servers started for this run (nothing else uses them)",
            _services: None,
            _nats: Some(nats),
            _postgres: Some(postgres),
        });
    }
    let services = Services::provide()?;
    Ok(Backends {
        nats_url: services.nats_url.clone(),
        admin_database_url: services.database_url.clone(),
        origin: if services.any_private() {
            "the harness (NATS_URL / DATABASE_URL or private servers)"
        } else {
            "borrowed from NATS_URL / DATABASE_URL: their CPU includes other users"
        },
        _services: Some(services),
        _nats: None,
        _postgres: None,
    })
}

fn suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..10].to_owned()
}

/// Everything the scenarios share.
struct Bench {
    options: Options,
    sizes: Sizes,
    backends: Backends,
    processes: Processes,
    registryd: PathBuf,
    logs: PathBuf,
    report: Report,
}

async fn bench(options: Options) -> Result<()> {
    let started_at = machine::now_rfc3339();
    let machine = machine::describe();
    let sizes = Sizes::new(&options);
    let mode = if options.smoke { "smoke" } else { "full" };
    eprintln!(
        "bench: {mode} run on {}; load average {:?}",
        machine::summary(&machine),
        machine::load_average().unwrap_or_default()
    );
    let out = options
        .out
        .clone()
        .unwrap_or_else(|| crate::root().join("results"));
    let stamp = started_at.replace([':', '-'], "").replace('T', "-");
    let stamp = stamp
        .split('.')
        .next()
        .unwrap_or(&stamp)
        .trim_end_matches('Z')
        .to_owned();
    let logs = out.join("logs").join(format!("{stamp}-{mode}"));
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;

    let backends = tokio::task::spawn_blocking({
        let options = options.clone();
        move || backends(&options)
    })
    .await??;
    eprintln!(
        "bench: NATS {} and PostgreSQL {}: {}",
        backends.nats_url, backends.admin_database_url, backends.origin
    );
    let mut processes = Processes::default();
    processes.set("bench client", std::process::id(), Scope::Own);
    for (name, url, scope) in [
        ("nats-server", &backends.nats_url, Scope::Own),
        ("postgres", &backends.admin_database_url, Scope::Tree),
    ] {
        match procfs::port_of(url)
            .filter(|_| procfs::is_local(url))
            .and_then(procfs::pid_listening_on)
        {
            Some(pid) => processes.set(name, pid, scope),
            None => {
                eprintln!("bench: cannot see the {name} process of {url}: its CPU is not counted")
            }
        }
    }
    let mut bench = Bench {
        options,
        sizes,
        backends,
        processes,
        registryd: release_dir().join("registryd"),
        logs,
        report: Report::default(),
    };
    let server_processes = bench.processes.pids();

    // Ctrl-C stops the scenario in progress; dropping it stops its processes, and returning
    // stops the private servers.
    let interrupted = tokio::select! {
        () = scenarios(&mut bench) => false,
        _ = tokio::signal::ctrl_c() => true,
    };
    if interrupted {
        bail!("interrupted: the private servers and processes of the run are stopped");
    }

    let finished_at = machine::now_rfc3339();
    let mut machine = machine;
    machine["load_average_at_end"] = json!(machine::load_average());
    let report = &bench.report;
    let targets: Vec<Value> = report
        .targets
        .iter()
        .map(|t| json!({ "target": t.target, "measured": t.measured, "met": t.met }))
        .collect();
    let table: Vec<Value> = report
        .rows
        .iter()
        .map(|row| {
            json!({
                "scenario": row.scenario,
                "figure": row.figure,
                "measured": row.measured,
                "cpu": row.cpu,
            })
        })
        .collect();
    let document = json!({
        "command": command_line(&bench.options),
        "mode": mode,
        "started_at": started_at,
        "finished_at": finished_at,
        "git_revision": machine::git_revision(),
        "machine": machine,
        "services": {
            "nats_url": bench.backends.nats_url,
            "postgres_url": bench.backends.admin_database_url,
            "origin": bench.backends.origin,
            "measured_processes": server_processes,
        },
        "sizes": {
            "measure_seconds": bench.sizes.window.measure.as_secs_f64(),
            "warmup_seconds": bench.sizes.window.warmup.as_secs_f64(),
        },
        "targets": targets,
        "table": table,
        "scenarios": report.scenarios,
        "notes": report.notes,
        "failures": report.failures,
    });
    print_table(&bench, &document);
    let path = out.join(format!("{stamp}-{mode}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(&document)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    println!(
        "\nresults: {}\nlogs: {}",
        path.display(),
        bench.logs.display()
    );
    if !report.failures.is_empty() {
        bail!(
            "{} scenario(s) failed: {}",
            report.failures.len(),
            report.failures.join("; ")
        );
    }
    Ok(())
}

/// Every selected scenario, in order; failures are recorded in the report.
async fn scenarios(bench: &mut Bench) {
    if wants(&bench.options, Scenario::Components) {
        eprintln!("bench: component benchmarks (lease_bench, projector_bench)");
        components_scenarios(bench).await;
    }
    let api_scenarios = [
        Scenario::Registration,
        Scenario::Discovery,
        Scenario::Unary,
        Scenario::Batched,
        Scenario::Watch,
    ];
    let mut unary = Vec::new();
    if api_scenarios.iter().any(|s| wants(&bench.options, *s)) {
        match api_group(bench).await {
            Ok(results) => unary = results,
            Err(error) => bench.report.failed("api", &error),
        }
    }
    if wants(&bench.options, Scenario::Etcd)
        && let Err(error) = etcd_group(bench, &unary).await
    {
        bench.report.failed("etcd", &error);
    }
    if wants(&bench.options, Scenario::Detection)
        && let Err(error) = detection_group(bench).await
    {
        bench.report.failed("detection", &error);
    }
    if wants(&bench.options, Scenario::Memory)
        && let Err(error) = memory_group(bench).await
    {
        bench.report.failed("memory", &error);
    }
}

fn print_table(bench: &Bench, document: &Value) {
    let report = &bench.report;
    println!();
    println!(
        "cargo xtask bench ({}) · {} · git {} · {}",
        document["mode"].as_str().unwrap_or(""),
        machine::summary(&document["machine"]),
        document["git_revision"].as_str().unwrap_or("?"),
        document["started_at"].as_str().unwrap_or("")
    );
    println!(
        "load average at start {} · at end {} · services: {}",
        document["machine"]["load_average_at_start"],
        document["machine"]["load_average_at_end"],
        bench.backends.origin
    );
    println!();
    println!("{:<12} {:<54} measured", "scenario", "figure");
    println!("{}", "-".repeat(110));
    let mut last = "";
    for row in &report.rows {
        let scenario = if row.scenario == last {
            ""
        } else {
            row.scenario
        };
        last = row.scenario;
        println!("{scenario:<12} {:<54} {}", row.figure, row.measured);
        if let Some(cpu) = &row.cpu {
            println!(
                "{:<12}   CPU cores used over {:.1} s: {}",
                "",
                cpu.wall_seconds,
                cpu.cores_line()
            );
        }
    }
    println!();
    println!("{:<66} {:<36} met", "target (issue 8)", "measured");
    println!("{}", "-".repeat(110));
    for target in &report.targets {
        let met = match target.met {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "-",
        };
        println!("{:<66} {:<36} {met}", target.target, target.measured);
    }
    if bench.options.smoke {
        println!(
            "\n(smoke run: tiny sizes and 1 s windows; the figures say nothing about performance)"
        );
    }
    for note in &report.notes {
        println!("note: {note}");
    }
}

/// Runs the component benchmark `name` (an example of its crate) on a blocking thread, with
/// `env` added to its environment: its `RESULT` JSON.
async fn run_component(
    bench: &Bench,
    name: &str,
    args: Vec<&'static str>,
    env: Vec<(&'static str, String)>,
    limit: Duration,
) -> Result<Value> {
    let example = components::example(name);
    let processes = bench.processes.clone();
    tokio::task::spawn_blocking(move || {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        components::run(&example, &args, &env, &processes, limit)
    })
    .await?
}

async fn components_scenarios(bench: &mut Bench) {
    let limit = Duration::from_secs(if bench.options.smoke { 60 } else { 300 });
    let lease_args = bench.sizes.lease_bench_args.clone();
    let lease = run_component(bench, "lease_bench", lease_args, Vec::new(), limit).await;
    match lease {
        Ok(result) => {
            let cpu: Option<CpuUse> = serde_json::from_value(result["cpu_whole_run"].clone()).ok();
            bench.report.row(
                "components",
                format!("lease_bench: core renewals/s ({} leases)", result["leases"]),
                format!(
                    "{}/s (one core)",
                    rate(result["lease_ops_per_second"].as_f64().unwrap_or(0.0))
                ),
                cpu.as_ref(),
            );
            bench.report.row(
                "components",
                format!(
                    "lease_bench: core bytes per lease ({} leases)",
                    result["memory_leases"]
                ),
                format!(
                    "{:.0} B (RSS growth) · {:.0} B (table's accounting)",
                    result["bytes_per_lease_rss"].as_f64().unwrap_or(f64::NAN),
                    result["bytes_per_lease_accounted"]
                        .as_f64()
                        .unwrap_or(f64::NAN)
                ),
                None,
            );
            bench.report.row(
                "components",
                "lease_bench: detection over the in-memory log",
                format!(
                    "lateness p50 {:.1} ms · p99 {:.1} ms · max {:.1} ms ({} leases, TTL {} ms)",
                    result["lateness_observed_ms"]["p50"]
                        .as_f64()
                        .unwrap_or(f64::NAN),
                    result["lateness_observed_ms"]["p99"]
                        .as_f64()
                        .unwrap_or(f64::NAN),
                    result["lateness_observed_ms"]["max"]
                        .as_f64()
                        .unwrap_or(f64::NAN),
                    result["leases"],
                    result["ttl_ms"]
                ),
                None,
            );
            bench.report.scenarios.insert("lease_bench".into(), result);
        }
        Err(error) => bench.report.failed("lease_bench", &error),
    }
    let projector_args = bench.sizes.projector_bench_args.clone();
    let env = vec![
        ("NATS_URL", bench.backends.nats_url.clone()),
        ("DATABASE_URL", bench.backends.admin_database_url.clone()),
    ];
    let projector = run_component(bench, "projector_bench", projector_args, env, limit).await;
    match projector {
        Ok(result) => {
            let cpu: Option<CpuUse> = serde_json::from_value(result["cpu_whole_run"].clone()).ok();
            bench.report.row(
                "components",
                format!(
                    "projector_bench: catch-up ({} events)",
                    result["events_per_phase"]
                ),
                format!(
                    "{} events/s",
                    rate(result["catchup_events_per_s"].as_f64().unwrap_or(0.0))
                ),
                None,
            );
            bench.report.row(
                "components",
                format!(
                    "projector_bench: live at {}/s appends",
                    result["live_append_rate"]
                ),
                format!(
                    "{} events/s · lag p50 {} ms · p99 {} ms · max {} ms",
                    rate(result["live_events_per_s"].as_f64().unwrap_or(0.0)),
                    result["lag_p50_ms"],
                    result["lag_p99_ms"],
                    result["lag_max_ms"]
                ),
                cpu.as_ref(),
            );
            bench
                .report
                .scenarios
                .insert("projector_bench".into(), result);
        }
        Err(error) => bench.report.failed("projector_bench", &error),
    }
}

/// Starts a registryd with its own stream prefix and database; returns it with both names.
async fn start_registryd(
    bench: &Bench,
    label: &str,
    extra: &[&str],
) -> Result<(Registryd, String, String, String)> {
    let suffix = suffix();
    let prefix = format!("bench{suffix}");
    let database = format!("bench_{suffix}");
    let database_url = ensure_database(&bench.backends.admin_database_url, &database).await?;
    let mut args = vec![
        "--listen".to_owned(),
        "127.0.0.1:0".to_owned(),
        "--nats-url".to_owned(),
        bench.backends.nats_url.clone(),
        "--database-url".to_owned(),
        database_url.clone(),
        "--stream-prefix".to_owned(),
        prefix.clone(),
    ];
    args.extend(extra.iter().map(|arg| (*arg).to_owned()));
    let binary = bench.registryd.clone();
    let log = bench.logs.join(format!("registryd-{label}.log"));
    let registryd = tokio::task::spawn_blocking(move || {
        Registryd::spawn(
            &binary,
            &args,
            Logs::File {
                path: log,
                watch: vec![],
            },
            true,
        )
    })
    .await??;
    Ok((registryd, prefix, database, database_url))
}

/// Registration, discovery, unary, batched/streamed heartbeats and watch, on one registryd.
/// Returns the unary results by concurrency, for the comparison with etcd.
async fn api_group(bench: &mut Bench) -> Result<Vec<LoadResult>> {
    let (registryd, prefix, database, database_url) = start_registryd(bench, "api", &[]).await?;
    let result = api_scenarios(bench, &registryd, &database_url).await;
    let _ = tokio::task::spawn_blocking(move || registryd.terminate()).await;
    cleanup(
        &bench.backends.nats_url,
        &bench.backends.admin_database_url,
        &prefix,
        &database,
    )
    .await;
    result
}

async fn api_scenarios(
    bench: &mut Bench,
    registryd: &Registryd,
    database_url: &str,
) -> Result<Vec<LoadResult>> {
    let sizes = &bench.sizes;
    let mut processes = bench.processes.clone();
    processes.set("registryd", registryd.pid(), Scope::Own);
    let clients = api::connect(&registryd.address, sizes.connections).await?;
    eprintln!(
        "bench: registering {} instances over {} services",
        sizes.instances, sizes.services
    );
    let registered = api::register(
        &clients,
        database_url,
        &processes,
        sizes.instances,
        sizes.services,
        sizes.registration_concurrency,
        300_000,
    )
    .await?;
    let lag = &registered.json["projector_lag_ms"];
    bench.report.row(
        "registration",
        format!(
            "RegisterInstance, {} in flight ({} instances)",
            sizes.registration_concurrency, sizes.instances
        ),
        format!(
            "{}/s · {}",
            rate(registered.rate),
            latency_text(
                &serde_json::from_value(registered.json["latency"].clone()).unwrap_or_default()
            )
        ),
        Some(&registered.cpu),
    );
    bench.report.row(
        "registration",
        "projector lag while registering (age of oldest unprojected)",
        format!(
            "p50 {:.0} ms · p99 {:.0} ms · max {:.0} ms; caught up {:.2} s after the last",
            lag["p50_ms"].as_f64().unwrap_or(f64::NAN),
            lag["p99_ms"].as_f64().unwrap_or(f64::NAN),
            lag["max_ms"].as_f64().unwrap_or(f64::NAN),
            registered.json["projector_caught_up_seconds_after_last_registration"]
                .as_f64()
                .unwrap_or(f64::NAN)
        ),
        None,
    );
    bench.report.target(
        "≥ 10,000 durable registrations/s",
        format!("{}/s", rate(registered.rate)),
        Some(registered.rate >= 10_000.0),
    );
    bench.report.target(
        "projector lag p99 < 1 s while registering",
        format!("{:.0} ms", registered.lag_p99_ms),
        Some(registered.lag_p99_ms < 1_000.0),
    );
    bench
        .report
        .scenarios
        .insert("registration".into(), registered.json.clone());
    let population = registered.population;

    if wants(&bench.options, Scenario::Discovery) {
        let channels = api::channels(&registryd.address, sizes.connections).await?;
        let mut levels = Vec::new();
        let mut best: Option<LoadResult> = None;
        for &concurrency in &sizes.discovery_concurrency {
            eprintln!("bench: discovery, {concurrency} in flight");
            let result = api::discover(
                &channels,
                &population,
                &processes,
                concurrency,
                sizes.window,
                false,
            )
            .await?;
            bench.report.row(
                "discovery",
                format!(
                    "Discover healthy, {} in flight ({} instances/service)",
                    concurrency,
                    sizes.instances / sizes.services
                ),
                load_text(&result, ""),
                Some(&result.cpu),
            );
            if best
                .as_ref()
                .is_none_or(|b| result.calls_per_second > b.calls_per_second)
            {
                best = Some(result.clone());
            }
            levels.push(result);
        }
        let concurrency = *sizes.discovery_concurrency.last().unwrap_or(&1);
        let singles = api::register_singles(&clients, sizes.services).await?;
        let single = api::discover(
            &channels,
            &singles,
            &processes,
            concurrency,
            sizes.window,
            false,
        )
        .await?;
        bench.report.row(
            "discovery",
            format!("Discover on 1-instance services, {concurrency} in flight"),
            load_text(&single, ""),
            Some(&single.cpu),
        );
        let not_modified = api::discover(
            &channels,
            &population,
            &processes,
            concurrency,
            sizes.window,
            true,
        )
        .await?;
        bench.report.row(
            "discovery",
            format!("Discover with current revision (not modified), {concurrency} in flight"),
            load_text(&not_modified, ""),
            Some(&not_modified.cpu),
        );
        if let Some(best) = &best {
            bench.report.target(
                "≥ 50,000 Discover calls/s (100,000 instances, 1,000 services)",
                format!(
                    "{}/s, p99 {:.1} ms",
                    rate(best.calls_per_second),
                    best.latency.p99_ms
                ),
                Some(best.calls_per_second >= 50_000.0),
            );
        }
        bench.report.scenarios.insert(
            "discovery".into(),
            json!({ "levels": levels, "single_instance_services": single, "not_modified": not_modified }),
        );
    }

    let mut unary = Vec::new();
    if wants(&bench.options, Scenario::Unary) || wants(&bench.options, Scenario::Etcd) {
        for &concurrency in &sizes.unary_concurrency {
            eprintln!("bench: unary heartbeats, {concurrency} in flight");
            let result = api::unary_heartbeats(
                &clients,
                &population,
                &processes,
                sizes.unary_leases,
                concurrency,
                sizes.window,
            )
            .await?;
            bench.report.row(
                "unary",
                format!(
                    "Heartbeat, {concurrency} in flight ({} leases)",
                    sizes.unary_leases
                ),
                load_text(&result, ""),
                Some(&result.cpu),
            );
            unary.push(result);
        }
        bench.report.scenarios.insert(
            "unary_heartbeats".into(),
            json!({
                "leases": sizes.unary_leases,
                "connections": sizes.connections,
                "levels": unary,
            }),
        );
    }

    if wants(&bench.options, Scenario::Batched) {
        eprintln!("bench: batched and streamed heartbeats");
        let batched = api::batched_heartbeats(
            &clients,
            &population,
            &processes,
            sizes.batch_size,
            sizes.batch_concurrency,
            sizes.window,
        )
        .await?;
        bench.report.row(
            "batched",
            format!(
                "BatchHeartbeat of {}, {} in flight",
                sizes.batch_size, sizes.batch_concurrency
            ),
            format!(
                "{} renewals/s · batch {}",
                rate(batched.items_per_second),
                latency_text(&batched.latency)
            ),
            Some(&batched.cpu),
        );
        let streamed = api::streamed_heartbeats(
            &clients,
            &population,
            &processes,
            sizes.batch_size,
            sizes.streams,
            sizes.stream_in_flight,
            sizes.window,
        )
        .await?;
        bench.report.row(
            "batched",
            format!(
                "StreamHeartbeats: {} streams, batches of {}, {} in flight each",
                sizes.streams, sizes.batch_size, sizes.stream_in_flight
            ),
            format!(
                "{} renewals/s · batch {}",
                rate(streamed.renewals_per_second),
                latency_text(&streamed.batch_latency)
            ),
            Some(&streamed.cpu),
        );
        let best = batched.items_per_second.max(streamed.renewals_per_second);
        bench.report.target(
            "≥ 100,000 lease renewals/s (batched or streamed)",
            format!("{}/s", rate(best)),
            Some(best >= 100_000.0),
        );
        bench.report.scenarios.insert(
            "batched_heartbeats".into(),
            json!({ "batch": batched, "stream": streamed }),
        );
    }

    if wants(&bench.options, Scenario::Watch) {
        eprintln!("bench: watch latency");
        let pause = Duration::from_millis(5);
        let idle =
            api::watch_latency(&registryd.address, &clients[0], sizes.watch_changes, pause).await?;
        let summary: stats::Summary =
            serde_json::from_value(idle["change_to_consumer_cache"].clone()).unwrap_or_default();
        bench.report.row(
            "watch",
            format!(
                "UpdateInstance -> SDK Consumer cache, idle ({} changes)",
                sizes.watch_changes
            ),
            latency_text(&summary),
            None,
        );
        // The same under load: unary heartbeats at the highest concurrency in the background.
        let background_concurrency = *sizes.unary_concurrency.last().unwrap_or(&1);
        let background = {
            let clients = clients.clone();
            let population = population.clone();
            let processes = processes.clone();
            let leases = sizes.unary_leases;
            let window = Window {
                warmup: Duration::ZERO,
                measure: sizes.window.measure * 3,
            };
            tokio::spawn(async move {
                api::unary_heartbeats(
                    &clients,
                    &population,
                    &processes,
                    leases,
                    background_concurrency,
                    window,
                )
                .await
            })
        };
        tokio::time::sleep(sizes.window.warmup).await;
        let loaded =
            api::watch_latency(&registryd.address, &clients[0], sizes.watch_changes, pause).await?;
        let background = background.await??;
        let loaded_summary: stats::Summary =
            serde_json::from_value(loaded["change_to_consumer_cache"].clone()).unwrap_or_default();
        bench.report.row(
            "watch",
            format!(
                "the same under unary heartbeat load ({background_concurrency} in flight, {}/s)",
                rate(background.calls_per_second)
            ),
            latency_text(&loaded_summary),
            None,
        );
        let worst = summary.p99_ms.max(loaded_summary.p99_ms);
        bench.report.target(
            "watch latency p99 ≤ 50 ms",
            format!(
                "idle {:.1} ms · loaded {:.1} ms",
                summary.p99_ms, loaded_summary.p99_ms
            ),
            Some(worst <= 50.0),
        );
        bench.report.scenarios.insert(
            "watch".into(),
            json!({ "idle": idle, "under_load": loaded, "background_load": background }),
        );
    }
    Ok(unary)
}

async fn etcd_group(bench: &mut Bench, unary: &[LoadResult]) -> Result<()> {
    let driver = etcd::driver_binary();
    let etcd_binary = etcd::etcd_binary();
    let protoc = etcd::protoc_available();
    let binary = match etcd_binary {
        Some(binary) if protoc && driver.is_file() => binary,
        _ => {
            let mut missing = Vec::new();
            if etcd_binary.is_none() {
                missing.push("etcd (Debian etcd-server)".to_owned());
            }
            if !protoc {
                missing.push("protoc and libprotobuf-dev (to build the etcd driver)".to_owned());
            } else if !driver.is_file() {
                missing.push(format!(
                    "the etcd driver {} (cargo xtask bench builds it)",
                    driver.display()
                ));
            }
            let message = format!(
                "{} missing; install: {}",
                missing.join(" and "),
                etcd::INSTALL
            );
            eprintln!("bench: the etcd peer cannot run: {message}");
            bench.report.row(
                "etcd",
                "lease keep-alives (the peer)",
                format!("MISSING: {message}"),
                None,
            );
            bench
                .report
                .scenarios
                .insert("etcd".into(), json!({ "missing": message }));
            if bench.options.smoke {
                bench
                    .report
                    .notes
                    .push(format!("etcd peer skipped: {message}"));
                return Ok(());
            }
            bail!("the etcd peer is part of a full run: {message}");
        }
    };
    eprintln!("bench: etcd lease keep-alives");
    let etcd = etcd::Etcd::start(&binary, &bench.logs)?;
    let sizes = &bench.sizes;
    let mut levels = Vec::new();
    for (index, &concurrency) in sizes.unary_concurrency.iter().enumerate() {
        let processes = bench.processes.clone();
        let driver = driver.clone();
        let connections = sizes.connections.min(concurrency);
        let (leases, window) = (sizes.unary_leases, sizes.window);
        let result = tokio::task::block_in_place(|| {
            etcd::keep_alives(
                &driver,
                &etcd,
                &processes,
                leases,
                concurrency,
                connections,
                window,
            )
        })?;
        let etcd_rate = result["calls_per_second"].as_f64().unwrap_or(0.0);
        let etcd_latency: stats::Summary =
            serde_json::from_value(result["latency"].clone()).unwrap_or_default();
        let cpu: Option<CpuUse> = serde_json::from_value(result["cpu"].clone()).ok();
        bench.report.row(
            "etcd",
            format!("lease keep-alive, {concurrency} in flight ({leases} leases)"),
            format!("{}/s · {}", rate(etcd_rate), latency_text(&etcd_latency)),
            cpu.as_ref(),
        );
        let ours = unary.get(index);
        if let Some(ours) = ours {
            let ratio = ours.calls_per_second / etcd_rate.max(1e-9);
            bench.report.row(
                "etcd",
                format!("  ours / etcd at {concurrency} in flight"),
                format!(
                    "{ratio:.2}x ({}/s vs {}/s; p99 {:.2} vs {:.2} ms)",
                    rate(ours.calls_per_second),
                    rate(etcd_rate),
                    ours.latency.p99_ms,
                    etcd_latency.p99_ms
                ),
                None,
            );
        }
        levels.push(json!({
            "etcd": result,
            "ours": ours,
            "ratio": ours.map(|ours| ours.calls_per_second / etcd_rate.max(1e-9)),
        }));
    }
    drop(etcd);
    // The comparison point is the highest concurrency (the published anchor's 200 leases).
    if let Some(last) = levels.last() {
        let ratio = last["ratio"].as_f64();
        let ours_p99 = last["ours"]["latency"]["p99_ms"].as_f64();
        if let Some(ratio) = ratio {
            bench.report.target(
                "unary heartbeats ≥ 2x etcd keep-alives (same run)",
                format!("{ratio:.2}x at {} in flight", last["etcd"]["concurrency"]),
                Some(ratio >= 2.0),
            );
        }
        if let Some(p99) = ours_p99 {
            bench.report.target(
                "unary heartbeat p99 < 10 ms (same point)",
                format!("{p99:.2} ms"),
                Some(p99 < 10.0),
            );
        }
    }
    bench.report.scenarios.insert(
        "etcd".into(),
        json!({ "version": etcd::etcd_binary().and_then(|b| Command::new(b).arg("--version").output().ok()).map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").to_owned()), "levels": levels }),
    );
    Ok(())
}

async fn detection_group(bench: &mut Bench) -> Result<()> {
    let (registryd, prefix, database, _) = start_registryd(
        bench,
        "detection",
        &["--no-self-preservation", "--delete-timeout", "1h"],
    )
    .await?;
    let mut processes = bench.processes.clone();
    processes.set("registryd", registryd.pid(), Scope::Own);
    let plan = bench.sizes.detection;
    eprintln!(
        "bench: detection: {} leases, TTL {} ms, stops spread over {:?}",
        plan.leases, plan.ttl_ms, plan.stop_spread
    );
    let result = detection::run(
        &registryd.address,
        &bench.backends.nats_url,
        &prefix,
        registryd.pid(),
        &processes,
        plan,
    )
    .await;
    let _ = tokio::task::spawn_blocking(move || registryd.terminate()).await;
    cleanup(
        &bench.backends.nats_url,
        &bench.backends.admin_database_url,
        &prefix,
        &database,
    )
    .await;
    let result = result?;
    let lateness = &result["lateness_observed_ms"];
    let decided = &result["lateness_decided_ms"];
    let cpu: Option<CpuUse> = serde_json::from_value(result["cpu"].clone()).ok();
    bench.report.row(
        "detection",
        format!(
            "TurnedUnhealthy at a subscriber - deadline ({} leases, TTL {} ms)",
            plan.leases, plan.ttl_ms
        ),
        format!(
            "p50 {:.1} ms · p99 {:.1} ms · max {:.1} ms; {} of {} seen, {} premature",
            lateness["p50_ms"].as_f64().unwrap_or(f64::NAN),
            lateness["p99_ms"].as_f64().unwrap_or(f64::NAN),
            lateness["max_ms"].as_f64().unwrap_or(f64::NAN),
            result["transitions_observed"],
            plan.leases,
            result["premature_transitions"]
        ),
        cpu.as_ref(),
    );
    if result["all_observed"] != json!(true) {
        bench.report.row(
            "detection",
            "  a write after the run",
            result["registration_after_the_run"].as_str().unwrap_or(""),
            None,
        );
    }
    bench.report.row(
        "detection",
        "  engine decision (occurred_at - deadline)",
        format!(
            "p50 {:.0} ms · p99 {:.0} ms · max {:.0} ms",
            decided["p50_ms"].as_f64().unwrap_or(f64::NAN),
            decided["p99_ms"].as_f64().unwrap_or(f64::NAN),
            decided["max_ms"].as_f64().unwrap_or(f64::NAN)
        ),
        None,
    );
    if let (Some(before), Some(with)) = (
        result["registryd_rss_bytes_before_registration"].as_u64(),
        result["registryd_rss_bytes_with_leases"].as_u64(),
    ) {
        bench.report.row(
            "memory",
            format!(
                "registryd all RSS, {} leases registered over gRPC",
                plan.leases
            ),
            format!(
                "{:.0} MiB ({:.0} B per lease over the idle process)",
                with as f64 / f64::from(1u32 << 20),
                with.saturating_sub(before) as f64 / plan.leases as f64
            ),
            None,
        );
    }
    let p99 = lateness["p99_ms"].as_f64().unwrap_or(f64::INFINITY);
    let complete = result["all_observed"].as_bool().unwrap_or(false)
        && result["premature_transitions"].as_u64() == Some(0);
    bench.report.target(
        "detection lateness p99 ≤ 50 ms",
        format!(
            "{p99:.1} ms{}",
            if complete {
                ""
            } else {
                " (incomplete or premature)"
            }
        ),
        Some(p99 <= 50.0 && complete),
    );
    bench.report.scenarios.insert("detection".into(), result);
    Ok(())
}

async fn memory_group(bench: &mut Bench) -> Result<()> {
    let suffix = suffix();
    let setup = memory::Setup {
        binary: &bench.registryd,
        nats_url: &bench.backends.nats_url,
        admin_database_url: &bench.backends.admin_database_url,
        logs: &bench.logs,
        suffix: &suffix,
    };
    eprintln!("bench: memory at {:?} leases", bench.sizes.memory_leases);
    let result = memory::run(&setup, &bench.sizes.memory_leases).await?;
    let mut worst_engine = None;
    for level in result["levels"].as_array().into_iter().flatten() {
        let engine = level["engine_bytes_per_lease"].as_f64().unwrap_or(f64::NAN);
        bench.report.row(
            "memory",
            format!(
                "registryd engine RSS, {} leases (replayed)",
                level["leases"]
            ),
            format!(
                "{:.0} MiB · {engine:.0} B per lease over the empty process",
                level["engine_rss_bytes"].as_f64().unwrap_or(0.0) / f64::from(1u32 << 20)
            ),
            None,
        );
        bench.report.row(
            "memory",
            format!(
                "registryd api RSS, {} instances (replayed)",
                level["leases"]
            ),
            format!(
                "{:.0} MiB · {:.0} B per instance over the empty process",
                level["api_rss_bytes"].as_f64().unwrap_or(0.0) / f64::from(1u32 << 20),
                level["api_bytes_per_lease"].as_f64().unwrap_or(f64::NAN)
            ),
            None,
        );
        bench.report.row(
            "memory",
            format!("registryd all RSS, {} leases (replayed)", level["leases"]),
            format!(
                "{:.0} MiB · {:.0} B per lease over the empty process",
                level["server_rss_bytes"].as_f64().unwrap_or(0.0) / f64::from(1u32 << 20),
                level["server_bytes_per_lease"].as_f64().unwrap_or(f64::NAN)
            ),
            None,
        );
        worst_engine = Some((level["leases"].clone(), engine));
    }
    if let Some((leases, engine)) = worst_engine {
        let core = bench
            .report
            .scenarios
            .get("lease_bench")
            .and_then(|lease| lease["bytes_per_lease_rss"].as_f64());
        bench.report.target(
            "≤ 200 bytes per lease in the health engine",
            format!(
                "{engine:.0} B (registryd engine, {leases}){}",
                core.map(|core| format!("; core {core:.0} B"))
                    .unwrap_or_default()
            ),
            Some(engine <= 200.0),
        );
    }
    bench.report.scenarios.insert("memory".into(), result);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_grouped_by_thousands() {
        assert_eq!(rate(0.4), "0");
        assert_eq!(rate(999.0), "999");
        assert_eq!(rate(12_345.6), "12,346");
        assert_eq!(rate(1_000_000.0), "1,000,000");
    }
}
