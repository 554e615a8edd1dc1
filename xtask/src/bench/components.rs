//! The component benchmarks other crates ship as examples, run from here so that their figures
//! land in the same report: `health-engine`'s `lease_bench` (the lease core's bytes per lease
//! and operations per second, and detection precision over the in-memory log) and `store`'s
//! `projector_bench` (projected events per second and lag against real NATS and PostgreSQL).
//! Each prints a human table and one line `RESULT {json}`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};

use super::procfs::{CpuUse, Processes, Scope};

/// Path of a release example in the target directory.
pub(crate) fn example(name: &str) -> PathBuf {
    crate::process::release_dir().join("examples").join(name)
}

/// Runs `binary` with `args` and `env`, echoing its table indented, and returns its RESULT
/// with the CPU of every process over the whole run.
pub(crate) fn run(
    binary: &Path,
    args: &[&str],
    env: &[(&str, &str)],
    processes: &Processes,
    limit: Duration,
) -> Result<Value> {
    let name = binary
        .file_name()
        .and_then(|name| name.to_str())
        .unwrap_or("example")
        .to_owned();
    let mut child = Command::new(binary)
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let mut processes = processes.clone();
    processes.set(&name, child.id(), Scope::Own);
    let before = processes.sample();
    let started = Instant::now();
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    // Enforce the time limit from a watchdog thread: a read on the pipe cannot time out.
    let pid = child.id();
    let watchdog = std::thread::spawn(move || {
        while started.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(100));
            if !Path::new(&format!("/proc/{pid}")).exists() {
                return;
            }
        }
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    });
    let mut result = None;
    let mut after = None;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        if let Some(json) = line.strip_prefix("RESULT ") {
            after = Some(processes.sample());
            result = Some(serde_json::from_str::<Value>(json)?);
        } else {
            eprintln!("    {line}");
        }
    }
    let status = child.wait()?;
    let _ = watchdog.join();
    if started.elapsed() >= limit {
        bail!("{name} did not finish within {limit:?}");
    }
    let mut result = result.ok_or_else(|| anyhow!("{name} printed no RESULT line ({status})"))?;
    if !status.success() {
        bail!("{name} exited with {status}");
    }
    let after = after.unwrap_or_else(|| processes.sample());
    result["cpu_whole_run"] = json!(CpuUse::between(&before, &after));
    Ok(result)
}
