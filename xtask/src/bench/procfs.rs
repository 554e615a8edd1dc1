//! What `/proc` says about the processes of a run: CPU time (user + system, from
//! `/proc/<pid>/stat`, children included) and resident memory, and which process listens on a
//! loopback port (so that the CPU of NATS and PostgreSQL is counted whether we started them or
//! borrowed them).

use std::collections::{BTreeMap, HashMap};

/// Clock ticks per second of `/proc/<pid>/stat` times (`getconf CLK_TCK`: 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

/// The fields of `/proc/<pid>/stat` after the command name (which may contain spaces and
/// parentheses, hence the split after the last `)`). Field 3 of the man page is index 0.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// Parent pid, the process's own CPU ticks (utime + stime) and those of its waited-for
/// children (cutime + cstime: the time of exited PostgreSQL backends stays counted with their
/// postmaster).
fn parent_and_ticks(pid: u32) -> Option<(u32, u64, u64)> {
    let fields = stat_fields(pid)?;
    let number = |index: usize| fields.get(index)?.parse::<u64>().ok();
    Some((
        u32::try_from(number(1)?).ok()?,
        number(11)? + number(12)?,
        number(13)? + number(14)?,
    ))
}

/// CPU seconds used so far by `pid` itself (its threads, not its children).
pub(crate) fn cpu_seconds_own(pid: u32) -> Option<f64> {
    let (_, own, _) = parent_and_ticks(pid)?;
    Some(own as f64 / TICKS_PER_SECOND)
}

fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// CPU seconds used so far by `pid` and every live descendant of it, plus what exited
/// descendants left in their parents' counters. `None` when the process is gone.
pub(crate) fn cpu_seconds_tree(pid: u32) -> Option<f64> {
    let (_, own, reaped) = parent_and_ticks(pid)?;
    let mut children: HashMap<u32, Vec<(u32, u64)>> = HashMap::new();
    for other in all_pids() {
        if let Some((parent, own, reaped)) = parent_and_ticks(other) {
            children
                .entry(parent)
                .or_default()
                .push((other, own + reaped));
        }
    }
    let mut total = own + reaped;
    let mut pending = vec![pid];
    while let Some(parent) = pending.pop() {
        for (child, ticks) in children.get(&parent).into_iter().flatten() {
            total += ticks;
            pending.push(*child);
        }
    }
    Some(total as f64 / TICKS_PER_SECOND)
}

/// Resident set size of `pid` in bytes (`VmRSS` of `/proc/<pid>/status`).
pub(crate) fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Socket inodes listening on TCP `port` (IPv4 and IPv6 tables).
fn listening_inodes(port: u16) -> Vec<u64> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // local_address is HEX_IP:HEX_PORT; state 0A is LISTEN; inode is field 9.
            let (Some(local), Some(state), Some(inode)) =
                (fields.get(1), fields.get(3), fields.get(9))
            else {
                continue;
            };
            let listening_port = local
                .rsplit_once(':')
                .and_then(|(_, hex)| u16::from_str_radix(hex, 16).ok());
            if *state == "0A"
                && listening_port == Some(port)
                && let Ok(inode) = inode.parse()
            {
                inodes.push(inode);
            }
        }
    }
    inodes
}

/// The process that listens on TCP `port` of this machine, if we may see it (root sees all).
/// With several (a forking server), the oldest: the lowest pid that is not a child of another.
pub(crate) fn pid_listening_on(port: u16) -> Option<u32> {
    let inodes = listening_inodes(port);
    if inodes.is_empty() {
        return None;
    }
    let wanted: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    let mut owners = Vec::new();
    for pid in all_pids() {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        let owns = fds.filter_map(Result::ok).any(|fd| {
            std::fs::read_link(fd.path())
                .ok()
                .and_then(|target| target.to_str().map(str::to_owned))
                .is_some_and(|target| wanted.contains(&target))
        });
        if owns {
            owners.push(pid);
        }
    }
    let parents: BTreeMap<u32, u32> = owners
        .iter()
        .filter_map(|pid| Some((*pid, parent_and_ticks(*pid)?.0)))
        .collect();
    owners
        .iter()
        .copied()
        .filter(|pid| !parents.get(pid).is_some_and(|p| owners.contains(p)))
        .min()
}

/// The port of a `host:port` or URL-ish string (`nats://h:p`, `postgres://u@h:p/db`).
pub(crate) fn port_of(address: &str) -> Option<u16> {
    let without_scheme = address.split("://").nth(1).unwrap_or(address);
    let host_port = without_scheme
        .rsplit('@')
        .next()?
        .split('/')
        .next()?
        .split(',')
        .next()?;
    host_port.rsplit_once(':')?.1.parse().ok()
}

/// True when the host of `address` is on this machine (so its process can be measured).
pub(crate) fn is_local(address: &str) -> bool {
    let without_scheme = address.split("://").nth(1).unwrap_or(address);
    let host = without_scheme
        .rsplit('@')
        .next()
        .and_then(|rest| rest.split(['/', ',']).next())
        .and_then(|host_port| host_port.rsplit_once(':').map(|(host, _)| host))
        .unwrap_or("");
    matches!(host, "127.0.0.1" | "localhost" | "[::1]" | "::1") || host.starts_with("127.")
}

/// Whose CPU counts for a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scope {
    /// The process alone (its threads).
    Own,
    /// The process and all its descendants, live or exited (PostgreSQL's backends).
    Tree,
}

/// A set of named processes whose CPU is measured over a window.
#[derive(Debug, Clone, Default)]
pub(crate) struct Processes {
    entries: Vec<(String, u32, Scope)>,
}

/// CPU seconds per named process at one moment.
#[derive(Debug, Clone)]
pub(crate) struct CpuSample {
    at: std::time::Instant,
    seconds: Vec<(String, Option<f64>)>,
}

impl Processes {
    /// Adds (or replaces) a process under `name`.
    pub(crate) fn set(&mut self, name: &str, pid: u32, scope: Scope) {
        self.remove(name);
        self.entries.push((name.to_owned(), pid, scope));
    }

    /// Removes the process named `name`.
    pub(crate) fn remove(&mut self, name: &str) {
        self.entries.retain(|(existing, _, _)| existing != name);
    }

    /// The process ids by name.
    pub(crate) fn pids(&self) -> serde_json::Value {
        self.entries
            .iter()
            .map(|(name, pid, _)| (name.clone(), serde_json::json!(pid)))
            .collect::<serde_json::Map<_, _>>()
            .into()
    }

    /// CPU seconds of each process now.
    pub(crate) fn sample(&self) -> CpuSample {
        CpuSample {
            at: std::time::Instant::now(),
            seconds: self
                .entries
                .iter()
                .map(|(name, pid, scope)| {
                    let seconds = match scope {
                        Scope::Own => cpu_seconds_own(*pid),
                        Scope::Tree => cpu_seconds_tree(*pid),
                    };
                    (name.clone(), seconds)
                })
                .collect(),
        }
    }
}

/// CPU used by each process between two samples.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct CpuUse {
    /// Wall-clock seconds of the window.
    pub(crate) wall_seconds: f64,
    /// CPU seconds per process (user + system).
    pub(crate) cpu_seconds: BTreeMap<String, f64>,
}

impl CpuUse {
    /// The use between `before` and `after`.
    pub(crate) fn between(before: &CpuSample, after: &CpuSample) -> CpuUse {
        let mut cpu_seconds = BTreeMap::new();
        for (name, end) in &after.seconds {
            let start = before
                .seconds
                .iter()
                .find(|(other, _)| other == name)
                .and_then(|(_, seconds)| *seconds);
            if let (Some(start), Some(end)) = (start, end) {
                cpu_seconds.insert(name.clone(), (end - start).max(0.0));
            }
        }
        CpuUse {
            wall_seconds: after.at.duration_since(before.at).as_secs_f64(),
            cpu_seconds,
        }
    }

    /// `registryd 1.23 · nats 0.40 · ...`: cores used on average by each process.
    pub(crate) fn cores_line(&self) -> String {
        let wall = self.wall_seconds.max(1e-9);
        self.cpu_seconds
            .iter()
            .map(|(name, seconds)| format!("{name} {:.2}", seconds / wall))
            .collect::<Vec<_>>()
            .join(" · ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_come_out_of_urls_and_addresses() {
        assert_eq!(port_of("nats://127.0.0.1:4222"), Some(4222));
        assert_eq!(
            port_of("postgres://postgres@127.0.0.1:5432/postgres"),
            Some(5432)
        );
        assert_eq!(port_of("127.0.0.1:50051"), Some(50051));
        assert_eq!(port_of("nats://a:1,b:2"), Some(1));
        assert!(is_local("postgres://u:p@127.0.0.1:5432/db"));
        assert!(!is_local("nats://nats.example:4222"));
    }

    #[test]
    fn our_own_cpu_and_memory_are_visible() {
        let pid = std::process::id();
        assert!(cpu_seconds_tree(pid).is_some());
        assert!(rss_bytes(pid).is_some_and(|rss| rss > 0));
    }

    #[test]
    fn the_listener_of_a_port_is_found() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert_eq!(pid_listening_on(port), Some(std::process::id()));
    }
}
