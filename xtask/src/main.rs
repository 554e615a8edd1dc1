//! `cargo xtask`: the one entry point for developer workflows.
//!
//! * `up`: provide NATS and PostgreSQL (see [`xtask::harness`]) and run `registryd` in the
//!   foreground; without them, run it in embedded mode.
//! * `ci`: formatting, clippy, every test against real NATS and PostgreSQL, then `e2e`.
//! * `e2e`: a black-box scenario with real processes and an independent downstream subscriber.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use xtask::harness::Services;

mod e2e;

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
    /// Everything CI checks: fmt, clippy, all tests against real services, then e2e.
    Ci,
    /// The black-box end-to-end scenario against real NATS, PostgreSQL and registryd.
    E2e,
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

/// Builds registryd and returns its path.
pub(crate) fn build_registryd() -> Result<PathBuf> {
    let mut build = cargo();
    build.args([
        "build",
        "--quiet",
        "-p",
        "registry-api",
        "--bin",
        "registryd",
    ]);
    run(build, "building registryd")?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    Ok(target.join("debug").join("registryd"))
}

/// Creates database `name` on the server of `admin_url` unless it exists; returns its URL.
pub(crate) async fn ensure_database(admin_url: &str, name: &str) -> Result<String> {
    let (client, connection) = tokio_postgres::connect(admin_url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connecting to {admin_url}"))?;
    tokio::spawn(connection);
    let exists = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await?
        .is_some();
    if !exists {
        client
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await?;
    }
    xtask::harness::database_url_for(admin_url, name)
}

fn up(embedded: bool, registryd_args: Vec<String>) -> Result<()> {
    let registryd = build_registryd()?;
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
                runtime.block_on(ensure_database(&services.database_url, "registry"))?;
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
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: {error:#}");
            ExitCode::FAILURE
        }
    }
}
