//! Group commit for heartbeats: many beats, one JetStream message, every caller answered after
//! that message's acknowledgement.
//!
//! Callers hand their beats to one collector task through a bounded queue. The collector takes
//! whatever is queued (up to a message's worth), appends it as one `HeartbeatsReceived` batch
//! and goes on collecting while that append is in flight, with a bounded number of appends in
//! flight at once. Under light load a beat is appended alone and at once; under heavy load
//! batches fill up, so throughput is not bound by one round trip per beat.

use std::sync::Arc;

use event_log::event::{Beat, Event, HeartbeatsReceived};
use event_log::{Append, Envelope, EventLog, StreamKind};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};

/// Group-commit limits.
#[derive(Debug, Clone)]
pub struct Config {
    /// Most beats in one message (1000 beats are about 60 KB of JSON).
    pub max_beats_per_message: usize,
    /// Most heartbeat messages awaiting their acknowledgement at once. Small on purpose: while
    /// they are in flight the collector keeps collecting, so batches grow with the load
    /// instead of every caller getting a message of its own. With 64, unary heartbeats at 64
    /// in flight cost nats-server 18-26 us and registryd 34-49 us of CPU per beat; with 4,
    /// 8-9 us and 24-26 us, and the rate went from 11-17k/s to 28-29k/s (`cargo xtask bench`).
    pub max_in_flight: usize,
    /// Calls queued for the collector before callers wait.
    pub queue: usize,
    /// Heartbeat partition (subject suffix) this server appends to.
    pub partition: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_beats_per_message: 1000,
            max_in_flight: 4,
            queue: 16_384,
            partition: 0,
        }
    }
}

type Done = oneshot::Sender<std::result::Result<(), String>>;

#[derive(Debug)]
struct Job {
    beats: Vec<Beat>,
    done: Done,
}

/// Handle to the collector. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Batcher {
    queue: mpsc::Sender<Job>,
}

impl Batcher {
    /// Starts the collector. It stops after `shutdown`, once every queued beat is appended.
    pub fn spawn(
        config: Config,
        log: Arc<dyn EventLog>,
        shutdown: CancellationToken,
    ) -> (Batcher, tokio::task::JoinHandle<()>) {
        let (queue, receiver) = mpsc::channel(config.queue.max(1));
        let task = tokio::spawn(collect(config, log, receiver, shutdown));
        (Batcher { queue }, task)
    }

    /// Records beats; returns once they are in the log.
    pub async fn record(&self, beats: Vec<Beat>) -> Result<()> {
        if beats.is_empty() {
            return Ok(());
        }
        let (done, answer) = oneshot::channel();
        self.queue
            .send(Job { beats, done })
            .await
            .map_err(|_| Error::Unavailable("server is shutting down".into()))?;
        match answer.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(Error::Unavailable(error)),
            Err(_) => Err(Error::Unavailable("heartbeat was not recorded".into())),
        }
    }
}

async fn collect(
    config: Config,
    log: Arc<dyn EventLog>,
    mut receiver: mpsc::Receiver<Job>,
    shutdown: CancellationToken,
) {
    let in_flight = Arc::new(Semaphore::new(config.max_in_flight.max(1)));
    let subject = log.streams().heartbeat_subject(config.partition);
    let mut carried: Option<Job> = None;
    loop {
        let first = match carried.take() {
            Some(job) => job,
            None => tokio::select! {
                job = receiver.recv() => match job {
                    Some(job) => job,
                    None => break,
                },
                () = shutdown.cancelled() => {
                    // Stop taking new work, then flush what is already queued.
                    receiver.close();
                    match receiver.recv().await {
                        Some(job) => job,
                        None => break,
                    }
                }
            },
        };
        let mut beats = first.beats;
        let mut waiters = vec![first.done];
        while beats.len() < config.max_beats_per_message {
            match receiver.try_recv() {
                Ok(job) if beats.len() + job.beats.len() <= config.max_beats_per_message => {
                    beats.extend(job.beats);
                    waiters.push(job.done);
                }
                Ok(job) => {
                    carried = Some(job);
                    break;
                }
                Err(_) => break,
            }
        }
        let Ok(permit) = Arc::clone(&in_flight).acquire_owned().await else {
            break;
        };
        let log = Arc::clone(&log);
        let subject = subject.clone();
        tokio::spawn(async move {
            let envelope = Envelope::new(
                "",
                "",
                "",
                Event::HeartbeatsReceived(HeartbeatsReceived { beats }),
            );
            let result = match envelope.encode() {
                Ok(payload) => log
                    .append(StreamKind::Heartbeats, Append::new(subject, payload))
                    .await
                    .map(|_| ())
                    .map_err(|error| error.to_string()),
                Err(error) => Err(error.to_string()),
            };
            if let Err(error) = &result {
                tracing::warn!(%error, beats = waiters.len(), "heartbeat batch not recorded");
            }
            for waiter in waiters {
                // A caller that went away no longer needs its answer.
                let _ = waiter.send(result.clone());
            }
            drop(permit);
        });
    }
    // Wait for the appends still in flight, so every answered beat is in the log.
    let _ = in_flight
        .acquire_many(config.max_in_flight.max(1) as u32)
        .await;
}
