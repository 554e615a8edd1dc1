//! Follows a service through the consumer's watched cache: prints each change, says when the
//! cache is stale (registry unreachable), and picks a target by weighted random choice.
//!
//! ```sh
//! cargo xtask up                                   # in one terminal
//! cargo run -p sdk --example provider              # in another
//! cargo run -p sdk --example consumer              # follows default/echo
//! cargo run -p sdk --example consumer -- --service echo --zone b
//! ```
//!
//! Options: `--namespace`, `--service`, `--zone` (only instances with metadata `zone`). The
//! registry's address comes from `REGISTRY_ENDPOINTS` (comma-separated; default
//! `http://127.0.0.1:50051`). Stop the registry meanwhile: the consumer keeps answering from
//! its cache and says how stale it is; start it again and it catches up.

use std::time::Duration;

use sdk::{Client, ClientConfig, Consumer, DiscoverErrorKind, Instances};

fn endpoints() -> Vec<String> {
    std::env::var("REGISTRY_ENDPOINTS")
        .unwrap_or_else(|_| sdk::DEFAULT_ENDPOINT.to_owned())
        .split(',')
        .map(str::to_owned)
        .collect()
}

fn show(instances: &Instances, zone: Option<&str>) {
    let candidates = match zone {
        Some(zone) => instances.routable().with_metadata("zone", zone),
        None => instances.routable(),
    };
    let freshness = match instances.staleness() {
        None => "live".to_owned(),
        Some(stale) => format!(
            "STALE for {:.1}s (registry unreachable)",
            stale.as_secs_f64()
        ),
    };
    println!(
        "revision {}: {} instances, {} routable, {freshness}",
        instances.revision(),
        instances.len(),
        candidates.len()
    );
    for instance in instances.iter() {
        println!(
            "  {} {:<22} healthy={:<5} isolated={:<5} weight={:<4} {:?}",
            &instance.id[..8],
            instance.address(),
            instance.healthy,
            instance.isolated,
            instance.weight,
            instance.metadata
        );
    }
    match candidates.choose_weighted() {
        Some(target) => println!("  -> would call {}", target.address()),
        None => println!("  -> nothing to call"),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut namespace = "default".to_owned();
    let mut service = "echo".to_owned();
    let mut zone = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--namespace" => namespace = value,
            "--service" => service = value,
            "--zone" => zone = Some(value),
            other => return Err(format!("unknown option {other}").into()),
        }
    }
    let consumer = Consumer::new(Client::new(ClientConfig::with_endpoints(endpoints()))?);
    let mut subscription = loop {
        match consumer.subscribe(&namespace, &service).await {
            Ok(subscription) => break subscription,
            Err(error) if error.kind() == DiscoverErrorKind::Unavailable => {
                eprintln!("{error}; retrying");
            }
            Err(error) => return Err(error.into()),
        }
    };
    println!("following {namespace}/{service}");
    show(&subscription.current(), zone.as_deref());
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            changed = subscription.changed() => show(&changed?, zone.as_deref()),
            // While stale nothing changes: say so every few seconds.
            _ = tick.tick() => {
                let now = consumer.discover(&namespace, &service).await?;
                if now.is_stale() {
                    show(&now, zone.as_deref());
                }
            }
        }
    }
    Ok(())
}
