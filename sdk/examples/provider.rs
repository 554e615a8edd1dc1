//! Registers an instance and keeps it alive until Ctrl-C, then deregisters it.
//!
//! ```sh
//! cargo xtask up                                   # in one terminal
//! cargo run -p sdk --example provider              # default/echo at 127.0.0.1:8080
//! cargo run -p sdk --example provider -- --port 8081 --metadata zone=b --ttl-ms 2000
//! ```
//!
//! Options: `--namespace`, `--service`, `--host`, `--port`, `--ttl-ms`, `--weight`,
//! `--metadata key=value` (repeatable). The registry's address comes from `REGISTRY_ENDPOINTS`
//! (comma-separated; default `http://127.0.0.1:50051`).

use std::time::Duration;

use sdk::{Client, ClientConfig, InstanceSpec, LeaseStatus, Provider};

fn endpoints() -> Vec<String> {
    std::env::var("REGISTRY_ENDPOINTS")
        .unwrap_or_else(|_| sdk::DEFAULT_ENDPOINT.to_owned())
        .split(',')
        .map(str::to_owned)
        .collect()
}

fn spec_from_args() -> Result<InstanceSpec, String> {
    let mut spec = InstanceSpec::new("default", "echo", "127.0.0.1", 8080);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--namespace" => spec.namespace = value,
            "--service" => spec.service = value,
            "--host" => spec.host = value,
            "--port" => spec.port = value.parse().map_err(|e| format!("--port: {e}"))?,
            "--ttl-ms" => {
                let ms: u64 = value.parse().map_err(|e| format!("--ttl-ms: {e}"))?;
                spec = spec.ttl(Duration::from_millis(ms));
            }
            "--weight" => spec = spec.weight(value.parse().map_err(|e| format!("--weight: {e}"))?),
            "--metadata" => {
                let (key, value) = value
                    .split_once('=')
                    .ok_or_else(|| "--metadata takes key=value".to_owned())?;
                spec = spec.metadata(key, value);
            }
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok(spec)
}

fn describe(status: &LeaseStatus) -> String {
    match status {
        LeaseStatus::Active {
            interval,
            last_heartbeat,
        } => format!(
            "active, beating every {:?}{}",
            interval.unwrap_or_default(),
            if last_heartbeat.is_some() {
                ""
            } else {
                " (no beat yet)"
            }
        ),
        LeaseStatus::Unreachable { since, error } => {
            format!("UNREACHABLE for {:?}: {error}", since.elapsed())
        }
        other => format!("{other:?}"),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let spec = spec_from_args()?;
    let client = Client::new(ClientConfig::with_endpoints(endpoints()))?;
    let provider = Provider::new(client.clone());
    println!(
        "registering {}/{} at {}:{} with {}",
        spec.namespace,
        spec.service,
        spec.host,
        spec.port,
        client.current_endpoint()
    );
    let mut handle = provider.register(spec).await?;
    println!(
        "registered {} (revision {})",
        handle.id(),
        handle.registered().revision
    );
    let mut shown = std::mem::discriminant(&handle.status());
    println!("status: {}", describe(&handle.status()));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            status = handle.wait_for(|status| std::mem::discriminant(status) != shown) => {
                shown = std::mem::discriminant(&status);
                println!("status: {}", describe(&status));
            }
        }
    }
    let stats = provider.stats();
    println!(
        "sent {} heartbeats in {} messages over {} stream(s); deregistering",
        stats.heartbeats_sent, stats.batches_sent, stats.streams_opened
    );
    let report = provider.shutdown().await;
    for id in &report.deregistered {
        println!("deregistered {id}");
    }
    for (id, error) in &report.failed {
        eprintln!("could not deregister {id}: {error}");
    }
    Ok(())
}
