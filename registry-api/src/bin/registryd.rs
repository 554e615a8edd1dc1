//! `registryd`: the registry server.
//!
//! By default one process runs the gRPC API, the health engine and the PostgreSQL projector.
//! Subcommands run each part on its own, for scaling out, and operate the projection
//! (`projector --rebuild`, `check`). Every option can also be set by environment variable.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use event_log::{EventLog, JetStreamConfig, JetStreamLog, MemoryLog, Streams};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// The service registry and health-check control plane.
#[derive(Debug, Parser)]
#[command(name = "registryd", version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    options: Options,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Clone, clap::Args)]
struct Options {
    /// NATS server(s) with JetStream, comma-separated.
    #[arg(
        long,
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        global = true
    )]
    nats_url: String,
    /// PostgreSQL database of the projection (created tables: schema `registry`).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/registry",
        global = true
    )]
    database_url: String,
    /// Address of the gRPC API.
    #[arg(
        long,
        env = "REGISTRY_LISTEN",
        default_value = "127.0.0.1:50051",
        global = true
    )]
    listen: SocketAddr,
    /// Prefix of the JetStream streams and subjects (`<prefix>.evt.>`, `<PREFIX>_EVENTS`).
    #[arg(
        long,
        env = "REGISTRY_STREAM_PREFIX",
        default_value = "registry",
        global = true
    )]
    stream_prefix: String,
    /// Run without NATS and PostgreSQL: an in-memory event log and no projection. Nothing is
    /// persisted; for trying things out.
    #[arg(long, env = "REGISTRY_EMBEDDED", global = true)]
    embedded: bool,
    /// An instance turns unhealthy after this many TTLs without a heartbeat.
    #[arg(
        long,
        env = "REGISTRY_UNHEALTHY_RATIO",
        default_value_t = 3.0,
        global = true
    )]
    unhealthy_ratio: f64,
    /// An unhealthy ephemeral instance is removed this long after its unhealthy deadline.
    #[arg(long, env = "REGISTRY_DELETE_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration, global = true)]
    delete_timeout: Duration,
    /// Disable self-preservation (the engine then expires leases even when a large share of
    /// the fleet seems to die at once).
    #[arg(long, env = "REGISTRY_NO_SELF_PRESERVATION", global = true)]
    no_self_preservation: bool,
    /// Directory for local state: the health engine's lease snapshot, which bounds the replay
    /// at start-up to the history since the last snapshot. Without it every start replays the
    /// whole events stream. The snapshot is a cache of the log, never a source of truth.
    #[arg(long, env = "REGISTRY_DATA_DIR", global = true)]
    data_dir: Option<std::path::PathBuf>,
    /// Log format.
    #[arg(long, env = "REGISTRY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Subcommand)]
enum Command {
    /// API, health engine and projector in one process (the default).
    All,
    /// The gRPC API only.
    Api,
    /// The health engine only.
    Engine,
    /// The PostgreSQL projector only.
    Projector {
        /// Rebuild the tables from the start of the event stream into fresh tables, swap them
        /// in, and exit.
        #[arg(long)]
        rebuild: bool,
    },
    /// Fold the event stream independently, compare it with the PostgreSQL tables, print every
    /// difference, and exit non-zero if there is any.
    Check,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn connect_log(options: &Options) -> Result<Arc<dyn EventLog>> {
    let streams = Streams::new(&options.stream_prefix);
    if options.embedded {
        eprintln!(
            "registryd: EMBEDDED MODE: in-memory event log, no PostgreSQL projection. \
             NOTHING IS PERSISTED: every registration is lost when this process stops."
        );
        return Ok(Arc::new(MemoryLog::new(streams)));
    }
    let log = JetStreamLog::connect(&options.nats_url, streams, JetStreamConfig::default())
        .await
        .with_context(|| format!("connecting to NATS at {}", options.nats_url))?;
    log.ensure_streams()
        .await
        .context("creating the JetStream streams")?;
    Ok(Arc::new(log))
}

fn engine_config(options: &Options) -> health_engine::Config {
    let mut config = health_engine::Config {
        unhealthy_ratio: options.unhealthy_ratio,
        delete_timeout: options.delete_timeout,
        ..health_engine::Config::default()
    };
    config.self_preservation.enabled = !options.no_self_preservation;
    config.snapshot_path = options
        .data_dir
        .as_ref()
        .map(|dir| dir.join(format!("engine-{}.snapshot", options.stream_prefix)));
    config
}

async fn shutdown_signal(shutdown: CancellationToken) {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
        () = shutdown.cancelled() => return,
    }
    tracing::info!("shutting down");
    shutdown.cancel();
}

async fn run(cli: Cli) -> Result<()> {
    let options = cli.options;
    let command = cli.command.unwrap_or(Command::All);
    if options.embedded && !matches!(command, Command::All | Command::Api) {
        bail!("--embedded only runs the API and the health engine in one process (`all` or `api`)");
    }
    let log = connect_log(&options).await?;
    let store_config = store::Config::new(&options.database_url);
    match command {
        Command::Projector { rebuild: true } => {
            store::migrate(&options.database_url).await?;
            let summary = store::rebuild(&store_config, log.as_ref()).await?;
            println!("{summary}");
            return Ok(());
        }
        Command::Check => {
            let report = store::check(&store_config, log.as_ref()).await?;
            println!("{report}");
            if !report.is_consistent() {
                bail!("the tables differ from the event stream");
            }
            return Ok(());
        }
        _ => {}
    }
    let run_api = matches!(command, Command::All | Command::Api);
    let run_engine = matches!(command, Command::All | Command::Engine)
        || (options.embedded && matches!(command, Command::Api));
    let run_projector =
        matches!(command, Command::All | Command::Projector { .. }) && !options.embedded;

    let shutdown = CancellationToken::new();
    tokio::spawn(shutdown_signal(shutdown.clone()));
    let mut tasks: JoinSet<(&'static str, Result<()>)> = JoinSet::new();
    if run_projector {
        store::migrate(&options.database_url)
            .await
            .with_context(|| format!("migrating {}", options.database_url))?;
        let projector = store::Projector::new(store_config, Arc::clone(&log));
        let token = shutdown.clone();
        tasks.spawn(async move { ("projector", projector.run(token).await.map_err(Into::into)) });
    }
    if run_engine {
        if let Some(dir) = &options.data_dir {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the data directory {}", dir.display()))?;
        }
        let engine = health_engine::HealthEngine::new(engine_config(&options), Arc::clone(&log))?;
        let token = shutdown.clone();
        tasks.spawn(async move { ("health engine", engine.run(token).await.map_err(Into::into)) });
    }
    if run_api {
        let config = registry_api::Config {
            listen: options.listen,
            ..Default::default()
        };
        let server = registry_api::Server::bind(config, Arc::clone(&log))
            .await
            .with_context(|| format!("listening on {}", options.listen))?;
        println!("registryd: gRPC API listening on {}", server.local_addr()?);
        let token = shutdown.clone();
        tasks.spawn(async move { ("api", server.run(token).await.map_err(Into::into)) });
    }
    let parts: Vec<&str> = [
        (run_api, "api"),
        (run_engine, "health engine"),
        (run_projector, "projector"),
    ]
    .into_iter()
    .filter_map(|(on, name)| on.then_some(name))
    .collect();
    tracing::info!(parts = ?parts, nats = %options.nats_url, embedded = options.embedded, "registryd started");

    let mut failure = None;
    while let Some(joined) = tasks.join_next().await {
        let (name, result) = joined.context("a component panicked")?;
        match result {
            Ok(()) if shutdown.is_cancelled() => tracing::info!(component = name, "stopped"),
            Ok(()) => {
                tracing::error!(component = name, "stopped unexpectedly; shutting down");
                failure.get_or_insert_with(|| anyhow::anyhow!("{name} stopped unexpectedly"));
                shutdown.cancel();
            }
            Err(error) => {
                tracing::error!(component = name, error = %format!("{error:#}"), "failed; shutting down");
                failure.get_or_insert(error.context(format!("{name} failed")));
                shutdown.cancel();
            }
        }
    }
    match failure {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(cli.options.log_format);
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("registryd: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
