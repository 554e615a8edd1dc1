//! The scenarios that drive one `registryd` over gRPC: registration (with the projector's lag),
//! discovery, unary heartbeats, batched and streamed heartbeats, and watch latency.
//!
//! The load generator is this process (release build), talking to registryd over loopback
//! through the generated `sdk::proto` client on a few HTTP/2 connections; the watch scenario
//! observes through the SDK's `Consumer`, as an application would.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use sdk::proto;
use sdk::proto::registry_client::RegistryClient;
use serde_json::json;
use tonic::transport::Channel;

use super::load::{LoadResult, Window, closed_loop};
use super::procfs::{CpuUse, Processes};
use super::stats::Samples;

/// Namespace of every benchmark instance.
pub(crate) const NAMESPACE: &str = "bench";
/// Largest batch the API accepts.
pub(crate) const MAX_BATCH: usize = 1000;

/// The longest any single call may take before the scenario fails (a wedged server must not
/// hang the benchmark).
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Awaits a gRPC call at most [`CALL_TIMEOUT`].
pub(crate) async fn bounded<T>(
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(anyhow!("{status}")),
        Err(_) => bail!("no answer within {CALL_TIMEOUT:?}"),
    }
}

/// `connections` HTTP/2 connections to `address`, each a cheap-to-clone client.
pub(crate) async fn connect(
    address: &str,
    connections: usize,
) -> Result<Vec<RegistryClient<Channel>>> {
    Ok(channels(address, connections)
        .await?
        .into_iter()
        .map(|channel| RegistryClient::new(channel).max_decoding_message_size(64 << 20))
        .collect())
}

/// `connections` HTTP/2 connections to `address`.
pub(crate) async fn channels(address: &str, connections: usize) -> Result<Vec<Channel>> {
    let mut channels = Vec::with_capacity(connections);
    for _ in 0..connections.max(1) {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))?
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("connecting to registryd at {address}"))?;
        channels.push(channel);
    }
    Ok(channels)
}

/// Discover's answer as the load generator reads it: the flags, and how many instances (each
/// checked to be a well-formed length-delimited entry and skipped unread). The server's work
/// and the bytes on the wire are those of any client; the load generator shares the cores with
/// the server, so it does not spend them building instance structs it would throw away.
#[derive(Clone, PartialEq, Default, Debug)]
struct DiscoverTally {
    not_modified: bool,
    revision: u64,
    instances: usize,
}

impl prost::Message for DiscoverTally {
    fn encode_raw(&self, _buf: &mut impl prost::bytes::BufMut) {
        // Only ever decoded; the requests are `DiscoverRequest`s.
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl prost::bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        match tag {
            1 => prost::encoding::bool::merge(wire_type, &mut self.not_modified, buf, ctx),
            2 => prost::encoding::uint64::merge(wire_type, &mut self.revision, buf, ctx),
            3 => {
                prost::encoding::check_wire_type(
                    prost::encoding::WireType::LengthDelimited,
                    wire_type,
                )?;
                self.instances += 1;
                prost::encoding::skip_field(wire_type, tag, buf, ctx)
            }
            _ => prost::encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        0
    }

    fn clear(&mut self) {
        *self = DiscoverTally::default();
    }
}

/// One Discover call, read as a [`DiscoverTally`].
async fn discover_tally(
    channel: Channel,
    request: proto::DiscoverRequest,
) -> Result<DiscoverTally> {
    let mut grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(64 << 20);
    grpc.ready().await.map_err(|error| anyhow!("{error}"))?;
    let codec = tonic_prost::ProstCodec::<proto::DiscoverRequest, DiscoverTally>::default();
    let path =
        tonic::codegen::http::uri::PathAndQuery::from_static("/registry.v1.Registry/Discover");
    bounded(grpc.unary(tonic::Request::new(request), path, codec)).await
}

/// The instances a scenario registered.
#[derive(Debug, Clone)]
pub(crate) struct Population {
    /// Instance ids, in registration order.
    pub(crate) ids: Arc<Vec<String>>,
    /// Service names; instance `n` belongs to `services[n % services.len()]`.
    pub(crate) services: Arc<Vec<String>>,
}

/// Instance `n` of a population of `services` services.
pub(crate) fn registration(
    n: usize,
    services: usize,
    ttl_ms: u64,
) -> proto::RegisterInstanceRequest {
    proto::RegisterInstanceRequest {
        namespace: NAMESPACE.into(),
        service: service_name(n % services.max(1)),
        host: format!("10.{}.{}.{}", (n >> 16) & 0xff, (n >> 8) & 0xff, n & 0xff),
        port: 8080 + u32::try_from(n >> 24).unwrap_or(0),
        protocol: "grpc".into(),
        version: "1.4.2".into(),
        metadata: [("zone".to_owned(), format!("zone-{}", n % 3))].into(),
        health_check: Some(proto::HealthCheck { ttl_ms }),
        ..Default::default()
    }
}

/// Name of service `index`.
pub(crate) fn service_name(index: usize) -> String {
    format!("svc-{index:04}")
}

/// A reference to an instance by id.
pub(crate) fn by_id(id: &str) -> proto::InstanceRef {
    proto::InstanceRef {
        target: Some(proto::instance_ref::Target::Id(id.to_owned())),
    }
}

/// The projector's checkpoint: the last event sequence written to PostgreSQL.
async fn checkpoint(database: &tokio_postgres::Client) -> Result<u64> {
    let row = database
        .query_one(
            "SELECT COALESCE(MAX(last_sequence), 0) FROM registry.projector_checkpoint",
            &[],
        )
        .await?;
    Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
}

/// Registration results: the population and the report entry.
pub(crate) struct Registered {
    pub(crate) population: Population,
    pub(crate) json: serde_json::Value,
    pub(crate) rate: f64,
    pub(crate) lag_p99_ms: f64,
    pub(crate) cpu: CpuUse,
}

/// Registers `count` instances over `services` services with `concurrency` calls in flight,
/// sampling the projector's checkpoint every 20 ms; the lag of a sample is the age of the
/// oldest acknowledged registration the projector has not applied yet.
pub(crate) async fn register(
    clients: &[RegistryClient<Channel>],
    database_url: &str,
    processes: &Processes,
    count: usize,
    services: usize,
    concurrency: usize,
    ttl_ms: u64,
) -> Result<Registered> {
    let (database, connection) = tokio_postgres::connect(database_url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connecting to {database_url}"))?;
    tokio::spawn(connection);
    let start_sequence = checkpoint(&database).await?;

    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let before = processes.sample();
    // The sampler runs until the projector has applied the last registration (the target,
    // known once every registration is acknowledged) or a bounded wait after that.
    let (target_sender, target) = tokio::sync::watch::channel(None::<(u64, Instant)>);
    let sampler = tokio::spawn(async move {
        let catch_up_limit = Duration::from_secs(120);
        let mut samples: Vec<(Instant, u64)> = Vec::new();
        let mut interval = tokio::time::interval(Duration::from_millis(20));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            let Ok(sequence) = checkpoint(&database).await else {
                continue;
            };
            let now = Instant::now();
            samples.push((now, sequence));
            if let Some((last, since)) = *target.borrow()
                && (sequence >= last || now.duration_since(since) > catch_up_limit)
            {
                break;
            }
        }
        samples
    });
    let mut workers = Vec::with_capacity(concurrency);
    for worker in 0..concurrency {
        let mut client = clients[worker % clients.len()].clone();
        let next = Arc::clone(&next);
        workers.push(tokio::spawn(async move {
            let mut acked: Vec<(usize, String, u64, Instant)> = Vec::new();
            let mut latencies = Samples::default();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= count {
                    break;
                }
                let sent = Instant::now();
                let response = bounded(client.register_instance(registration(n, services, ttl_ms)))
                    .await
                    .map_err(|error| anyhow!("registering instance {n}: {error}"))?;
                let done = Instant::now();
                latencies.push(done - sent);
                acked.push((n, response.instance_id, response.revision, done));
            }
            Ok::<_, anyhow::Error>((acked, latencies))
        }));
    }
    let mut ids = vec![String::new(); count];
    let mut acks: BTreeMap<u64, Instant> = BTreeMap::new();
    let mut latencies = Samples::default();
    for worker in workers {
        let (acked, worker_latencies) = worker.await??;
        latencies.extend(worker_latencies);
        for (n, id, revision, at) in acked {
            ids[n] = id;
            acks.insert(revision, at);
        }
    }
    let elapsed = started.elapsed();
    let after = processes.sample();
    let last_revision = acks.keys().next_back().copied().unwrap_or(start_sequence);

    // Let the projector finish (bounded), still sampling, to know how long it trailed.
    target_sender.send_replace(Some((last_revision, Instant::now())));
    let samples = sampler.await?;
    let caught_up_after = samples
        .iter()
        .find(|(_, sequence)| *sequence >= last_revision)
        .map(|(at, _)| at.saturating_duration_since(started + elapsed));

    // Lag of each sample taken while registrations were being made.
    let mut ack_times: Vec<Instant> = acks.values().copied().collect();
    ack_times.sort_unstable();
    let mut lag_ms: Vec<f64> = Vec::new();
    let mut lag_events: Vec<f64> = Vec::new();
    for (at, sequence) in &samples {
        if *at > started + elapsed {
            continue;
        }
        let oldest_unapplied = acks
            .range(sequence + 1..)
            .find(|(_, acked_at)| *acked_at <= at)
            .map(|(_, acked_at)| at.duration_since(*acked_at));
        lag_ms.push(oldest_unapplied.map_or(0.0, |age| age.as_secs_f64() * 1000.0));
        let acknowledged = ack_times.partition_point(|acked_at| acked_at <= at) as u64;
        let applied = sequence.saturating_sub(start_sequence);
        lag_events.push(acknowledged.saturating_sub(applied) as f64);
    }
    let lag = super::stats::signed_summary(&mut lag_ms);
    let lag_in_events = super::stats::signed_summary(&mut lag_events);
    let rate = count as f64 / elapsed.as_secs_f64();
    let cpu = CpuUse::between(&before, &after);
    ensure!(
        ids.iter().all(|id| id.len() == 40),
        "some registrations returned no instance id"
    );
    let lag_p99_ms = lag["p99_ms"].as_f64().unwrap_or(f64::NAN);
    Ok(Registered {
        population: Population {
            ids: Arc::new(ids),
            services: Arc::new((0..services).map(service_name).collect()),
        },
        json: json!({
            "instances": count,
            "services": services,
            "concurrency": concurrency,
            "seconds": elapsed.as_secs_f64(),
            "registrations_per_second": rate,
            "latency": latencies.summary(),
            "projector_lag_ms": lag,
            "projector_lag_events": lag_in_events,
            "projector_caught_up_seconds_after_last_registration":
                caught_up_after.map(|d| d.as_secs_f64()),
            "checkpoint_samples": samples.len(),
            "cpu": cpu,
        }),
        rate,
        lag_p99_ms,
        cpu,
    })
}

/// `count` services of one instance each, to measure what a Discover call costs apart from
/// the instances it carries.
pub(crate) async fn register_singles(
    clients: &[RegistryClient<Channel>],
    count: usize,
) -> Result<Population> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for worker in 0..32.min(count.max(1)) {
        let mut client = clients[worker % clients.len()].clone();
        let next = Arc::clone(&next);
        workers.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= count {
                    break;
                }
                let mut request = registration(n, 1, 300_000);
                request.service = single_service_name(n);
                let response = bounded(client.register_instance(request)).await?;
                ids.push((n, response.instance_id));
            }
            Ok::<_, anyhow::Error>(ids)
        }));
    }
    let mut ids = vec![String::new(); count];
    for worker in workers {
        for (n, id) in worker.await?? {
            ids[n] = id;
        }
    }
    Ok(Population {
        ids: Arc::new(ids),
        services: Arc::new((0..count).map(single_service_name).collect()),
    })
}

fn single_service_name(index: usize) -> String {
    format!("single-{index:04}")
}

/// Discover calls on random services of the population (healthy instances only, as a
/// consumer asks), or with the current revision so that the answer is "not modified".
pub(crate) async fn discover(
    channels: &[Channel],
    population: &Population,
    processes: &Processes,
    concurrency: usize,
    window: Window,
    not_modified: bool,
) -> Result<LoadResult> {
    let services = Arc::clone(&population.services);
    let revisions: Arc<Vec<u64>> = if not_modified {
        let mut revisions = Vec::with_capacity(services.len());
        for service in services.iter() {
            let response = discover_tally(
                channels[0].clone(),
                proto::DiscoverRequest {
                    namespace: NAMESPACE.into(),
                    service: service.clone(),
                    ..Default::default()
                },
            )
            .await?;
            revisions.push(response.revision);
        }
        Arc::new(revisions)
    } else {
        Arc::new(Vec::new())
    };
    let channels = channels.to_vec();
    closed_loop(concurrency, window, processes, move |worker, iteration| {
        let channel = channels[worker % channels.len()].clone();
        // A fixed stride through the services: spread, deterministic, no RNG needed.
        let index = (worker * 7919 + iteration as usize * 104_729) % services.len();
        let service = services[index].clone();
        let revision = revisions.get(index).copied().unwrap_or(0);
        async move {
            let response = discover_tally(
                channel,
                proto::DiscoverRequest {
                    namespace: NAMESPACE.into(),
                    service,
                    healthy_only: true,
                    revision,
                    ..Default::default()
                },
            )
            .await?;
            if revision == 0 && response.instances == 0 {
                bail!("Discover answered no instance");
            }
            Ok(1)
        }
    })
    .await
}

/// Unary Heartbeat calls: worker `w` of `concurrency` beats leases `w, w + concurrency, ...`
/// of the first `leases` instances in turn, one call in flight per worker.
pub(crate) async fn unary_heartbeats(
    clients: &[RegistryClient<Channel>],
    population: &Population,
    processes: &Processes,
    leases: usize,
    concurrency: usize,
    window: Window,
) -> Result<LoadResult> {
    ensure!(
        leases >= concurrency && leases <= population.ids.len(),
        "{leases} leases for {concurrency} workers and {} instances",
        population.ids.len()
    );
    let ids = Arc::clone(&population.ids);
    let connections = clients.len().min(concurrency).max(1);
    let clients = clients[..connections].to_vec();
    closed_loop(concurrency, window, processes, move |worker, iteration| {
        let mut client = clients[worker % clients.len()].clone();
        let own = leases.div_ceil(concurrency);
        let mut lease = worker + concurrency * (iteration as usize % own);
        if lease >= leases {
            lease = worker;
        }
        let reference = by_id(&ids[lease]);
        async move {
            client
                .heartbeat(proto::HeartbeatRequest {
                    instance: Some(reference),
                })
                .await?;
            Ok(1)
        }
    })
    .await
}

/// The batch of `size` references starting at instance `first` (wrapping around).
fn batch(ids: &[String], first: usize, size: usize) -> proto::BatchHeartbeatRequest {
    proto::BatchHeartbeatRequest {
        instances: (0..size)
            .map(|offset| by_id(&ids[(first + offset) % ids.len()]))
            .collect(),
    }
}

/// Counts the results of a batch; fails unless every one is OK.
fn renewed(response: &proto::BatchHeartbeatResponse, expected: usize) -> Result<u64> {
    let ok = response
        .results
        .iter()
        .filter(|result| result.status == proto::heartbeat_result::Status::Ok as i32)
        .count();
    ensure!(
        ok == expected,
        "{ok} of {expected} heartbeats of a batch were recorded"
    );
    Ok(ok as u64)
}

/// BatchHeartbeat calls of `batch_size` instances, `concurrency` in flight, cycling through
/// the population.
pub(crate) async fn batched_heartbeats(
    clients: &[RegistryClient<Channel>],
    population: &Population,
    processes: &Processes,
    batch_size: usize,
    concurrency: usize,
    window: Window,
) -> Result<LoadResult> {
    let ids = Arc::clone(&population.ids);
    let clients = clients.to_vec();
    let cursor = Arc::new(AtomicUsize::new(0));
    closed_loop(concurrency, window, processes, move |worker, _| {
        let mut client = clients[worker % clients.len()].clone();
        let first = cursor.fetch_add(batch_size, Ordering::Relaxed);
        let request = batch(&ids, first, batch_size);
        async move {
            let response = client.batch_heartbeat(request).await?.into_inner();
            renewed(&response, batch_size)
        }
    })
    .await
}

/// What the streamed heartbeats measured.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Streamed {
    pub(crate) streams: usize,
    pub(crate) batch_size: usize,
    pub(crate) window_per_stream: usize,
    pub(crate) renewals: u64,
    pub(crate) renewals_per_second: f64,
    pub(crate) batch_latency: super::stats::Summary,
    pub(crate) cpu: CpuUse,
}

/// `streams` StreamHeartbeats streams (one per connection), each keeping `in_flight` batches
/// of `batch_size` unanswered, cycling through the population.
pub(crate) async fn streamed_heartbeats(
    clients: &[RegistryClient<Channel>],
    population: &Population,
    processes: &Processes,
    batch_size: usize,
    streams: usize,
    in_flight: usize,
    window: Window,
) -> Result<Streamed> {
    let start = Instant::now();
    let begin = start + window.warmup;
    let end = begin + window.measure;
    let cursor = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::with_capacity(streams);
    for stream in 0..streams {
        let mut client = clients[stream % clients.len()].clone();
        let ids = Arc::clone(&population.ids);
        let cursor = Arc::clone(&cursor);
        tasks.push(tokio::spawn(async move {
            let (sender, receiver) = tokio::sync::mpsc::channel(in_flight * 2);
            let mut responses = client
                .stream_heartbeats(tokio_stream::wrappers::ReceiverStream::new(receiver))
                .await?
                .into_inner();
            let mut outstanding = std::collections::VecDeque::with_capacity(in_flight);
            let mut renewals = 0u64;
            let mut latencies = Samples::default();
            loop {
                while outstanding.len() < in_flight && Instant::now() < end {
                    let first = cursor.fetch_add(batch_size, Ordering::Relaxed);
                    sender
                        .send(batch(&ids, first, batch_size))
                        .await
                        .map_err(|_| anyhow!("the heartbeat stream closed"))?;
                    outstanding.push_back(Instant::now());
                }
                let Some(sent) = outstanding.pop_front() else {
                    break;
                };
                let response = tokio::time::timeout(CALL_TIMEOUT, responses.message())
                    .await
                    .map_err(|_| anyhow!("no heartbeat answer within {CALL_TIMEOUT:?}"))??
                    .ok_or_else(|| anyhow!("the server ended the heartbeat stream"))?;
                let done = Instant::now();
                let count = renewed(&response, batch_size)?;
                if done >= begin && done <= end {
                    renewals += count;
                    latencies.push(done - sent);
                }
            }
            drop(sender);
            Ok::<_, anyhow::Error>((renewals, latencies))
        }));
    }
    tokio::time::sleep_until(begin.into()).await;
    let before = processes.sample();
    tokio::time::sleep_until(end.into()).await;
    let after = processes.sample();
    let mut renewals = 0;
    let mut latencies = Samples::default();
    for task in tasks {
        let (count, stream_latencies) = task.await??;
        renewals += count;
        latencies.extend(stream_latencies);
    }
    Ok(Streamed {
        streams,
        batch_size,
        window_per_stream: in_flight,
        renewals,
        renewals_per_second: renewals as f64 / window.measure.as_secs_f64(),
        batch_latency: latencies.summary(),
        cpu: CpuUse::between(&before, &after),
    })
}

/// Watch latency: a status change (UpdateInstance of the weight) until an SDK `Consumer`
/// following the service has it in its cache.
pub(crate) async fn watch_latency(
    address: &str,
    client: &RegistryClient<Channel>,
    changes: usize,
    pause: Duration,
) -> Result<serde_json::Value> {
    let service = "watched";
    let mut client = client.clone();
    let mut ids = Vec::new();
    for n in 0..10 {
        let mut request = registration(n, 1, 300_000);
        request.service = service.into();
        ids.push(
            client
                .register_instance(request)
                .await?
                .into_inner()
                .instance_id,
        );
    }
    let consumer = sdk::Consumer::new(
        sdk::Client::connect_to(address).map_err(|error| anyhow!("SDK client: {error}"))?,
    );
    let mut subscription = consumer
        .subscribe(NAMESPACE, service)
        .await
        .map_err(|error| anyhow!("subscribing through the SDK consumer: {error}"))?;
    ensure!(
        subscription.current().len() == ids.len(),
        "the consumer's snapshot has {} instances, expected {}",
        subscription.current().len(),
        ids.len()
    );
    let mut visible = Samples::default();
    let mut acknowledged = Samples::default();
    for change in 0..changes {
        let id = &ids[change % ids.len()];
        // Weights 1..=10000 that differ from the previous one of the same instance.
        let weight = u32::try_from(change % 9_000 + 1_000).unwrap_or(1_000);
        let sent = Instant::now();
        let mut update = client.clone();
        let request = proto::UpdateInstanceRequest {
            instance: Some(by_id(id)),
            weight: Some(weight),
            ..Default::default()
        };
        let write = tokio::spawn(async move {
            let result = update.update_instance(request).await;
            (result, Instant::now())
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if subscription
                .current()
                .get(id)
                .is_some_and(|instance| instance.weight == weight)
            {
                break;
            }
            tokio::time::timeout_at(deadline, subscription.changed())
                .await
                .map_err(|_| anyhow!("the consumer did not see weight {weight} within 10 s"))?
                .map_err(|error| anyhow!("consumer: {error}"))?;
        }
        visible.push(sent.elapsed());
        let (result, answered) = write.await?;
        result.map_err(|status| anyhow!("UpdateInstance: {status}"))?;
        acknowledged.push(answered - sent);
        tokio::time::sleep(pause).await;
    }
    consumer.close();
    Ok(json!({
        "changes": changes,
        "change_to_consumer_cache": visible.summary(),
        "change_acknowledged": acknowledged.summary(),
    }))
}
