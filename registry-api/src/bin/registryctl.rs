//! `registryctl`: the operator's command line for a running registry.
//!
//! Lists namespaces, services and instances (as a table or JSON), shows one instance with its
//! recent events, follows the event stream live, and registers, deregisters, heartbeats,
//! isolates and un-isolates by hand. It talks to `registryd` over gRPC and reads events straight
//! from JetStream, like any downstream consumer.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use event_log::event::Event;
use event_log::{EventLog, JetStreamConfig, JetStreamLog, Record, StreamKind, Streams};
use futures::StreamExt;
use sdk::proto;
use sdk::proto::registry_client::RegistryClient;
use serde_json::json;
use tonic::transport::Channel;

/// Operate a running registry.
#[derive(Debug, Parser)]
#[command(name = "registryctl", version, about, long_about = None)]
struct Cli {
    /// Address of a registryd gRPC API.
    #[arg(
        long,
        env = "REGISTRY_SERVER",
        default_value = "127.0.0.1:50051",
        global = true
    )]
    server: String,
    /// NATS server of the registry's event stream (for `events` and `instance`).
    #[arg(
        long,
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        global = true
    )]
    nats_url: String,
    /// Stream prefix the registry uses.
    #[arg(
        long,
        env = "REGISTRY_STREAM_PREFIX",
        default_value = "registry",
        global = true
    )]
    stream_prefix: String,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

/// Names one instance: `--id`, or namespace, service, host and port.
#[derive(Debug, Clone, Args)]
struct InstanceArgs {
    /// Instance id (40 hex digits).
    #[arg(long, conflicts_with_all = ["namespace", "service", "host", "port"])]
    id: Option<String>,
    /// Namespace.
    namespace: Option<String>,
    /// Service.
    service: Option<String>,
    /// Host.
    host: Option<String>,
    /// Port.
    port: Option<u32>,
}

impl InstanceArgs {
    fn reference(&self) -> Result<proto::InstanceRef> {
        use proto::instance_ref::Target;
        let target = match (
            &self.id,
            &self.namespace,
            &self.service,
            &self.host,
            self.port,
        ) {
            (Some(id), ..) => Target::Id(id.clone()),
            (None, Some(namespace), Some(service), Some(host), Some(port)) => {
                Target::Address(proto::InstanceAddress {
                    namespace: namespace.clone(),
                    service: service.clone(),
                    host: host.clone(),
                    port,
                })
            }
            _ => bail!("name the instance with --id ID, or NAMESPACE SERVICE HOST PORT"),
        };
        Ok(proto::InstanceRef {
            target: Some(target),
        })
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Exit 0 when the server reports SERVING (grpc.health.v1), 1 otherwise: for health checks.
    Health,
    /// Namespaces with their service and instance counts.
    Namespaces,
    /// Services with total, healthy and isolated instance counts.
    Services {
        /// Only this namespace (default: all).
        #[arg(long, short)]
        namespace: Option<String>,
    },
    /// Instances of a service (isolated and unhealthy ones included).
    Instances {
        /// Namespace.
        namespace: String,
        /// Service.
        service: String,
        /// Only healthy instances.
        #[arg(long)]
        healthy: bool,
    },
    /// One instance and its recent events.
    Instance {
        #[command(flatten)]
        instance: InstanceArgs,
        /// How many recent events to show.
        #[arg(long, default_value_t = 10)]
        events: usize,
    },
    /// The event stream: what is there, or live with --follow.
    Events {
        /// Keep following new events.
        #[arg(long, short)]
        follow: bool,
        /// Only this namespace.
        #[arg(long, short)]
        namespace: Option<String>,
        /// Only this service (needs --namespace).
        #[arg(long, short, requires = "namespace")]
        service: Option<String>,
        /// Only these event types (e.g. InstanceTurnedUnhealthy); repeatable.
        #[arg(long = "type", short = 't')]
        types: Vec<String>,
        /// Start at this stream sequence (default: the beginning).
        #[arg(long, default_value_t = 0)]
        from: u64,
    },
    /// Register (or update) an instance.
    Register {
        /// Namespace.
        namespace: String,
        /// Service.
        service: String,
        /// Host.
        host: String,
        /// Port.
        port: u32,
        /// Heartbeat TTL (e.g. 5s); without it the instance has no health check.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// Weight.
        #[arg(long)]
        weight: Option<u32>,
        /// Metadata entry KEY=VALUE; repeatable.
        #[arg(long = "metadata", short = 'm', value_parser = parse_pair)]
        metadata: Vec<(String, String)>,
        /// Persistent instead of ephemeral (never removed, only marked unhealthy).
        #[arg(long)]
        persistent: bool,
        /// Protocol.
        #[arg(long, default_value = "")]
        protocol: String,
        /// Version.
        #[arg(long, default_value = "")]
        version: String,
    },
    /// Deregister an instance.
    Deregister(InstanceArgs),
    /// Send one heartbeat for an instance.
    Heartbeat(InstanceArgs),
    /// Isolate an instance (hidden from discovery).
    Isolate(InstanceArgs),
    /// Un-isolate an instance.
    Unisolate(InstanceArgs),
}

fn parse_pair(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {text:?}"))
}

async fn client(server: &str) -> Result<RegistryClient<Channel>> {
    let endpoint = if server.contains("://") {
        server.to_owned()
    } else {
        format!("http://{server}")
    };
    let channel = Channel::from_shared(endpoint.clone())?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("connecting to registryd at {endpoint}"))?;
    Ok(RegistryClient::new(channel).max_decoding_message_size(64 << 20))
}

fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut table = Table::new();
    table
        .load_style(UTF8_FULL_CONDENSED)
        .set_header(headers.to_vec());
    for row in rows {
        table.add_row(row);
    }
    table.to_string()
}

fn print_json(value: &serde_json::Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn instance_json(instance: &proto::Instance) -> serde_json::Value {
    let metadata: BTreeMap<_, _> = instance.metadata.iter().collect();
    json!({
        "id": instance.id,
        "namespace": instance.namespace,
        "service": instance.service,
        "host": instance.host,
        "port": instance.port,
        "protocol": instance.protocol,
        "version": instance.version,
        "weight": instance.weight,
        "healthy": instance.healthy,
        "isolate": instance.isolate,
        "ephemeral": instance.ephemeral,
        "ttl_ms": instance.health_check.as_ref().map(|h| h.ttl_ms),
        "metadata": metadata,
        "revision": instance.revision,
    })
}

fn metadata_text(instance: &proto::Instance) -> String {
    let metadata: BTreeMap<_, _> = instance.metadata.iter().collect();
    metadata
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn instance_rows(instances: &[proto::Instance]) -> Vec<Vec<String>> {
    instances
        .iter()
        .map(|i| {
            vec![
                i.id.clone(),
                format!("{}:{}", i.host, i.port),
                if i.healthy { "healthy" } else { "unhealthy" }.to_owned(),
                if i.isolate { "yes" } else { "no" }.to_owned(),
                i.weight.to_string(),
                i.health_check
                    .as_ref()
                    .map_or("-".to_owned(), |h| format!("{}ms", h.ttl_ms)),
                metadata_text(i),
                i.revision.to_string(),
            ]
        })
        .collect()
}

const INSTANCE_HEADERS: [&str; 8] = [
    "ID", "ADDRESS", "HEALTH", "ISOLATED", "WEIGHT", "TTL", "METADATA", "REVISION",
];

async fn event_log(cli: &Cli) -> Result<JetStreamLog> {
    JetStreamLog::connect(
        &cli.nats_url,
        Streams::new(&cli.stream_prefix),
        JetStreamConfig::default(),
    )
    .await
    .with_context(|| format!("connecting to NATS at {}", cli.nats_url))
}

/// One event as a line (table mode) or a JSON object.
fn event_value(record: &Record) -> serde_json::Value {
    match serde_json::from_slice::<serde_json::Value>(&record.payload) {
        Ok(mut value) => {
            value["sequence"] = json!(record.sequence);
            value
        }
        Err(_) => json!({"sequence": record.sequence, "undecodable": true}),
    }
}

fn event_line(record: &Record) -> String {
    match record.decode() {
        Ok(envelope) => {
            let detail = match &envelope.event {
                Event::InstanceRegistered(r) => format!("{}:{}", r.host, r.port),
                Event::InstanceTurnedUnhealthy(t) => format!("deadline_ms={}", t.deadline_ms),
                Event::InstanceTurnedHealthy(t) => format!("heartbeat_ms={}", t.heartbeat_ms),
                Event::InstanceStatusChanged(c) => serde_json::to_string(c).unwrap_or_default(),
                Event::HeartbeatsReceived(h) => format!("{} beats", h.beats.len()),
                Event::SelfPreservationEntered(e) => format!("{}/{} at risk", e.expiring, e.total),
                _ => String::new(),
            };
            format!(
                "{:>8}  {}  {:<24} {}/{} {} {}",
                record.sequence,
                envelope
                    .occurred_at
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default(),
                envelope.event_type().as_str(),
                envelope.namespace,
                envelope.service,
                envelope.instance_id,
                detail
            )
        }
        Err(error) => format!("{:>8}  (undecodable: {error})", record.sequence),
    }
}

async fn events(
    cli: &Cli,
    follow: bool,
    filter: Option<String>,
    types: &[String],
    from: u64,
    limit_last: Option<usize>,
) -> Result<Vec<Record>> {
    let log = event_log(cli).await?;
    let last = log.last_sequence(StreamKind::Events).await?;
    let mut records = log
        .replay(StreamKind::Events, from, filter.as_deref())
        .await?;
    let mut kept = Vec::new();
    if !follow && last < from.max(1) {
        return Ok(kept);
    }
    loop {
        let next = if follow {
            records.next().await
        } else {
            // Without --follow, stop at what was there when we started; a filter may match
            // nothing more, so stop waiting after a moment of silence.
            match tokio::time::timeout(Duration::from_secs(1), records.next()).await {
                Ok(next) => next,
                Err(_) => break,
            }
        };
        let Some(record) = next else { break };
        let record = record?;
        let wanted = types.is_empty()
            || record
                .header(event_log::headers::EVENT_TYPE)
                .is_some_and(|t| types.iter().any(|wanted| wanted == t));
        if wanted {
            if limit_last.is_some() {
                kept.push(record.clone());
            } else if cli.output == Output::Json {
                println!("{}", serde_json::to_string(&event_value(&record))?);
            } else {
                println!("{}", event_line(&record));
            }
        }
        if !follow && record.sequence >= last {
            break;
        }
    }
    if let Some(limit) = limit_last {
        let skip = kept.len().saturating_sub(limit);
        kept.drain(..skip);
    }
    Ok(kept)
}

async fn run(cli: Cli) -> Result<()> {
    match &cli.command {
        Command::Health => {
            let endpoint = if cli.server.contains("://") {
                cli.server.clone()
            } else {
                format!("http://{}", cli.server)
            };
            let channel = Channel::from_shared(endpoint)?
                .connect_timeout(Duration::from_secs(3))
                .connect()
                .await?;
            let status = tonic_health::pb::health_client::HealthClient::new(channel)
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await?
                .into_inner()
                .status();
            println!("{}", status.as_str_name());
            if status != tonic_health::pb::health_check_response::ServingStatus::Serving {
                bail!("not serving");
            }
        }
        Command::Namespaces => {
            let mut client = client(&cli.server).await?;
            let namespaces = client
                .list_namespaces(proto::ListNamespacesRequest {})
                .await?
                .into_inner()
                .namespaces;
            if cli.output == Output::Json {
                let values: Vec<_> = namespaces
                    .iter()
                    .map(|n| json!({"name": n.name, "services": n.services, "instances": n.instances}))
                    .collect();
                return print_json(&json!(values));
            }
            let rows = namespaces
                .iter()
                .map(|n| {
                    vec![
                        n.name.clone(),
                        n.services.to_string(),
                        n.instances.to_string(),
                    ]
                })
                .collect();
            println!("{}", table(&["NAMESPACE", "SERVICES", "INSTANCES"], rows));
        }
        Command::Services { namespace } => {
            let mut client = client(&cli.server).await?;
            let namespaces = match namespace {
                Some(namespace) => vec![namespace.clone()],
                None => client
                    .list_namespaces(proto::ListNamespacesRequest {})
                    .await?
                    .into_inner()
                    .namespaces
                    .into_iter()
                    .map(|n| n.name)
                    .collect(),
            };
            let mut services = Vec::new();
            for namespace in namespaces {
                services.extend(
                    client
                        .list_services(proto::ListServicesRequest { namespace })
                        .await?
                        .into_inner()
                        .services,
                );
            }
            if cli.output == Output::Json {
                let values: Vec<_> = services
                    .iter()
                    .map(|s| {
                        json!({"namespace": s.namespace, "service": s.name, "healthy": s.healthy,
                               "total": s.total, "isolated": s.isolated, "revision": s.revision})
                    })
                    .collect();
                return print_json(&json!(values));
            }
            let rows = services
                .iter()
                .map(|s| {
                    vec![
                        s.namespace.clone(),
                        s.name.clone(),
                        format!("{}/{}", s.healthy, s.total),
                        s.isolated.to_string(),
                        s.revision.to_string(),
                    ]
                })
                .collect();
            println!(
                "{}",
                table(
                    &[
                        "NAMESPACE",
                        "SERVICE",
                        "HEALTHY/TOTAL",
                        "ISOLATED",
                        "REVISION"
                    ],
                    rows
                )
            );
        }
        Command::Instances {
            namespace,
            service,
            healthy,
        } => {
            let mut client = client(&cli.server).await?;
            let mut instances = client
                .discover(proto::DiscoverRequest {
                    namespace: namespace.clone(),
                    service: service.clone(),
                    healthy_only: *healthy,
                    include_isolated: true,
                    ..Default::default()
                })
                .await?
                .into_inner()
                .instances;
            instances.sort_by(|a, b| (&a.host, a.port).cmp(&(&b.host, b.port)));
            if cli.output == Output::Json {
                return print_json(&json!(
                    instances.iter().map(instance_json).collect::<Vec<_>>()
                ));
            }
            println!("{}", table(&INSTANCE_HEADERS, instance_rows(&instances)));
        }
        Command::Instance {
            instance,
            events: count,
        } => {
            let mut client = client(&cli.server).await?;
            let found = client
                .get_instance(proto::GetInstanceRequest {
                    instance: Some(instance.reference()?),
                })
                .await?
                .into_inner()
                .instance
                .ok_or_else(|| anyhow!("the server answered without an instance"))?;
            let streams = Streams::new(&cli.stream_prefix);
            let subject = streams.instance_subject(&found.namespace, &found.service, &found.id);
            let recent = events(&cli, false, Some(subject), &[], 0, Some(*count)).await?;
            if cli.output == Output::Json {
                let mut value = instance_json(&found);
                value["events"] = json!(recent.iter().map(event_value).collect::<Vec<_>>());
                return print_json(&value);
            }
            println!(
                "{}",
                table(
                    &INSTANCE_HEADERS,
                    instance_rows(std::slice::from_ref(&found))
                )
            );
            println!("recent events:");
            for record in &recent {
                println!("{}", event_line(record));
            }
        }
        Command::Events {
            follow,
            namespace,
            service,
            types,
            from,
        } => {
            let streams = Streams::new(&cli.stream_prefix);
            let filter = match (namespace, service) {
                (Some(namespace), Some(service)) => {
                    Some(streams.service_filter(namespace, service))
                }
                (Some(namespace), None) => Some(streams.namespace_filter(namespace)),
                _ => None,
            };
            for event_type in types {
                if event_log::EventType::parse(event_type).is_none() {
                    bail!("unknown event type {event_type:?}");
                }
            }
            events(&cli, *follow, filter, types, *from, None).await?;
        }
        Command::Register {
            namespace,
            service,
            host,
            port,
            ttl,
            weight,
            metadata,
            persistent,
            protocol,
            version,
        } => {
            let mut client = client(&cli.server).await?;
            let ttl_ms = ttl.map(|ttl| u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
            let registered = client
                .register_instance(proto::RegisterInstanceRequest {
                    namespace: namespace.clone(),
                    service: service.clone(),
                    host: host.clone(),
                    port: *port,
                    protocol: protocol.clone(),
                    version: version.clone(),
                    weight: *weight,
                    metadata: metadata.iter().cloned().collect(),
                    health_check: ttl_ms.map(|ttl_ms| proto::HealthCheck { ttl_ms }),
                    ephemeral: Some(!persistent),
                    ..Default::default()
                })
                .await?
                .into_inner();
            if cli.output == Output::Json {
                return print_json(
                    &json!({"instance_id": registered.instance_id, "revision": registered.revision}),
                );
            }
            println!(
                "registered {} (revision {})",
                registered.instance_id, registered.revision
            );
        }
        Command::Deregister(instance) => {
            let mut client = client(&cli.server).await?;
            let removed = client
                .deregister_instance(proto::DeregisterInstanceRequest {
                    instance: Some(instance.reference()?),
                    request_id: String::new(),
                })
                .await?
                .into_inner();
            if cli.output == Output::Json {
                return print_json(
                    &json!({"instance_id": removed.instance_id, "revision": removed.revision}),
                );
            }
            println!(
                "deregistered {} (revision {})",
                removed.instance_id, removed.revision
            );
        }
        Command::Heartbeat(instance) => {
            let mut client = client(&cli.server).await?;
            let beat = client
                .heartbeat(proto::HeartbeatRequest {
                    instance: Some(instance.reference()?),
                })
                .await?
                .into_inner();
            if cli.output == Output::Json {
                return print_json(
                    &json!({"instance_id": beat.instance_id, "heartbeat_interval_ms": beat.heartbeat_interval_ms}),
                );
            }
            println!(
                "heartbeat recorded for {}; next in {} ms",
                beat.instance_id, beat.heartbeat_interval_ms
            );
        }
        Command::Isolate(instance) | Command::Unisolate(instance) => {
            let isolate = matches!(cli.command, Command::Isolate(_));
            let mut client = client(&cli.server).await?;
            let updated = client
                .update_instance(proto::UpdateInstanceRequest {
                    instance: Some(instance.reference()?),
                    isolate: Some(isolate),
                    ..Default::default()
                })
                .await?
                .into_inner()
                .instance
                .ok_or_else(|| anyhow!("the server answered without an instance"))?;
            if cli.output == Output::Json {
                return print_json(&instance_json(&updated));
            }
            let verb = if isolate { "isolated" } else { "un-isolated" };
            println!("{verb} {} (revision {})", updated.id, updated.revision);
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // gRPC errors carry the server's precise message (field and rule for bad input).
            match error.downcast_ref::<tonic::Status>() {
                Some(status) => eprintln!("registryctl: {:?}: {}", status.code(), status.message()),
                None => eprintln!("registryctl: {error:#}"),
            }
            std::process::ExitCode::FAILURE
        }
    }
}
