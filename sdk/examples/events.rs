//! Prints the registry's events for one service from the start of the stream, then follows
//! new ones: registrations, status changes, health transitions, removals.
//!
//! ```sh
//! cargo xtask up                                   # in one terminal
//! cargo run -p sdk --example events                # default/echo, from the beginning
//! cargo run -p sdk --example events -- --all --from 100
//! cargo run -p sdk --example events -- --durable audit   # resumes where the last run stopped
//! ```
//!
//! Options: `--namespace`, `--service`, `--all` (every service), `--from SEQUENCE`, `--new`
//! (only new events), `--durable NAME`. NATS comes from `NATS_URL` (default
//! `nats://127.0.0.1:4222`), the stream prefix from `REGISTRY_STREAM_PREFIX` (default
//! `registry`).

use std::time::Duration;

use sdk::{EventRecord, Events, EventsErrorKind, Scope, StartAt};

fn print(event: &EventRecord) {
    let envelope = &event.envelope;
    println!(
        "#{:<6} {} {:<24} {}/{} {} {:?}",
        event.sequence,
        envelope.occurred_at,
        envelope.event_type().as_str(),
        envelope.namespace,
        envelope.service,
        envelope.instance_id.get(..8).unwrap_or(""),
        envelope.event
    );
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut namespace = "default".to_owned();
    let mut service = "echo".to_owned();
    let mut all = false;
    let mut start = StartAt::Beginning;
    let mut durable = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--all" => all = true,
            "--new" => start = StartAt::New,
            "--namespace" | "--service" | "--from" | "--durable" => {
                let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
                match flag.as_str() {
                    "--namespace" => namespace = value,
                    "--service" => service = value,
                    "--from" => start = StartAt::Sequence(value.parse()?),
                    _ => durable = Some(value),
                }
            }
            other => return Err(format!("unknown option {other}").into()),
        }
    }
    let nats_url = std::env::var("NATS_URL").unwrap_or_else(|_| sdk::DEFAULT_NATS_URL.to_owned());
    let prefix = std::env::var("REGISTRY_STREAM_PREFIX")
        .unwrap_or_else(|_| sdk::DEFAULT_STREAM_PREFIX.to_owned());
    let scope = if all {
        Scope::All
    } else {
        Scope::service(&namespace, &service)
    };
    let events = Events::connect(&nats_url, &prefix).await?;
    println!(
        "{} events in the stream; following {scope:?}",
        events.last_sequence().await?
    );

    if let Some(name) = durable {
        let mut consumer = events.durable(&name, scope, start).await?;
        loop {
            let batch = tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                batch = consumer.next_batch(100, Duration::from_secs(1)) => batch,
            };
            match batch {
                Ok(batch) => {
                    batch.iter().for_each(print);
                    if let Some(last) = batch.last() {
                        consumer.ack_through(last.sequence).await?;
                    }
                }
                Err(error) if error.kind() == EventsErrorKind::Decode => {
                    // An audit trail must not lose events: stop, do not acknowledge past it.
                    return Err(error.into());
                }
                Err(error) => eprintln!("{error}; retrying"),
            }
        }
        return Ok(());
    }

    let mut stream = events.follow(scope, start).await?;
    loop {
        let next = tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            next = futures::StreamExt::next(&mut stream) => next,
        };
        match next {
            Some(Ok(event)) => print(&event),
            Some(Err(error)) => eprintln!("{error}"),
            None => break,
        }
    }
    Ok(())
}
