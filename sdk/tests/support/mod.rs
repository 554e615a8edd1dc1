//! Shared set-up for the SDK's black-box tests: a real `registryd` process (built once per test
//! binary) on a free loopback port, over a test's own NATS stream prefix, that a test can kill
//! and start again on the same port; and bounded waits.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use sdk::{BackoffConfig, Client, ClientConfig};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use xtask::harness::TestEnv;

/// Upper bound of every wait in these tests.
pub const WAIT: Duration = Duration::from_secs(20);

/// Builds `registryd` once (cargo makes it a no-op when it is up to date) and returns its path.
pub fn registryd_binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY
        .get_or_init(|| {
            let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| env!("CARGO").to_owned());
            let mut build = std::process::Command::new(cargo);
            // Cargo sets per-package variables for the test process; build scripts that watch
            // them (ring watches CARGO_MANIFEST_DIR and OUT_DIR) would otherwise rebuild on every switch
            // between `cargo test` and this build.
            for (name, _) in std::env::vars_os() {
                let name = name.to_string_lossy();
                if [
                    "CARGO_PKG_",
                    "CARGO_MANIFEST_",
                    "CARGO_CRATE_",
                    "CARGO_BIN_",
                ]
                .iter()
                .any(|prefix| name.starts_with(prefix))
                    || [
                        "CARGO_PRIMARY_PACKAGE",
                        "CARGO_TARGET_TMPDIR",
                        "CARGO_RUSTC_CURRENT_DIR",
                        "OUT_DIR",
                    ]
                    .contains(&name.as_ref())
                {
                    build.env_remove(name.as_ref());
                }
            }
            let status = build
                .current_dir(manifest_dir.join(".."))
                .args([
                    "build",
                    "--quiet",
                    "-p",
                    "registry-api",
                    "--bin",
                    "registryd",
                ])
                .status()
                .expect("running cargo build for registryd");
            assert!(status.success(), "building registryd failed: {status}");
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| manifest_dir.join("../target"));
            let binary = target.join("debug").join("registryd");
            assert!(binary.is_file(), "{} missing", binary.display());
            binary
        })
        .clone()
}

/// One `registryd` process. Killed when dropped.
#[derive(Debug)]
pub struct Registryd {
    args: Vec<String>,
    nats_url: String,
    port: u16,
    log: PathBuf,
    child: Option<Child>,
}

impl Registryd {
    /// Starts `registryd <subcommand> <extra...>` over `env`'s NATS and stream prefix, on a
    /// free port, and waits until it listens (or, for subcommands without the API, until it
    /// has started).
    pub async fn start(env: &TestEnv, subcommand: &str, extra: &[&str]) -> Registryd {
        let port = xtask::harness::free_port().unwrap();
        let mut args = vec![
            subcommand.to_owned(),
            "--listen".to_owned(),
            format!("127.0.0.1:{port}"),
            "--stream-prefix".to_owned(),
            env.prefix.clone(),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let log =
            std::env::temp_dir().join(format!("sdk-test-{}-{subcommand}-{port}.log", env.prefix));
        let mut server = Registryd {
            args,
            nats_url: env.nats_url.clone(),
            port,
            log,
            child: None,
        };
        server.resume().await;
        server
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Its stderr so far (shown when a wait fails; the file is kept when a test fails).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Starts it again (same arguments, same port).
    pub async fn resume(&mut self) {
        assert!(self.child.is_none(), "already running");
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut child = Command::new(registryd_binary())
            .args(&self.args)
            .env("NATS_URL", &self.nats_url)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .expect("spawning registryd");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let listens = self
            .args
            .first()
            .is_some_and(|command| command == "api" || command == "all");
        if listens {
            let wanted = format!("registryd: gRPC API listening on 127.0.0.1:{}", self.port);
            let found = tokio::time::timeout(WAIT, async {
                while let Ok(Some(line)) = lines.next_line().await {
                    if line == wanted {
                        return true;
                    }
                }
                false
            })
            .await;
            assert!(
                matches!(found, Ok(true)),
                "registryd did not start listening:\n{}",
                self.log()
            );
        }
        // Keep draining stdout so that the process never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        self.child = Some(child);
    }

    /// Kills it (SIGKILL: a crash, nothing flushed) and waits until it is gone.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.start_kill().unwrap();
            tokio::time::timeout(WAIT, child.wait())
                .await
                .expect("registryd did not die")
                .unwrap();
        }
    }
}

impl Drop for Registryd {
    fn drop(&mut self) {
        // `kill_on_drop` ends the process; keep its log only when the test failed.
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// A client of `endpoints` with short timeouts and backoff, so that the tests notice outages
/// and recoveries in well under a second.
pub fn client(endpoints: &[String]) -> Client {
    Client::new(ClientConfig {
        request_timeout: Duration::from_secs(5),
        retry_timeout: Duration::from_secs(15),
        keepalive: Duration::from_secs(2),
        backoff: BackoffConfig {
            min: Duration::from_millis(50),
            max: Duration::from_millis(500),
        },
        ..ClientConfig::with_endpoints(endpoints.iter().cloned())
    })
    .unwrap()
}

/// Waits for `check` to hold, re-evaluating on every tick of `poll`, at most `WAIT`. For
/// conditions that only a query can observe (the server offers no notification for them).
pub async fn eventually<F, Fut>(what: &str, poll: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(poll).await;
    }
}
