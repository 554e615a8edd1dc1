//! A real `registryd` process for black-box tests: started with a test's NATS, database and
//! stream prefix, its addresses read from the lines it prints, killed when dropped; its log is
//! kept and shown when a test fails.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use xtask::harness::TestEnv;

pub struct Registryd {
    child: Child,
    pub api: SocketAddr,
    pub metrics: Option<SocketAddr>,
    log: Arc<Mutex<String>>,
}

impl Registryd {
    /// `registryd` over `env` with `extra` arguments and environment variables, on free ports;
    /// returns once the API (and the metrics endpoint, unless `off`) listen.
    pub fn start(env: &TestEnv, extra: &[&str], vars: &[(&str, &str)]) -> Registryd {
        let mut command = Command::new(env!("CARGO_BIN_EXE_registryd"));
        command
            .args([
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
                "--nats-url",
                &env.nats_url,
                "--stream-prefix",
                &env.prefix,
            ])
            .args(extra)
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if !env.database_url.is_empty() {
            command.args(["--database-url", &env.database_url]);
        }
        for (name, value) in vars {
            command.env(name, value);
        }
        let mut child = command.spawn().expect("spawning registryd");
        let log = Arc::new(Mutex::new(String::new()));
        let mut stderr = child.stderr.take().unwrap();
        let stderr_log = Arc::clone(&log);
        std::thread::spawn(move || {
            let mut buffer = [0u8; 4096];
            while let Ok(read) = stderr.read(&mut buffer) {
                if read == 0 {
                    break;
                }
                stderr_log
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buffer[..read]));
            }
        });
        let (lines, received) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if lines.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let (mut api, mut metrics) = (None, None);
        while api.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = received.recv_timeout(left).unwrap_or_else(|_| {
                panic!(
                    "registryd did not start listening:\n{}",
                    log.lock().unwrap()
                )
            });
            if let Some(address) = line.strip_prefix("registryd: gRPC API listening on ") {
                api = Some(address.trim().parse().unwrap());
            }
            if let Some(address) = line.strip_prefix("registryd: metrics listening on ") {
                metrics = Some(address.trim().parse().unwrap());
            }
        }
        Registryd {
            child,
            api: api.unwrap(),
            metrics,
            log,
        }
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Sends SIGTERM and waits (bounded) for the exit; true when it exited 0.
    pub fn terminate(&mut self) -> bool {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// `GET /metrics` as text.
    pub async fn scrape(&self) -> String {
        let address = self.metrics.expect("metrics endpoint");
        let (status, body) = http_get(address, "/metrics").await;
        assert_eq!(status, 200, "{body}");
        body
    }
}

impl Drop for Registryd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- registryd log ---\n{}", self.log());
        }
    }
}

/// A plain HTTP/1.1 GET: status and body.
pub async fn http_get(address: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        stream.read_to_string(&mut response),
    )
    .await
    .expect("response in time")
    .unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("HTTP response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("status code");
    (status, body.to_owned())
}

/// The value of the sample `name{labels...}` in Prometheus text, if present.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, series_labels) = match series.split_once('{') {
                Some((series_name, rest)) => (series_name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if series_name != name {
                return None;
            }
            let pairs: Vec<&str> = series_labels.split(',').collect();
            let all = labels
                .iter()
                .all(|(key, wanted)| pairs.contains(&format!("{key}=\"{wanted}\"").as_str()));
            if all { value.parse().ok() } else { None }
        })
}
