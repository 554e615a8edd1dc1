//! `registryd`: the registry server.
//!
//! By default one process runs the gRPC API, the health engine and the PostgreSQL projector.
//! Subcommands run each part on its own, for scaling out, and operate the projection
//! (`projector --rebuild`, `check`). Settings are layered (defaults < file < environment <
//! flags, see [`registry_api::settings`]) and logged at start-up with secrets masked.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use event_log::{EventLog, JetStreamConfig, JetStreamLog, MemoryLog, Streams};
use registry_api::instrumented_log::InstrumentedLog;
use registry_api::settings::{self, Environment, MetricsListen, Settings};
use registry_api::telemetry::Telemetry;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// mimalloc instead of glibc malloc: under load glibc's allocator (malloc, free,
/// consolidation) took about a third of registryd's CPU on the Discover and registration
/// paths; with mimalloc registryd used 25-60 % less CPU per Discover and about 20 % less per
/// registration (`cargo xtask bench`, BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The service registry and health-check control plane.
///
/// Settings come from, each overriding the one before: built-in defaults, the TOML file of
/// `--config`, environment variables, then flags. The effective settings are logged at start-up
/// with secrets masked.
#[derive(Debug, Parser)]
#[command(
    name = "registryd",
    version,
    after_long_help = AFTER_HELP,
    after_help = "More on configuration, logging, metrics and tracing: --help."
)]
struct Cli {
    /// TOML configuration file; its keys are the option names with `_` (`nats_url = "..."`,
    /// `delete_timeout = "30s"`). Environment variables and flags override it.
    #[arg(long, env = settings::CONFIG_FILE_VARIABLE, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: Settings,
    #[command(subcommand)]
    command: Option<Command>,
}

const AFTER_HELP: &str = "\
Configuration layering: defaults < file (--config) < environment < flags. Every option has a
file key (its name with `_`) and an environment variable (shown above); an empty variable counts
as unset.

Logging: RUST_LOG sets the level and filters (default `info`, e.g.
`RUST_LOG=info,health_engine=debug`); --log-format json prints one JSON object per line.

Metrics: OpenTelemetry instruments, served in Prometheus text format at
http://<metrics-listen>/metrics.

Tracing (OpenTelemetry, W3C trace context carried in gRPC and NATS headers) is off, at no cost,
unless OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) names an OTLP/gRPC
collector, e.g. http://127.0.0.1:4317. The other standard variables apply: OTEL_SERVICE_NAME
(default registryd), OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG,
OTEL_EXPORTER_OTLP_HEADERS, OTEL_EXPORTER_OTLP_TIMEOUT, OTEL_BSP_SCHEDULE_DELAY;
OTEL_TRACES_EXPORTER=none turns export off.";

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

async fn connect_log(options: &Settings) -> Result<Arc<dyn EventLog>> {
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
        .with_context(|| {
            format!(
                "connecting to NATS at {}",
                settings::mask_secrets(&options.nats_url)
            )
        })?;
    log.ensure_streams()
        .await
        .context("creating the JetStream streams")?;
    Ok(Arc::new(log))
}

/// Serves `/metrics` until `shutdown`. The default address is best effort (several registryd
/// processes on one host, as in tests, cannot all have it); an address set explicitly must be
/// free.
async fn serve_metrics(
    options: &Settings,
    telemetry: &Telemetry,
    shutdown: CancellationToken,
) -> Result<()> {
    let MetricsListen::At(address) = options.metrics_listen else {
        return Ok(());
    };
    let endpoint =
        match registry_api::metrics::Endpoint::bind(address, telemetry.prometheus()).await {
            Ok(endpoint) => endpoint,
            Err(error) if options.metrics_listen == Settings::default().metrics_listen => {
                tracing::warn!(%address, %error,
                    "metrics endpoint not started: the default address is taken \
                     (set --metrics-listen to serve /metrics elsewhere)");
                return Ok(());
            }
            Err(error) => {
                return Err(error).with_context(|| format!("metrics endpoint on {address}"));
            }
        };
    println!("registryd: metrics listening on {}", endpoint.local_addr()?);
    tokio::spawn(endpoint.run(shutdown));
    Ok(())
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

async fn run(options: Settings, command: Option<Command>, telemetry: &Telemetry) -> Result<()> {
    let command = command.unwrap_or(Command::All);
    if options.embedded && !matches!(command, Command::All | Command::Api) {
        bail!("--embedded only runs the API and the health engine in one process (`all` or `api`)");
    }
    let log: Arc<dyn EventLog> = Arc::new(InstrumentedLog::new(connect_log(&options).await?));
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
    serve_metrics(&options, telemetry, shutdown.clone()).await?;
    let mut tasks: JoinSet<(&'static str, Result<()>)> = JoinSet::new();
    if run_projector {
        store::migrate(&options.database_url)
            .await
            .with_context(|| {
                format!(
                    "migrating {}",
                    settings::mask_secrets(&options.database_url)
                )
            })?;
        let projector = store::Projector::new(store_config, Arc::clone(&log));
        registry_api::metrics::observe_projector(projector.handle());
        let token = shutdown.clone();
        tasks.spawn(async move { ("projector", projector.run(token).await.map_err(Into::into)) });
    }
    if run_engine {
        if let Some(dir) = &options.data_dir {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the data directory {}", dir.display()))?;
        }
        let engine = health_engine::HealthEngine::new(options.engine(), Arc::clone(&log))?;
        registry_api::metrics::observe_engine(engine.handle());
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
    tracing::info!(parts = ?parts, embedded = options.embedded, "registryd started");

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

/// Parses the command line and merges the settings' layers.
fn load() -> Result<(Cli, Settings)> {
    let matches = Cli::command().try_get_matches().unwrap_or_else(|error| {
        // clap reads the variables too (so that --help shows them) and rejects a bad value
        // naming only the flag; the environment layer's own error names the variable.
        if matches!(
            error.kind(),
            clap::error::ErrorKind::InvalidValue | clap::error::ErrorKind::ValueValidation
        ) && let Err(invalid) = Settings::load(
            None,
            Environment::from_process(),
            figment::value::Dict::new(),
        ) {
            eprintln!("registryd: {invalid}");
            std::process::exit(2);
        }
        error.exit()
    });
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|error| error.exit());
    let command_line =
        settings::command_line(&matches, &cli.settings).context("reading the command line")?;
    let settings = Settings::load(
        cli.config.as_deref(),
        Environment::from_process(),
        command_line,
    )?;
    Ok((cli, settings))
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let (cli, settings) = match load() {
        Ok(loaded) => loaded,
        Err(error) => {
            eprintln!("registryd: {error:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let telemetry = match registry_api::telemetry::init(settings.log_format) {
        Ok(telemetry) => telemetry,
        Err(error) => {
            eprintln!("registryd: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    settings.log(cli.config.as_deref());
    let result = run(settings, cli.command, &telemetry).await;
    telemetry.shutdown().await;
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("registryd: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(arguments: &[&str]) -> (Cli, figment::value::Dict) {
        let matches = Cli::command()
            .try_get_matches_from(arguments)
            .expect("arguments parse");
        let cli = Cli::from_arg_matches(&matches).expect("matches");
        let command_line = settings::command_line(&matches, &cli.settings).expect("flags");
        (cli, command_line)
    }

    #[test]
    fn only_options_typed_on_the_command_line_form_the_flag_layer() {
        let (cli, command_line) = parse(&[
            "registryd",
            "--stream-prefix",
            "typed",
            "projector",
            "--rebuild",
            "--no-self-preservation",
        ]);
        assert!(matches!(
            cli.command,
            Some(Command::Projector { rebuild: true })
        ));
        let mut keys: Vec<&str> = command_line.keys().map(String::as_str).collect();
        keys.sort_unstable();
        // Whatever clap filled in from the environment or its defaults is not a flag.
        assert_eq!(keys, ["no_self_preservation", "stream_prefix"]);
        let loaded = Settings::load(None, Environment::default(), command_line).expect("load");
        assert_eq!(loaded.stream_prefix, "typed");
        assert!(loaded.no_self_preservation);
    }

    #[test]
    fn flags_override_environment_and_file() {
        use std::io::Write as _;
        let mut file = tempfile::Builder::new()
            .suffix(".toml")
            .tempfile()
            .expect("file");
        writeln!(file, "listen = \"127.0.0.1:7001\"\ndelete_timeout = \"5s\"").expect("write");
        let (_, command_line) = parse(&["registryd", "--listen", "127.0.0.1:7003"]);
        let environment = Environment::from_vars([
            ("REGISTRY_LISTEN", "127.0.0.1:7002"),
            ("REGISTRY_DELETE_TIMEOUT", "7s"),
        ]);
        let loaded = Settings::load(Some(file.path()), environment, command_line).expect("load");
        assert_eq!(loaded.listen.to_string(), "127.0.0.1:7003");
        assert_eq!(loaded.delete_timeout, std::time::Duration::from_secs(7));
    }

    /// The defaults `--help` shows are the defaults the settings use.
    #[test]
    fn help_shows_the_real_defaults_and_every_variable() {
        let command = Cli::command();
        let defaults = figment::value::Value::serialize(Settings::default())
            .expect("serialize")
            .into_dict()
            .expect("dict");
        for (key, value) in &defaults {
            let argument = command
                .get_arguments()
                .find(|argument| argument.get_id() == key.as_str())
                .unwrap_or_else(|| panic!("no flag for {key}"));
            let shown: Vec<String> = argument
                .get_default_values()
                .iter()
                .map(|value| value.to_string_lossy().into_owned())
                .collect();
            let from_default = Settings::load(
                None,
                Environment::default(),
                shown
                    .first()
                    .map(|shown| {
                        [(key.clone(), figment::value::Value::from(shown.clone()))]
                            .into_iter()
                            .collect()
                    })
                    .unwrap_or_default(),
            )
            .expect("the shown default parses");
            assert_eq!(
                from_default,
                Settings::default(),
                "--{key} shows default {shown:?}, the settings use {value:?}"
            );
        }
        let help = Cli::command().render_long_help().to_string();
        for (variable, _) in settings::ENVIRONMENT {
            assert!(help.contains(variable), "--help does not name {variable}");
        }
        for variable in [settings::CONFIG_FILE_VARIABLE, "RUST_LOG"] {
            assert!(help.contains(variable), "--help does not name {variable}");
        }
    }
}
