//! Processes and resources shared by `xtask e2e` and `xtask bench`: building the binaries,
//! running `registryd` as a child process, creating its database, and removing what a run
//! created (its JetStream streams and its database).

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use async_nats::jetstream;
use futures::StreamExt;

/// How long registryd gets to exit after SIGTERM.
const EXIT_WAIT: Duration = Duration::from_secs(15);

/// The cargo target directory: `CARGO_TARGET_DIR` when set, else `target/` at the root.
pub(crate) fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|dir| {
            if dir.is_absolute() {
                dir
            } else {
                crate::root().join(dir)
            }
        })
        .unwrap_or_else(|| crate::root().join("target"))
}

/// The folder of the release binaries: the one this program runs from when it is the release
/// build (so that it finds registryd next to itself whatever the environment says), else
/// `release/` in the target directory.
pub(crate) fn release_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
        .filter(|dir| !cfg!(debug_assertions) && dir.join("registryd").is_file())
        .unwrap_or_else(|| target_dir().join("release"))
}

/// Builds registryd (debug profile) and returns its path.
pub(crate) fn build_registryd() -> Result<PathBuf> {
    let mut build = crate::cargo();
    build.args([
        "build",
        "--quiet",
        "-p",
        "registry-api",
        "--bin",
        "registryd",
    ]);
    crate::run(build, "building registryd")?;
    Ok(target_dir().join("debug").join("registryd"))
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

/// Deletes the streams of `prefix` and drops `database`, each bounded in time; failures are
/// ignored (the run is over, and a leftover is harmless).
pub(crate) async fn cleanup(nats_url: &str, admin_url: &str, prefix: &str, database: &str) {
    let streams = async {
        let client = async_nats::connect(nats_url).await.ok()?;
        let jetstream = jetstream::new(client);
        for name in ["EVENTS", "HEARTBEATS"] {
            let _ = jetstream
                .delete_stream(format!("{}_{name}", prefix.to_uppercase()))
                .await;
        }
        Some(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), streams).await;
    let database = async {
        let (client, connection) = tokio_postgres::connect(admin_url, tokio_postgres::NoTls)
            .await
            .ok()?;
        tokio::spawn(connection);
        client
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)"
            ))
            .await
            .ok()
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), database).await;
}

/// Where registryd's log goes.
pub(crate) enum Logs {
    /// To our stderr (the e2e scenario shows it).
    Inherit,
    /// To a file, with the lines containing any of `watch` remembered (see
    /// [`Registryd::has_logged`]).
    File {
        path: PathBuf,
        watch: Vec<&'static str>,
    },
}

/// A `registryd` child process, killed when dropped.
pub(crate) struct Registryd {
    child: Child,
    /// The gRPC address it listens on (empty for subcommands without the API).
    pub(crate) address: String,
    seen: Arc<Mutex<HashSet<&'static str>>>,
}

impl Registryd {
    /// Starts `binary` with `args`, its log on our stderr, and waits until it listens.
    pub(crate) fn start(binary: &Path, args: &[String]) -> Result<Registryd> {
        Registryd::spawn(binary, args, Logs::Inherit, true)
    }

    /// Starts `binary` with `args`; with `listens`, waits for the line announcing the API's
    /// address (subcommands without the API print none).
    pub(crate) fn spawn(
        binary: &Path,
        args: &[String],
        logs: Logs,
        listens: bool,
    ) -> Result<Registryd> {
        let mut command = Command::new(binary);
        command.args(args).stdout(Stdio::piped()).env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        );
        let seen = Arc::new(Mutex::new(HashSet::new()));
        let mut watched = None;
        match logs {
            Logs::Inherit => {
                command.stderr(Stdio::inherit());
            }
            Logs::File { path, watch } => {
                command.stderr(Stdio::piped());
                watched = Some((path, watch));
            }
        }
        let mut child = command.spawn().context("starting registryd")?;
        if let Some((path, watch)) = watched {
            let stderr = child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
            let mut file = std::fs::File::create(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            let seen = Arc::clone(&seen);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    let _ = writeln!(file, "{line}");
                    for pattern in &watch {
                        if line.contains(pattern) {
                            seen.lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner)
                                .insert(*pattern);
                        }
                    }
                }
            });
        }
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let mut lines = BufReader::new(stdout).lines();
        let mut address = String::new();
        if listens {
            address = loop {
                let line = lines
                    .next()
                    .ok_or_else(|| anyhow!("registryd exited before listening"))??;
                if let Some(address) = line.strip_prefix("registryd: gRPC API listening on ") {
                    break address.trim().to_owned();
                }
            };
        }
        // Keep draining stdout so registryd never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Ok(Registryd {
            child,
            address,
            seen,
        })
    }

    /// The process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether a log line containing `pattern` (one of those watched) has been written.
    pub(crate) fn has_logged(&self, pattern: &str) -> bool {
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(pattern)
    }

    /// Fails if the process has exited.
    pub(crate) fn ensure_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("registryd exited unexpectedly with {status}");
        }
        Ok(())
    }

    /// Sends SIGTERM and waits for the exit, killing it after a grace period.
    pub(crate) fn terminate(mut self) -> Result<std::process::ExitStatus> {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status()?;
        let deadline = Instant::now() + EXIT_WAIT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                bail!("registryd did not exit within {EXIT_WAIT:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Registryd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An independent downstream subscriber: an ordered JetStream consumer over the events stream
/// of a stream prefix, decoding envelopes as untyped JSON (it knows nothing of our code).
pub(crate) struct Subscriber {
    messages: jetstream::consumer::pull::Ordered,
}

/// One event as the subscriber saw it.
pub(crate) struct Seen {
    /// Stream sequence.
    pub(crate) sequence: u64,
    /// When it arrived here.
    pub(crate) at: Instant,
    /// When it arrived here, by the wall clock, in Unix milliseconds (fractional).
    pub(crate) received_unix_ms: f64,
    /// The envelope.
    pub(crate) json: serde_json::Value,
}

impl Subscriber {
    /// Follows `<prefix>.evt.>` from the start of the stream, or after sequence `after`.
    pub(crate) async fn start(
        nats_url: &str,
        prefix: &str,
        after: Option<u64>,
    ) -> Result<Subscriber> {
        let client = async_nats::connect(nats_url).await?;
        let jetstream = jetstream::new(client);
        let stream = jetstream
            .get_stream(format!("{}_EVENTS", prefix.to_uppercase()))
            .await?;
        let deliver_policy = match after {
            None => jetstream::consumer::DeliverPolicy::All,
            Some(sequence) => jetstream::consumer::DeliverPolicy::ByStartSequence {
                start_sequence: sequence + 1,
            },
        };
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                filter_subject: format!("{prefix}.evt.>"),
                deliver_policy,
                ..Default::default()
            })
            .await?;
        Ok(Subscriber {
            messages: consumer.messages().await?,
        })
    }

    /// The next event, waiting until `deadline` at most.
    pub(crate) async fn next(&mut self, deadline: tokio::time::Instant) -> Result<Option<Seen>> {
        let Ok(message) = tokio::time::timeout_at(deadline, self.messages.next()).await else {
            return Ok(None);
        };
        let message = message.ok_or_else(|| anyhow!("event stream ended"))??;
        let at = Instant::now();
        let received_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |since| since.as_secs_f64() * 1000.0);
        let sequence = message.info().map_err(|e| anyhow!("{e}"))?.stream_sequence;
        let json: serde_json::Value = serde_json::from_slice(&message.payload)
            .with_context(|| format!("event {sequence} is not JSON"))?;
        Ok(Some(Seen {
            sequence,
            at,
            received_unix_ms,
            json,
        }))
    }

    /// The next `event_type` event of `instance_id`, skipping others; fails after `wait`.
    pub(crate) async fn wait_for(
        &mut self,
        event_type: &str,
        instance_id: &str,
        wait: Duration,
    ) -> Result<Seen> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let seen = self
                .next(deadline)
                .await?
                .ok_or_else(|| anyhow!("no {event_type} for {instance_id} within {wait:?}"))?;
            if seen.json["event_type"] == event_type && seen.json["instance_id"] == instance_id {
                return Ok(seen);
            }
        }
    }
}
