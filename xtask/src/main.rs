//! `cargo xtask`: the one entry point for developer workflows.
//!
//! * `up`: provide NATS and PostgreSQL (see [`xtask::harness`]) and run `registryd` in the
//!   foreground; without them, run it in embedded mode.
//! * `ci`: formatting, clippy, every test against real NATS and PostgreSQL, then `e2e`, then
//!   `bench --smoke`.
//! * `e2e`: a black-box scenario with real processes and an independent downstream subscriber.
//! * `bench [--smoke]`: the benchmarks of issue 8 in release mode, next to etcd (see [`bench`]).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use xtask::harness::Services;

mod bench;
mod e2e;
mod process;

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    about = "Developer workflows for the registry workspace"
)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Provide NATS and PostgreSQL and run registryd in the foreground (Ctrl-C stops both).
    Up {
        /// Skip NATS and PostgreSQL: in-memory event log, nothing persisted.
        #[arg(long)]
        embedded: bool,
        /// Further arguments for registryd (after `--`).
        #[arg(last = true)]
        registryd_args: Vec<String>,
    },
    /// Everything CI checks: fmt, clippy, all tests against real services, e2e, bench --smoke.
    Ci,
    /// The black-box end-to-end scenario against real NATS, PostgreSQL and registryd.
    E2e,
    /// Benchmarks in release mode against real NATS and PostgreSQL, next to etcd; writes
    /// results/<time>-<mode>.json.
    Bench(bench::Options),
}

/// The workspace root.
pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn cargo() -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.current_dir(root());
    command
}

fn run(mut command: Command, what: &str) -> Result<()> {
    eprintln!("xtask: {what}");
    let status = command
        .status()
        .with_context(|| format!("starting: {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

fn up(embedded: bool, registryd_args: Vec<String>) -> Result<()> {
    let registryd = process::build_registryd()?;
    let services = if embedded {
        None
    } else {
        match Services::provide() {
            Ok(services) => Some(services),
            Err(error) => {
                eprintln!(
                    "xtask: no NATS/PostgreSQL ({error:#}).\nxtask: falling back to EMBEDDED \
                     mode: in-memory, NOTHING IS PERSISTED."
                );
                None
            }
        }
    };
    let mut command = Command::new(registryd);
    match &services {
        Some(services) => {
            eprintln!("{}", services.describe());
            let runtime = tokio::runtime::Runtime::new()?;
            let database_url =
                runtime.block_on(process::ensure_database(&services.database_url, "registry"))?;
            command
                .env("NATS_URL", &services.nats_url)
                .env("DATABASE_URL", database_url);
        }
        None => {
            command.arg("--embedded");
        }
    }
    command.args(registryd_args);
    // Ctrl-C reaches registryd too (same process group); it shuts down gracefully and we
    // then remove any private servers.
    let status = command.status().context("running registryd")?;
    drop(services);
    if !status.success() {
        bail!("registryd exited with {status}");
    }
    Ok(())
}

fn has_nextest() -> bool {
    cargo()
        .args(["nextest", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

fn ci() -> Result<()> {
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    run(fmt, "cargo fmt --check")?;
    let mut clippy = cargo();
    clippy.args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    run(clippy, "cargo clippy -D warnings")?;

    // One set of services for the whole run: tests borrow them through NATS_URL and
    // DATABASE_URL and isolate themselves (own streams, own databases).
    let services = Services::provide()?;
    eprintln!("{}", services.describe());
    let mut tests = cargo();
    if has_nextest() {
        tests.args(["nextest", "run", "--workspace", "--no-fail-fast"]);
    } else {
        tests.args(["test", "--workspace"]);
    }
    tests
        .env("NATS_URL", &services.nats_url)
        .env("DATABASE_URL", &services.database_url);
    run(tests, "all tests against real NATS and PostgreSQL")?;
    e2e::run(&services)?;
    drop(services);
    // The benchmarks must keep running end to end (tiny sizes, no performance assertion).
    bench::run(bench::Options::smoke())?;
    eprintln!("xtask: ci passed");
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::Up {
            embedded,
            registryd_args,
        } => up(embedded, registryd_args),
        Task::Ci => ci(),
        Task::E2e => Services::provide().and_then(|services| {
            eprintln!("{}", services.describe());
            e2e::run(&services)
        }),
        Task::Bench(options) => bench::run(options),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: {error:#}");
            ExitCode::FAILURE
        }
    }
}
