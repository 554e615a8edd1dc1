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
    // `cargo run` gives us its package variables; passed on to a nested cargo they make build
    // scripts (ring's among them) think their inputs changed and rebuild half the tree.
    for (name, _) in std::env::vars() {
        if name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_MANIFEST_")
            || name.starts_with("CARGO_BIN_")
            || matches!(
                name.as_str(),
                "OUT_DIR" | "CARGO_CRATE_NAME" | "CARGO_PRIMARY_PACKAGE"
            )
        {
            command.env_remove(name);
        }
    }
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
    // Ctrl-C reaches registryd too (same process group) and it shuts down gracefully; we must
    // outlive it to remove any private servers, so Ctrl-C does not stop us while it runs.
    let runtime = tokio::runtime::Runtime::new()?;
    let status = runtime.block_on(async move {
        let mut child = tokio::process::Command::from(command)
            .spawn()
            .context("running registryd")?;
        loop {
            tokio::select! {
                status = child.wait() => return status.context("waiting for registryd"),
                _ = tokio::signal::ctrl_c() => eprintln!("xtask: waiting for registryd to stop"),
            }
        }
    })?;
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

/// `docker-compose.yml` cannot be run here (no Docker engine), but a compose client checks it
/// against the compose schema without one: `docker compose` (plugin) or `docker-compose`.
fn validate_compose() -> Result<()> {
    // (program, its compose sub-command prefix)
    let clients: [(&str, &[&str]); 2] = [("docker", &["compose"]), ("docker-compose", &[])];
    for (program, prefix) in clients {
        let available = Command::new(program)
            .args(prefix)
            .arg("version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        if available {
            let mut check = Command::new(program);
            check
                .args(prefix)
                .args(["-f", "docker-compose.yml", "config", "-q"])
                .current_dir(root());
            return run(
                check,
                &format!("{program} config: docker-compose.yml is valid"),
            );
        }
    }
    eprintln!(
        "xtask: SKIPPED docker-compose.yml validation: no compose client \
         (apt-get install -y docker-compose)"
    );
    Ok(())
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
    validate_compose()?;

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

/// mimalloc, as registryd uses: the bench's load generator shares the cores with what it
/// measures, and glibc malloc was a tenth of its time under Discover load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
