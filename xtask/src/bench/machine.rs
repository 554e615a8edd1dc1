//! The description of the machine and the code a benchmark ran on, stored with its results:
//! CPU model and cores, memory, kernel, OS, load, toolchain, server versions, git revision,
//! date and the command.

use std::process::Command;

use serde_json::{Value, json};

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

fn output(program: &str, args: &[&str]) -> Option<String> {
    let output = Command::new(program)
        .args(args)
        .current_dir(crate::root())
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| {
            let text = String::from_utf8_lossy(&output.stdout).trim().to_owned();
            if text.is_empty() {
                String::from_utf8_lossy(&output.stderr).trim().to_owned()
            } else {
                text
            }
        })
        .filter(|text| !text.is_empty())
}

fn cpu_model() -> Option<String> {
    let cpuinfo = read("/proc/cpuinfo")?;
    cpuinfo
        .lines()
        .find(|line| line.starts_with("model name"))
        .and_then(|line| line.split_once(':'))
        .map(|(_, model)| model.trim().to_owned())
}

fn memory_bytes() -> Option<u64> {
    let meminfo = read("/proc/meminfo")?;
    let line = meminfo.lines().find(|line| line.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn os_name() -> Option<String> {
    read("/etc/os-release")?
        .lines()
        .find_map(|line| line.strip_prefix("PRETTY_NAME="))
        .map(|name| name.trim_matches('"').to_owned())
}

/// The 1, 5 and 15 minute load averages now.
pub(crate) fn load_average() -> Option<[f64; 3]> {
    let text = read("/proc/loadavg")?;
    let mut fields = text.split_whitespace().map(|f| f.parse::<f64>().ok());
    Some([fields.next()??, fields.next()??, fields.next()??])
}

/// Git revision of the work tree, with a `-dirty` mark when tracked files differ from it.
pub(crate) fn git_revision() -> Option<String> {
    let revision = output("git", &["rev-parse", "HEAD"])?;
    let dirty = Command::new("git")
        .args(["diff", "--quiet", "HEAD", "--"])
        .current_dir(crate::root())
        .status()
        .is_ok_and(|status| !status.success());
    Some(if dirty {
        format!("{revision}-dirty")
    } else {
        revision
    })
}

/// Now, UTC, RFC 3339.
pub(crate) fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Everything known about the machine and the build, as JSON.
pub(crate) fn describe() -> Value {
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    json!({
        "cpu_model": cpu_model(),
        "cores": cores,
        "memory_bytes": memory_bytes(),
        "kernel": read("/proc/sys/kernel/osrelease").map(|k| k.trim().to_owned()),
        "os": os_name(),
        "rustc": output("rustc", &["--version"]),
        "nats_server": output("nats-server", &["--version"])
            .or_else(|| output("/usr/sbin/nats-server", &["--version"])),
        "etcd": output("etcd", &["--version"]).and_then(|v| v.lines().next().map(str::to_owned)),
        "load_average_at_start": load_average(),
    })
}

/// `cores x model, memory, kernel` in one line, for the table.
pub(crate) fn summary(machine: &Value) -> String {
    let memory_gib = machine["memory_bytes"]
        .as_u64()
        .map_or(0.0, |bytes| bytes as f64 / f64::from(1u32 << 30));
    format!(
        "{} cores of {}, {:.0} GiB, Linux {}, {}",
        machine["cores"],
        machine["cpu_model"].as_str().unwrap_or("unknown CPU"),
        memory_gib,
        machine["kernel"].as_str().unwrap_or("?"),
        machine["os"].as_str().unwrap_or("unknown OS"),
    )
}
