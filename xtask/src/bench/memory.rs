//! Memory per lease, measured on real processes from `/proc/<pid>/status`: registrations are
//! appended straight to the events stream (pipelined, through the `event-log` crate, so that a
//! million take seconds rather than minutes), then `registryd engine` (the health engine
//! alone) and `registryd all` (the whole server: API read model, engine and projector) start
//! on that stream and replay it. Their resident set once caught up, minus that of the same
//! process on an empty stream, divided by the leases, is the cost of a lease.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use event_log::event::{Event, HealthCheck, InstanceRegistered, Location};
use event_log::{Append, Envelope, EventLog, JetStreamConfig, JetStreamLog, StreamKind, Streams};
use futures::future::try_join_all;
use sdk::proto;
use serde_json::{Value, json};

use super::api;
use super::procfs;
use crate::process::{Logs, Registryd};

const RECOVERED: &str = "health engine recovered";
/// TTL of the appended leases: long enough that nothing expires during the measurement.
const TTL_MS: u64 = 300_000;
const SERVICES: usize = 1_000;

/// Everything needed to start registryd processes for this scenario.
pub(crate) struct Setup<'a> {
    pub(crate) binary: &'a Path,
    pub(crate) nats_url: &'a str,
    pub(crate) admin_database_url: &'a str,
    pub(crate) logs: &'a Path,
    pub(crate) suffix: &'a str,
}

fn envelope(n: usize) -> Envelope {
    let service = api::service_name(n % SERVICES);
    let host = format!("10.{}.{}.{}", (n >> 16) & 0xff, (n >> 8) & 0xff, n & 0xff);
    let port = 8080 + u16::try_from(n >> 24).unwrap_or(0);
    let id = event_log::instance_id(api::NAMESPACE, &service, &host, port);
    Envelope::new(
        api::NAMESPACE,
        service,
        id,
        Event::InstanceRegistered(InstanceRegistered {
            host,
            port,
            protocol: "grpc".into(),
            version: "1.4.2".into(),
            weight: Some(100),
            metadata: BTreeMap::from([("zone".to_owned(), format!("zone-{}", n % 3))]),
            health_check: Some(HealthCheck { ttl_ms: TTL_MS }),
            ephemeral: true,
            isolate: None,
            location: Location::default(),
        }),
    )
}

/// Appends registrations `from..to`, a few batches of 1,000 in flight; returns the rate.
async fn append(log: &Arc<JetStreamLog>, streams: &Streams, from: usize, to: usize) -> Result<f64> {
    let started = Instant::now();
    let chunk = 1_000;
    let mut next = from;
    while next < to {
        let mut batches = Vec::new();
        for _ in 0..4 {
            if next >= to {
                break;
            }
            let end = (next + chunk).min(to);
            let appends = (next..end)
                .map(|n| Append::event(streams, &envelope(n)))
                .collect::<Result<Vec<_>, _>>()?;
            let log = Arc::clone(log);
            batches.push(async move {
                for result in log.append_many(StreamKind::Events, appends).await {
                    result?;
                }
                Ok::<_, anyhow::Error>(())
            });
            next = end;
        }
        try_join_all(batches).await?;
    }
    Ok((to - from) as f64 / started.elapsed().as_secs_f64())
}

/// Waits until `done` holds, checking every 50 ms, failing after `limit`.
async fn wait_until(
    what: &str,
    limit: Duration,
    process: &mut Registryd,
    mut done: impl AsyncFnMut() -> Result<bool>,
) -> Result<Duration> {
    let started = Instant::now();
    loop {
        process.ensure_running()?;
        if done().await? {
            return Ok(started.elapsed());
        }
        if started.elapsed() > limit {
            bail!("{what} did not happen within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `process`'s read model has applied the first `expected` appended events. The last
/// appended instance is the newest of its service: when Discover shows that service at its
/// revision, the read model has applied everything.
async fn read_model_caught_up(process: &mut Registryd, expected: usize) -> Result<Duration> {
    let clients = api::connect(&process.address, 1).await?;
    let mut client = clients[0].clone();
    let last_service = api::service_name(expected.saturating_sub(1) % SERVICES);
    wait_until(
        "the read model's catch-up",
        Duration::from_secs(300),
        process,
        async || {
            let response = client
                .discover(proto::DiscoverRequest {
                    namespace: api::NAMESPACE.into(),
                    service: last_service.clone(),
                    ..Default::default()
                })
                .await;
            Ok(response.is_ok_and(|r| r.into_inner().revision >= expected as u64))
        },
    )
    .await
}

/// Resident set of `pid` once it stopped growing (two readings 500 ms apart within 1 %).
async fn settled_rss(pid: u32) -> Result<u64> {
    let mut last = procfs::rss_bytes(pid).ok_or_else(|| anyhow!("process {pid} is gone"))?;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = procfs::rss_bytes(pid).ok_or_else(|| anyhow!("process {pid} is gone"))?;
        if now.abs_diff(last) * 100 <= last {
            return Ok(now);
        }
        last = now;
    }
    Ok(last)
}

impl Setup<'_> {
    fn args(&self, prefix: &str, database_url: Option<&str>, subcommand: &str) -> Vec<String> {
        let mut args = vec![
            "--listen".to_owned(),
            "127.0.0.1:0".to_owned(),
            "--nats-url".to_owned(),
            self.nats_url.to_owned(),
            "--stream-prefix".to_owned(),
            prefix.to_owned(),
        ];
        if let Some(url) = database_url {
            args.extend(["--database-url".to_owned(), url.to_owned()]);
        }
        args.push(subcommand.to_owned());
        args
    }

    /// `registryd engine` on `prefix`: its resident set once it has replayed the stream.
    async fn engine_rss(&self, prefix: &str, label: &str) -> Result<(u64, Duration)> {
        let mut engine = Registryd::spawn(
            self.binary,
            &self.args(prefix, None, "engine"),
            Logs::File {
                path: self.logs.join(format!("registryd-engine-{label}.log")),
                watch: vec![RECOVERED],
            },
            false,
        )?;
        let replayed_in = wait_logged(&mut engine, RECOVERED, Duration::from_secs(300)).await?;
        let rss = settled_rss(engine.pid()).await?;
        let _ = engine.terminate();
        Ok((rss, replayed_in))
    }

    /// `registryd api` on `prefix`: its resident set once its read model has replayed the
    /// `expected` events.
    async fn api_rss(&self, prefix: &str, expected: usize, label: &str) -> Result<u64> {
        let mut api = Registryd::spawn(
            self.binary,
            &self.args(prefix, None, "api"),
            Logs::File {
                path: self.logs.join(format!("registryd-api-{label}.log")),
                watch: vec![],
            },
            true,
        )?;
        read_model_caught_up(&mut api, expected).await?;
        let rss = settled_rss(api.pid()).await?;
        let _ = api.terminate();
        Ok(rss)
    }

    /// `registryd all` on `prefix`: resident set once the read model, the engine and the
    /// projector have all caught up with the `expected` events.
    async fn server_rss(
        &self,
        prefix: &str,
        database_url: &str,
        expected: usize,
        label: &str,
    ) -> Result<Value> {
        let mut server = Registryd::spawn(
            self.binary,
            &self.args(prefix, Some(database_url), "all"),
            Logs::File {
                path: self.logs.join(format!("registryd-all-{label}.log")),
                watch: vec![RECOVERED],
            },
            true,
        )?;
        let read_model = read_model_caught_up(&mut server, expected).await?;
        wait_logged(&mut server, RECOVERED, Duration::from_secs(300)).await?;
        let rss_caught_up = settled_rss(server.pid()).await?;
        let (database, connection) = tokio_postgres::connect(database_url, tokio_postgres::NoTls)
            .await
            .with_context(|| format!("connecting to {database_url}"))?;
        tokio::spawn(connection);
        let projector_started = Instant::now();
        let mut projected = false;
        while projector_started.elapsed() < Duration::from_secs(300) {
            server.ensure_running()?;
            let row = database
                .query_one(
                    "SELECT COALESCE(MAX(last_sequence), 0) FROM registry.projector_checkpoint",
                    &[],
                )
                .await?;
            if row.get::<_, i64>(0) >= expected as i64 {
                projected = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let rss_projected = settled_rss(server.pid()).await?;
        let _ = server.terminate();
        Ok(json!({
            "read_model_caught_up_seconds": read_model.as_secs_f64(),
            "rss_bytes_caught_up": rss_caught_up,
            "projector_caught_up": projected,
            "projector_seconds_after_read_model": projector_started.elapsed().as_secs_f64(),
            "rss_bytes_projected": rss_projected,
        }))
    }
}

/// Waits until the process has logged a line containing `pattern` (one it watches).
async fn wait_logged(process: &mut Registryd, pattern: &str, limit: Duration) -> Result<Duration> {
    let started = Instant::now();
    while !process.has_logged(pattern) {
        process.ensure_running()?;
        if started.elapsed() > limit {
            bail!("registryd did not log {pattern:?} within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(started.elapsed())
}

/// Runs the scenario at each lease count of `counts` (ascending).
pub(crate) async fn run(setup: &Setup<'_>, counts: &[usize]) -> Result<Value> {
    let prefix = format!("bm{}", setup.suffix);
    let empty_prefix = format!("bme{}", setup.suffix);
    let database = format!("bench_mem_{}", setup.suffix);
    let empty_database = format!("bench_meme_{}", setup.suffix);
    let result = async {
        let database_url =
            crate::process::ensure_database(setup.admin_database_url, &database).await?;
        let empty_database_url =
            crate::process::ensure_database(setup.admin_database_url, &empty_database).await?;
        let streams = Streams::new(&prefix);
        let log = Arc::new(
            JetStreamLog::connect(setup.nats_url, streams.clone(), JetStreamConfig::default())
                .await
                .context("connecting to NATS")?,
        );
        log.ensure_streams().await?;
        // Baselines: the same processes on an empty stream.
        let (engine_empty, _) = setup.engine_rss(&empty_prefix, "empty").await?;
        let api_empty = setup.api_rss(&empty_prefix, 0, "empty").await?;
        let server_empty = setup
            .server_rss(&empty_prefix, &empty_database_url, 0, "empty")
            .await?;
        let server_empty_rss = server_empty["rss_bytes_caught_up"].as_u64().unwrap_or(0);
        let mut levels = Vec::new();
        let mut appended = 0;
        for &count in counts {
            let append_rate = append(&log, &streams, appended, count).await?;
            appended = count;
            let (engine_rss, replayed_in) = setup.engine_rss(&prefix, &count.to_string()).await?;
            let api_rss = setup.api_rss(&prefix, count, &count.to_string()).await?;
            let server = setup
                .server_rss(&prefix, &database_url, count, &count.to_string())
                .await?;
            let server_rss = server["rss_bytes_caught_up"].as_u64().unwrap_or(0);
            let per_lease = |rss: u64, base: u64| rss.saturating_sub(base) as f64 / count as f64;
            levels.push(json!({
                "leases": count,
                "append_events_per_second": append_rate,
                "engine_rss_bytes": engine_rss,
                "engine_bytes_per_lease": per_lease(engine_rss, engine_empty),
                "engine_replay_seconds": replayed_in.as_secs_f64(),
                "api_rss_bytes": api_rss,
                "api_bytes_per_lease": per_lease(api_rss, api_empty),
                "server_rss_bytes": server_rss,
                "server_bytes_per_lease": per_lease(server_rss, server_empty_rss),
                "server": server,
            }));
        }
        Ok::<_, anyhow::Error>(json!({
            "engine_rss_bytes_empty": engine_empty,
            "api_rss_bytes_empty": api_empty,
            "server_rss_bytes_empty": server_empty_rss,
            "levels": levels,
        }))
    }
    .await;
    crate::process::cleanup(setup.nats_url, setup.admin_database_url, &prefix, &database).await;
    crate::process::cleanup(
        setup.nats_url,
        setup.admin_database_url,
        &empty_prefix,
        &empty_database,
    )
    .await;
    result
}
