//! The peer in the same run: a private etcd (Debian `etcd-server`) on free loopback ports with
//! its own data directory, driven by `bench-etcd` (the `etcd-client` crate, built outside the
//! workspace because it needs a system `protoc`) with the same lease count, concurrency and
//! connections as our unary heartbeats.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};
use xtask::harness::free_port;

use super::load::Window;
use super::procfs::{CpuUse, Processes, Scope};

/// What to install when the peer cannot run.
pub(crate) const INSTALL: &str = "apt-get install -y etcd-server protobuf-compiler libprotobuf-dev";

/// The `etcd` binary, if installed.
pub(crate) fn etcd_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/local/bin")])
        .map(|dir| dir.join("etcd"))
        .find(|candidate| candidate.is_file())
}

/// True when `protoc` and the well-known protobuf includes (libprotobuf-dev) are installed,
/// which etcd-client's build needs.
pub(crate) fn protoc_available() -> bool {
    let protoc = Command::new(std::env::var_os("PROTOC").unwrap_or_else(|| "protoc".into()))
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    protoc && Path::new("/usr/include/google/protobuf/timestamp.proto").is_file()
}

/// The manifest of the driver package.
pub(crate) fn driver_manifest() -> PathBuf {
    crate::root().join("bench-etcd").join("Cargo.toml")
}

/// The driver binary (release) in the target directory.
pub(crate) fn driver_binary() -> PathBuf {
    crate::process::release_dir().join("bench-etcd")
}

/// A private etcd, killed (and its data removed) when dropped.
pub(crate) struct Etcd {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub(crate) endpoint: String,
    _dir: tempfile::TempDir,
}

impl Etcd {
    /// Starts one and waits until its client port answers.
    pub(crate) fn start(binary: &Path, logs: &Path) -> Result<Etcd> {
        let dir = tempfile::Builder::new().prefix("bench-etcd-").tempdir()?;
        let client_port = free_port()?;
        let peer_port = free_port()?;
        let client_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let log = std::fs::File::create(logs.join("etcd.log"))?;
        let mut child = Command::new(binary)
            .args(["--name", "bench", "--data-dir"])
            .arg(dir.path().join("data"))
            .args([
                "--listen-client-urls",
                &client_url,
                "--advertise-client-urls",
                &client_url,
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
                "--initial-cluster",
                &format!("bench={peer_url}"),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let address = SocketAddr::from(([127, 0, 0, 1], client_port));
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_err() {
            if let Some(status) = child.try_wait()? {
                bail!("etcd exited with {status} before listening (see etcd.log)");
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("etcd did not listen on {address} within 20 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Etcd {
            child,
            endpoint: client_url,
            _dir: dir,
        })
    }

    /// The process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One level of keep-alives: the driver's result with the CPU of every process over its
/// measured window.
pub(crate) fn keep_alives(
    driver: &Path,
    etcd: &Etcd,
    processes: &Processes,
    leases: usize,
    concurrency: usize,
    connections: usize,
    window: Window,
) -> Result<Value> {
    let mut child = Command::new(driver)
        .args([
            "--endpoint",
            &etcd.endpoint,
            "--leases",
            &leases.to_string(),
            "--concurrency",
            &concurrency.to_string(),
            "--connections",
            &connections.to_string(),
            "--warmup-ms",
            &window.warmup.as_millis().to_string(),
            "--measure-ms",
            &window.measure.as_millis().to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", driver.display()))?;
    let mut processes = processes.clone();
    processes.set("etcd", etcd.pid(), Scope::Own);
    processes.set("etcd load generator", child.id(), Scope::Own);
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let mut before = None;
    let mut cpu = None;
    let mut result = None;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        match line.trim() {
            "BEGIN" => before = Some(processes.sample()),
            "END" => {
                let after = processes.sample();
                cpu = before
                    .as_ref()
                    .map(|before| CpuUse::between(before, &after));
            }
            other => {
                if let Some(json) = other.strip_prefix("RESULT ") {
                    result = Some(serde_json::from_str::<Value>(json)?);
                }
            }
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("bench-etcd exited with {status}");
    }
    let mut result = result.ok_or_else(|| anyhow!("bench-etcd printed no RESULT line"))?;
    result["cpu"] = json!(cpu.ok_or_else(|| anyhow!("bench-etcd printed no BEGIN/END"))?);
    Ok(result)
}
