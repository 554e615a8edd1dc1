//! The service harness: NATS with JetStream and PostgreSQL for tests, `xtask up` and `xtask e2e`.
//!
//! [`Services::provide`] uses `NATS_URL` / `DATABASE_URL` when they are set and answer; otherwise
//! it starts private servers from the installed `nats-server` and PostgreSQL binaries on free
//! loopback ports (PostgreSQL as the `postgres` user when we are root, since it refuses to run as
//! root) and removes them when dropped. When neither works it fails with a message naming what is
//! missing and how to install it.
//!
//! [`TestEnv`] isolates one test: its own stream prefix and its own database, removed on drop, so
//! that parallel tests and earlier runs cannot interfere.

use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// A free TCP port on 127.0.0.1 (free when asked; the caller binds it right away).
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding an ephemeral port")?;
    Ok(listener.local_addr()?.port())
}

fn reachable(host_port: &str) -> bool {
    let Ok(addresses) = host_port.to_socket_addrs() else {
        return false;
    };
    addresses
        .into_iter()
        .any(|address| TcpStream::connect_timeout(&address, Duration::from_millis(500)).is_ok())
}

fn wait_for_port(address: SocketAddr, child: &mut Child, what: &str) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("{what} exited with {status} before listening on {address}");
        }
        if Instant::now() > deadline {
            bail!("{what} did not listen on {address} within {READY_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `host:port` of a `nats://` URL (first server of a list).
pub fn nats_host_port(url: &str) -> String {
    let first = url.split(',').next().unwrap_or(url).trim();
    let without_scheme = first.split("://").nth(1).unwrap_or(first);
    let without_user = without_scheme.rsplit('@').next().unwrap_or(without_scheme);
    let host_port = without_user.trim_end_matches('/');
    if host_port.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:4222")
    }
}

fn find_in_path(binary: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/usr/bin", "/usr/local/bin"].map(PathBuf::from))
        .map(|dir| dir.join(binary))
        .find(|candidate| candidate.is_file())
}

/// The directory holding `initdb`, `pg_ctl` and `postgres` (newest installed version).
fn postgres_bin_dir() -> Option<PathBuf> {
    if let Some(initdb) = find_in_path("initdb") {
        return initdb.parent().map(Path::to_path_buf);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// uid and gid of `user` from /etc/passwd.
fn user_ids(user: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.first() == Some(&user) && fields.len() > 3)
            .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
            .flatten()
    })
}

fn running_as_root() -> bool {
    // The owner of /proc/self is the effective uid of this process.
    std::os::unix::fs::MetadataExt::uid(&match std::fs::metadata("/proc/self") {
        Ok(metadata) => metadata,
        Err(_) => return false,
    }) == 0
}

/// A private `nats-server -js` on a free loopback port, with its own storage directory. It can
/// be stopped and started again on the same port and storage, for fault tests.
#[derive(Debug)]
pub struct PrivateNats {
    port: u16,
    binary: PathBuf,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl PrivateNats {
    /// Starts one, or explains how to install `nats-server`.
    pub fn start() -> Result<PrivateNats> {
        let binary = find_in_path("nats-server").ok_or_else(|| {
            anyhow!(
                "nats-server is not installed and NATS_URL is not set to a reachable server: \
                 install it (Debian: `apt-get install -y nats-server`) or set NATS_URL"
            )
        })?;
        let dir = tempfile::Builder::new()
            .prefix("registry-nats-")
            .tempdir()?;
        let mut server = PrivateNats {
            port: free_port()?,
            binary,
            dir,
            child: None,
        };
        server.resume()?;
        Ok(server)
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Stops the server (SIGKILL: as abrupt as a crash). Its storage is kept.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port with the same storage.
    pub fn resume(&mut self) -> Result<()> {
        if self.child.is_some() {
            return Ok(());
        }
        let log = std::fs::File::create(self.dir.path().join("nats.log"))?;
        let mut child = Command::new(&self.binary)
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(self.dir.path().join("jetstream"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        let address = SocketAddr::from(([127, 0, 0, 1], self.port));
        wait_for_port(address, &mut child, "nats-server")?;
        self.child = Some(child);
        Ok(())
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A private PostgreSQL cluster (initdb + pg_ctl) on a free loopback port. It can be stopped and
/// started again, for fault tests.
#[derive(Debug)]
pub struct PrivatePostgres {
    port: u16,
    bin: PathBuf,
    dir: tempfile::TempDir,
    ids: Option<(u32, u32)>,
    running: bool,
}

impl PrivatePostgres {
    /// Initialises and starts one, or explains how to install PostgreSQL.
    pub fn start() -> Result<PrivatePostgres> {
        let bin = postgres_bin_dir().ok_or_else(|| {
            anyhow!(
                "PostgreSQL server binaries (initdb, pg_ctl) are not installed and DATABASE_URL \
                 is not set to a reachable server: install them (Debian: `apt-get install -y \
                 postgresql`) or set DATABASE_URL"
            )
        })?;
        let ids = if running_as_root() {
            Some(user_ids("postgres").ok_or_else(|| {
                anyhow!("running as root, and PostgreSQL refuses root: create a `postgres` user")
            })?)
        } else {
            None
        };
        let dir = tempfile::Builder::new().prefix("registry-pg-").tempdir()?;
        if let Some((uid, gid)) = ids {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))?;
        }
        let server = PrivatePostgres {
            port: free_port()?,
            bin,
            dir,
            ids,
            running: false,
        };
        let status = server
            .command("initdb")
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(server.data_dir())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .context("running initdb")?;
        if !status.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&status.stderr));
        }
        let mut server = server;
        server.resume()?;
        Ok(server)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin.join(program));
        command.current_dir(self.dir.path()).stdin(Stdio::null());
        if let Some((uid, gid)) = self.ids {
            std::os::unix::process::CommandExt::uid(&mut command, uid);
            std::os::unix::process::CommandExt::gid(&mut command, gid);
        }
        command
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the server (again), on the same port and data.
    pub fn resume(&mut self) -> Result<()> {
        if self.running {
            return Ok(());
        }
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off",
            self.port,
            self.dir.path().display()
        );
        let output = self
            .command("pg_ctl")
            .args(["-w", "-t", "30", "-l"])
            .arg(self.dir.path().join("postgres.log"))
            .arg("-D")
            .arg(self.data_dir())
            .args(["-o", &options, "start"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .context("running pg_ctl start")?;
        if !output.status.success() {
            let log =
                std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default();
            bail!(
                "pg_ctl start failed: {}\n{log}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        self.running = true;
        Ok(())
    }

    /// Stops the server immediately (no checkpoint, like a crash). Its data is kept.
    pub fn stop(&mut self) {
        if !self.running {
            return;
        }
        let _ = self
            .command("pg_ctl")
            .args(["-w", "-m", "immediate", "-D"])
            .arg(self.data_dir())
            .arg("stop")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        self.running = false;
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// NATS and PostgreSQL, borrowed from the environment or started privately.
#[derive(Debug)]
pub struct Services {
    /// NATS URL.
    pub nats_url: String,
    /// PostgreSQL URL of an administrative database (tests create their own databases).
    pub database_url: String,
    nats: Option<PrivateNats>,
    postgres: Option<PrivatePostgres>,
}

/// The NATS URL to use: `NATS_URL` when set and reachable, else a private server.
pub fn provide_nats() -> Result<(String, Option<PrivateNats>)> {
    match std::env::var("NATS_URL") {
        Ok(url) if reachable(&nats_host_port(&url)) => Ok((url, None)),
        _ => {
            let server = PrivateNats::start()?;
            Ok((server.url(), Some(server)))
        }
    }
}

/// The PostgreSQL URL to use: `DATABASE_URL` when set and reachable, else a private server.
pub fn provide_postgres() -> Result<(String, Option<PrivatePostgres>)> {
    if let Ok(url) = std::env::var("DATABASE_URL")
        && let Ok(config) = url.parse::<tokio_postgres::Config>()
        && postgres_host_port(&config).is_some_and(|host_port| reachable(&host_port))
    {
        return Ok((url, None));
    }
    let server = PrivatePostgres::start()?;
    Ok((server.url(), Some(server)))
}

fn postgres_host_port(config: &tokio_postgres::Config) -> Option<String> {
    let host = match config.get_hosts().first()? {
        tokio_postgres::config::Host::Tcp(host) => host.clone(),
        #[allow(unreachable_patterns)]
        _ => return None,
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    Some(format!("{host}:{port}"))
}

impl Services {
    /// Both services, as documented on the module.
    pub fn provide() -> Result<Services> {
        let (nats_url, nats) = provide_nats()?;
        let (database_url, postgres) = provide_postgres()?;
        Ok(Services {
            nats_url,
            database_url,
            nats,
            postgres,
        })
    }

    /// True when at least one of the services is a private server started by us.
    pub fn any_private(&self) -> bool {
        self.nats.is_some() || self.postgres.is_some()
    }

    /// Describes where each service comes from.
    pub fn describe(&self) -> String {
        let origin = |private: bool| {
            if private {
                "private, removed on exit"
            } else {
                "from the environment"
            }
        };
        format!(
            "NATS {} ({})\nPostgreSQL {} ({})",
            self.nats_url,
            origin(self.nats.is_some()),
            self.database_url,
            origin(self.postgres.is_some())
        )
    }
}

/// URL of database `name` on the server of `admin_url`.
pub fn database_url_for(admin_url: &str, name: &str) -> Result<String> {
    let config: tokio_postgres::Config = admin_url.parse().context("parsing DATABASE_URL")?;
    let host_port =
        postgres_host_port(&config).ok_or_else(|| anyhow!("DATABASE_URL must name a TCP host"))?;
    let user = config.get_user().unwrap_or("postgres");
    let password = config
        .get_password()
        .map(|p| format!(":{}", String::from_utf8_lossy(p)))
        .unwrap_or_default();
    Ok(format!("postgres://{user}{password}@{host_port}/{name}"))
}

/// One test's isolated slice of the services: a fresh stream prefix and a fresh database, both
/// removed on drop (also the private servers, when they were started for this test).
#[derive(Debug)]
pub struct TestEnv {
    /// NATS URL.
    pub nats_url: String,
    /// Stream/subject prefix for this test: pass it to `event_log::Streams::new`.
    pub prefix: String,
    /// URL of this test's own database (empty for [`TestEnv::nats_only`]).
    pub database_url: String,
    /// URL of the administrative database on the same server.
    pub admin_database_url: String,
    database: Option<String>,
    _nats: Option<PrivateNats>,
    _postgres: Option<PrivatePostgres>,
}

fn unique_suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..16].to_owned()
}

impl TestEnv {
    /// NATS and a fresh PostgreSQL database.
    pub async fn new() -> Result<TestEnv> {
        let (nats_url, nats) = tokio::task::spawn_blocking(provide_nats).await??;
        let (admin_url, postgres) = tokio::task::spawn_blocking(provide_postgres).await??;
        let name = format!("test_{}", unique_suffix());
        let (client, connection) = tokio_postgres::connect(&admin_url, tokio_postgres::NoTls)
            .await
            .with_context(|| format!("connecting to {admin_url}"))?;
        tokio::spawn(connection);
        client
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await?;
        Ok(TestEnv {
            nats_url,
            prefix: format!("t{}", unique_suffix()),
            database_url: database_url_for(&admin_url, &name)?,
            admin_database_url: admin_url,
            database: Some(name),
            _nats: nats,
            _postgres: postgres,
        })
    }

    /// NATS at `nats_url` only (a server the test controls, e.g. a [`PrivateNats`]).
    pub async fn nats_only_at(nats_url: &str) -> Result<TestEnv> {
        Ok(TestEnv {
            nats_url: nats_url.to_owned(),
            prefix: format!("t{}", unique_suffix()),
            database_url: String::new(),
            admin_database_url: String::new(),
            database: None,
            _nats: None,
            _postgres: None,
        })
    }

    /// NATS only, for tests that do not touch PostgreSQL.
    pub async fn nats_only() -> Result<TestEnv> {
        let (nats_url, nats) = tokio::task::spawn_blocking(provide_nats).await??;
        Ok(TestEnv {
            nats_url,
            prefix: format!("t{}", unique_suffix()),
            database_url: String::new(),
            admin_database_url: String::new(),
            database: None,
            _nats: nats,
            _postgres: None,
        })
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let nats_url = self.nats_url.clone();
        let stream_prefix = format!("{}_", self.prefix.to_uppercase());
        let database = self.database.take();
        let admin_url = self.admin_database_url.clone();
        // Drop cannot await; clean up on a thread of its own with a small runtime, bounded in
        // time so that a test which stopped a server does not hang here.
        let cleanup = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                let limit = Duration::from_secs(5);
                let _ =
                    tokio::time::timeout(limit, delete_streams(&nats_url, &stream_prefix)).await;
                if let Some(database) = database {
                    let _ = tokio::time::timeout(limit, drop_database(&admin_url, &database)).await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

async fn delete_streams(nats_url: &str, stream_prefix: &str) -> Result<()> {
    use futures::TryStreamExt;
    let client = async_nats::connect(nats_url).await?;
    let jetstream = async_nats::jetstream::new(client);
    let names: Vec<String> = jetstream.stream_names().try_collect().await?;
    for name in names.iter().filter(|name| name.starts_with(stream_prefix)) {
        jetstream.delete_stream(name).await?;
    }
    Ok(())
}

async fn drop_database(admin_url: &str, database: &str) -> Result<()> {
    let (client, connection) = tokio_postgres::connect(admin_url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    client
        .batch_execute(&format!(
            "DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)"
        ))
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nats_urls_are_parsed_to_host_and_port() {
        assert_eq!(nats_host_port("nats://127.0.0.1:4222"), "127.0.0.1:4222");
        assert_eq!(nats_host_port("nats://user:pw@host"), "host:4222");
        assert_eq!(nats_host_port("localhost:5000,other:1"), "localhost:5000");
    }

    #[test]
    fn database_urls_keep_server_and_change_database() {
        assert_eq!(
            database_url_for("postgres://postgres@127.0.0.1:5432/postgres", "test_1").unwrap(),
            "postgres://postgres@127.0.0.1:5432/test_1"
        );
    }
}
