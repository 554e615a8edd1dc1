//! The provider side: register instances and keep them alive.
//!
//! A [`Provider`] runs one background task, the *keeper*, that owns every instance registered
//! through it. The keeper
//!
//! * sends the heartbeats of all its instances over **one** `StreamHeartbeats` stream, batching
//!   the beats that fall due together (up to 1,000 per message) instead of one task and one
//!   RPC per instance;
//! * beats each instance at the interval the server advertises (the instance's TTL), minus a
//!   random jitter so that a fleet registered at once does not beat in lock-step;
//! * registers an instance again when the server answers NOT_FOUND (the server lost or expired
//!   it), with the same id (the id is derived from the address, so this never duplicates);
//! * on a broken stream or an unreachable server, reconnects with capped exponential backoff,
//!   moving to the next configured server, after checking that the server has caught up with
//!   the event log (so that a restarted server does not answer NOT_FOUND for everything);
//! * deregisters an instance when its [`InstanceHandle`] is dropped or
//!   [`InstanceHandle::deregister`] is called, and every instance on [`Provider::shutdown`].
//!
//! All operations on one instance are serialised in the keeper: a deregistration waits for a
//! registration in flight, so a late registration can never resurrect a deregistered instance.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use rand::RngExt;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::client::{Backoff, Client};
use crate::error::{DeregisterError, DeregisterErrorKind, Error, RegisterError, RegisterErrorKind};
use crate::instance::{InstanceSpec, Registered, by_id};
use crate::proto;
use crate::proto::heartbeat_result::Status as BeatStatus;

/// Most instances in one heartbeat message (the server's limit).
pub const MAX_BATCH: usize = 1000;

/// Settings of a [`Provider`].
#[derive(Debug, Clone)]
pub struct ProviderConfig {
    /// Each beat is sent up to this share of the interval early, at random (0.0..1.0), so that
    /// instances registered together spread out.
    pub jitter: f64,
    /// Beats falling due within this window of each other travel in one message.
    pub coalesce: Duration,
    /// Smallest interval honoured, whatever the server advertises (protects against a
    /// misbehaving server asking for a flood).
    pub min_interval: Duration,
    /// Most instances per heartbeat message (at most [`MAX_BATCH`]).
    pub max_batch: usize,
    /// Heartbeat messages awaiting their answer at once on the stream.
    pub max_batches_in_flight: usize,
    /// Registrations in flight at once (for example when a restarted server has lost many
    /// instances and all of them register again).
    pub registration_concurrency: usize,
    /// How long [`Provider::shutdown`] and each deregistration may take.
    pub shutdown_timeout: Duration,
}

impl Default for ProviderConfig {
    fn default() -> Self {
        ProviderConfig {
            jitter: 0.1,
            coalesce: Duration::from_millis(200),
            min_interval: Duration::from_millis(500),
            max_batch: MAX_BATCH,
            max_batches_in_flight: 8,
            registration_concurrency: 32,
            shutdown_timeout: Duration::from_secs(10),
        }
    }
}

/// Where an instance's lease stands, as its [`InstanceHandle`] sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseStatus {
    /// Being registered (first time, or again after the server answered NOT_FOUND).
    Registering,
    /// Registered; heartbeats are acknowledged.
    Active {
        /// The interval the server asked for (`None`: no health check, no heartbeats).
        interval: Option<Duration>,
        /// When the last heartbeat was acknowledged.
        last_heartbeat: Option<Instant>,
    },
    /// Heartbeats cannot be delivered: no server is reachable (or ready). The keeper keeps
    /// trying; the instance turns unhealthy on the server after `ratio x TTL`.
    Unreachable {
        /// When delivery started failing.
        since: Instant,
        /// The last failure.
        error: String,
    },
    /// The server refused the instance (invalid description). Nothing more is attempted.
    Failed {
        /// Why.
        error: String,
    },
    /// Being deregistered.
    Deregistering,
    /// Deregistered (or given up at shutdown).
    Deregistered,
}

impl LeaseStatus {
    /// True for [`LeaseStatus::Active`].
    ///
    /// ```
    /// assert!(!sdk::LeaseStatus::Registering.is_active());
    /// ```
    pub fn is_active(&self) -> bool {
        matches!(self, LeaseStatus::Active { .. })
    }
}

/// Counters of a provider, for tests and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProviderStats {
    /// Instances the provider holds.
    pub instances: u64,
    /// Heartbeat streams opened (1 in a steady state; each reconnect adds one).
    pub streams_opened: u64,
    /// Heartbeat streams that broke.
    pub stream_failures: u64,
    /// Heartbeat messages sent.
    pub batches_sent: u64,
    /// Individual heartbeats sent.
    pub heartbeats_sent: u64,
    /// Heartbeats the server acknowledged.
    pub heartbeats_acknowledged: u64,
    /// Heartbeats answered NOT_FOUND.
    pub not_found: u64,
    /// Successful registrations, including re-registrations.
    pub registrations: u64,
    /// Successful deregistrations.
    pub deregistrations: u64,
}

#[derive(Debug, Default)]
struct Stats {
    instances: AtomicU64,
    streams_opened: AtomicU64,
    stream_failures: AtomicU64,
    batches_sent: AtomicU64,
    heartbeats_sent: AtomicU64,
    heartbeats_acknowledged: AtomicU64,
    not_found: AtomicU64,
    registrations: AtomicU64,
    deregistrations: AtomicU64,
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

impl Stats {
    fn snapshot(&self) -> ProviderStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ProviderStats {
            instances: get(&self.instances),
            streams_opened: get(&self.streams_opened),
            stream_failures: get(&self.stream_failures),
            batches_sent: get(&self.batches_sent),
            heartbeats_sent: get(&self.heartbeats_sent),
            heartbeats_acknowledged: get(&self.heartbeats_acknowledged),
            not_found: get(&self.not_found),
            registrations: get(&self.registrations),
            deregistrations: get(&self.deregistrations),
        }
    }
}

/// What [`Provider::shutdown`] did.
#[derive(Debug, Default)]
pub struct ShutdownReport {
    /// Instances deregistered.
    pub deregistered: Vec<String>,
    /// Instances that could not be deregistered (they expire with their lease if ephemeral).
    pub failed: Vec<(String, DeregisterError)>,
}

impl ShutdownReport {
    /// True when every instance was deregistered.
    pub fn is_clean(&self) -> bool {
        self.failed.is_empty()
    }
}

struct Admitted {
    generation: u64,
    status: watch::Receiver<LeaseStatus>,
    registered: Registered,
}

type RegisterReply = oneshot::Sender<Result<Admitted, RegisterError>>;
type DeregisterReply = oneshot::Sender<Result<(), DeregisterError>>;

enum Command {
    Register {
        spec: InstanceSpec,
        reply: RegisterReply,
    },
    Deregister {
        id: String,
        /// `Some`: only if the instance is still at this generation (a dropped handle).
        generation: Option<u64>,
        reply: Option<DeregisterReply>,
    },
    Shutdown {
        reply: oneshot::Sender<ShutdownReport>,
    },
}

/// Registers instances and keeps them alive over one batched heartbeat stream. Cheap to clone;
/// clones share the keeper task. Create it inside a Tokio runtime.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use sdk::{Client, InstanceSpec, Provider};
///
/// let provider = Provider::new(Client::connect_to("127.0.0.1:50051")?);
/// let handle = provider
///     .register(InstanceSpec::new("default", "echo", "10.0.0.1", 8080))
///     .await?;
/// println!("registered {}: {:?}", handle.id(), handle.status());
/// // ... serve ...
/// let report = provider.shutdown().await; // deregisters every instance
/// assert!(report.is_clean());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Provider {
    commands: mpsc::UnboundedSender<Command>,
    stats: Arc<Stats>,
    client: Client,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Register { spec, .. } => write!(f, "Register({})", spec.id()),
            Command::Deregister { id, .. } => write!(f, "Deregister({id})"),
            Command::Shutdown { .. } => f.write_str("Shutdown"),
        }
    }
}

impl Provider {
    /// A provider with the default settings.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), sdk::BuildError> {
    /// let provider = sdk::Provider::new(sdk::Client::connect_to("127.0.0.1:50051")?);
    /// # Ok(()) }
    /// ```
    pub fn new(client: Client) -> Provider {
        Provider::with_config(client, ProviderConfig::default())
    }

    /// A provider with `config`.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), sdk::BuildError> {
    /// use std::time::Duration;
    /// let config = sdk::ProviderConfig {
    ///     shutdown_timeout: Duration::from_secs(3),
    ///     ..Default::default()
    /// };
    /// let provider = sdk::Provider::with_config(sdk::Client::connect_to("127.0.0.1:50051")?, config);
    /// # Ok(()) }
    /// ```
    pub fn with_config(client: Client, mut config: ProviderConfig) -> Provider {
        config.max_batch = config.max_batch.clamp(1, MAX_BATCH);
        config.max_batches_in_flight = config.max_batches_in_flight.max(1);
        config.registration_concurrency = config.registration_concurrency.max(1);
        config.jitter = if config.jitter.is_finite() {
            config.jitter.clamp(0.0, 0.9)
        } else {
            0.0
        };
        config.min_interval = config.min_interval.max(Duration::from_millis(10));
        let (commands, receiver) = mpsc::unbounded_channel();
        let stats = Arc::new(Stats::default());
        let keeper = Keeper::new(client.clone(), config, Arc::clone(&stats));
        tokio::spawn(keeper.run(receiver));
        Provider {
            commands,
            stats,
            client,
        }
    }

    /// The client the provider uses.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Registers `spec` and keeps it alive until the returned handle is dropped or
    /// deregistered, or the provider shuts down. Returns once the server has accepted the
    /// registration (retrying transient failures across servers until the client's retry
    /// timeout). Registering an address this provider already holds updates it; the newest
    /// handle then owns the instance.
    ///
    /// ```no_run
    /// # async fn demo(provider: sdk::Provider) -> Result<(), Box<dyn std::error::Error>> {
    /// use sdk::{InstanceSpec, RegisterErrorKind};
    /// match provider.register(InstanceSpec::new("default", "echo", "10.0.0.1", 8080)).await {
    ///     Ok(handle) => println!("registered {}", handle.id()),
    ///     Err(e) if e.kind() == RegisterErrorKind::InvalidArgument => {
    ///         for violation in e.violations() {
    ///             eprintln!("{}: {}", violation.field, violation.description);
    ///         }
    ///     }
    ///     Err(e) => return Err(e.into()),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn register(&self, spec: InstanceSpec) -> Result<InstanceHandle, RegisterError> {
        let id = spec.id();
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Register { spec, reply })
            .map_err(|_| closed_register())?;
        let admitted = answer.await.map_err(|_| closed_register())??;
        Ok(InstanceHandle {
            id,
            generation: admitted.generation,
            commands: self.commands.clone(),
            status: admitted.status,
            registered: admitted.registered,
            armed: true,
        })
    }

    /// Deregisters every instance (concurrently, within the configured shutdown timeout) and
    /// stops the keeper. Later registrations fail with [`RegisterErrorKind::Closed`].
    ///
    /// ```no_run
    /// # async fn demo(provider: sdk::Provider) {
    /// let report = provider.shutdown().await;
    /// for (id, error) in &report.failed {
    ///     eprintln!("{id} not deregistered: {error}");
    /// }
    /// # }
    /// ```
    pub async fn shutdown(&self) -> ShutdownReport {
        let (reply, answer) = oneshot::channel();
        if self.commands.send(Command::Shutdown { reply }).is_err() {
            return ShutdownReport::default();
        }
        answer.await.unwrap_or_default()
    }

    /// The provider's counters.
    ///
    /// ```no_run
    /// # fn demo(provider: sdk::Provider) {
    /// let stats = provider.stats();
    /// println!("{} beats over {} stream(s)", stats.heartbeats_sent, stats.streams_opened);
    /// # }
    /// ```
    pub fn stats(&self) -> ProviderStats {
        self.stats.snapshot()
    }
}

fn closed_register() -> RegisterError {
    Error::new(RegisterErrorKind::Closed, "the provider has shut down")
}

fn closed_deregister() -> DeregisterError {
    Error::new(DeregisterErrorKind::Closed, "the provider has shut down")
}

/// Keeps one registered instance alive. Dropping it deregisters the instance (in the
/// background); [`InstanceHandle::deregister`] does so and reports the outcome.
#[must_use = "dropping the handle deregisters the instance"]
#[derive(Debug)]
pub struct InstanceHandle {
    id: String,
    generation: u64,
    commands: mpsc::UnboundedSender<Command>,
    status: watch::Receiver<LeaseStatus>,
    registered: Registered,
    armed: bool,
}

impl InstanceHandle {
    /// The instance id.
    ///
    /// ```no_run
    /// # async fn demo(handle: sdk::InstanceHandle) {
    /// println!("{}", handle.id());
    /// # }
    /// ```
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The server's answer to the first registration through this handle.
    ///
    /// ```no_run
    /// # async fn demo(handle: sdk::InstanceHandle) {
    /// println!("registered at revision {}", handle.registered().revision);
    /// # }
    /// ```
    pub fn registered(&self) -> &Registered {
        &self.registered
    }

    /// The lease status now.
    ///
    /// ```no_run
    /// # async fn demo(handle: sdk::InstanceHandle) {
    /// if let sdk::LeaseStatus::Unreachable { since, .. } = handle.status() {
    ///     eprintln!("no heartbeat delivered for {:?}", since.elapsed());
    /// }
    /// # }
    /// ```
    pub fn status(&self) -> LeaseStatus {
        self.status.borrow().clone()
    }

    /// Waits until the status satisfies `predicate` and returns it. Returns the last status
    /// when the provider has stopped without it ever matching. Bound it with
    /// `tokio::time::timeout`.
    ///
    /// ```no_run
    /// # async fn demo(mut handle: sdk::InstanceHandle) {
    /// use std::time::Duration;
    /// let status = tokio::time::timeout(
    ///     Duration::from_secs(10),
    ///     handle.wait_for(|status| matches!(status, sdk::LeaseStatus::Unreachable { .. })),
    /// )
    /// .await;
    /// # }
    /// ```
    pub async fn wait_for(&mut self, predicate: impl FnMut(&LeaseStatus) -> bool) -> LeaseStatus {
        let matched = self
            .status
            .wait_for(predicate)
            .await
            .map(|status| status.clone());
        matched.unwrap_or_else(|_| self.status.borrow().clone())
    }

    /// Deregisters the instance now and reports the outcome. An instance the server no longer
    /// knows counts as deregistered.
    ///
    /// ```no_run
    /// # async fn demo(handle: sdk::InstanceHandle) -> Result<(), sdk::DeregisterError> {
    /// handle.deregister().await?;
    /// # Ok(()) }
    /// ```
    pub async fn deregister(mut self) -> Result<(), DeregisterError> {
        self.armed = false;
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Deregister {
                id: self.id.clone(),
                generation: None,
                reply: Some(reply),
            })
            .map_err(|_| closed_deregister())?;
        answer.await.map_err(|_| closed_deregister())?
    }
}

impl Drop for InstanceHandle {
    fn drop(&mut self) {
        if self.armed {
            // The keeper may be gone (provider shut down): then there is nothing to do.
            let _ = self.commands.send(Command::Deregister {
                id: self.id.clone(),
                generation: Some(self.generation),
                reply: None,
            });
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The keeper.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Registration {
    /// Nothing to do.
    Idle,
    /// Waiting for a free registration slot.
    Queued,
    /// In flight.
    Running,
}

struct Removal {
    waiters: Vec<DeregisterReply>,
    started: bool,
}

struct Entry {
    spec: InstanceSpec,
    generation: u64,
    /// Heartbeat interval; `None`: no heartbeats (no health check, or not registered yet).
    interval: Option<Duration>,
    /// Key in the keeper's `due` set, when scheduled.
    due: Option<Instant>,
    beat_in_flight: bool,
    registration: Registration,
    /// Register again once the running registration completes (the spec changed meanwhile).
    register_again: bool,
    /// Cancels the retry loop of a running registration (between attempts).
    cancel: CancellationToken,
    ever_registered: bool,
    /// A registration was sent at least once, so the server may hold the instance even if no
    /// answer said so (an attempt cut short by a timeout or a cancellation).
    maybe_on_server: bool,
    status: watch::Sender<LeaseStatus>,
    /// Callers of `register` waiting for the outcome.
    waiters: Vec<RegisterReply>,
    removal: Option<Removal>,
}

impl Entry {
    /// Publishes `status` (every acknowledged beat too: waiting handles can then wait for a
    /// beat after a given instant).
    fn set_status(&self, status: LeaseStatus) {
        self.status.send_replace(status);
    }
}

struct RegistrationDone {
    id: String,
    result: Result<Registered, RegisterError>,
}

struct InFlight {
    beats: Vec<(String, u64)>,
    sent_at: Instant,
}

struct Up {
    index: usize,
    sender: mpsc::Sender<proto::BatchHeartbeatRequest>,
    responses: tonic::Streaming<proto::BatchHeartbeatResponse>,
}

enum Link {
    /// No stream, none needed yet.
    Idle,
    /// Broken; reconnect at `retry_at`.
    Down {
        retry_at: Instant,
    },
    Connecting(JoinHandle<Result<Box<Up>, (usize, String)>>),
    Up(Box<Up>),
}

struct Keeper {
    client: Client,
    config: ProviderConfig,
    stats: Arc<Stats>,
    entries: HashMap<String, Entry>,
    due: BTreeSet<(Instant, String)>,
    next_generation: u64,
    register_queue: VecDeque<String>,
    registrations: JoinSet<RegistrationDone>,
    deregistrations: JoinSet<(String, Result<(), DeregisterError>)>,
    /// Registrations for addresses whose deregistration is in flight, replayed after it.
    after_removal: HashMap<String, Vec<(InstanceSpec, RegisterReply)>>,
    link: Link,
    in_flight: VecDeque<InFlight>,
    reconnect: Backoff,
    /// Since when heartbeats cannot be delivered, and why.
    unreachable: Option<(Instant, String)>,
    shutting_down: bool,
    shutdown_replies: Vec<oneshot::Sender<ShutdownReport>>,
    report: ShutdownReport,
}

/// What happened on the heartbeat link.
enum LinkEvent {
    Connected(Result<Box<Up>, (usize, String)>),
    Response(Option<Result<proto::BatchHeartbeatResponse, tonic::Status>>),
}

/// The next event of the link: a connection attempt finishing, or an answer on the stream.
/// Pending forever while the link is idle or down.
async fn link_event(link: &mut Link) -> LinkEvent {
    match link {
        Link::Connecting(task) => LinkEvent::Connected(match task.await {
            Ok(result) => result,
            Err(join) => Err((0, format!("connect task failed: {join}"))),
        }),
        Link::Up(up) => LinkEvent::Response(up.responses.next().await),
        Link::Idle | Link::Down { .. } => std::future::pending().await,
    }
}

impl Keeper {
    fn new(client: Client, config: ProviderConfig, stats: Arc<Stats>) -> Keeper {
        let reconnect = client.backoff();
        Keeper {
            client,
            config,
            stats,
            entries: HashMap::new(),
            due: BTreeSet::new(),
            next_generation: 0,
            register_queue: VecDeque::new(),
            registrations: JoinSet::new(),
            deregistrations: JoinSet::new(),
            after_removal: HashMap::new(),
            link: Link::Idle,
            in_flight: VecDeque::new(),
            reconnect,
            unreachable: None,
            shutting_down: false,
            shutdown_replies: Vec::new(),
            report: ShutdownReport::default(),
        }
    }

    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut commands_open = true;
        loop {
            let now = Instant::now();
            self.maintain(now);
            if self.finished() {
                break;
            }
            let wake = self.next_wakeup(now);
            tokio::select! {
                command = commands.recv(), if commands_open => match command {
                    Some(command) => self.on_command(command),
                    None => {
                        // Every provider and handle is gone: shut down as if asked.
                        commands_open = false;
                        self.begin_shutdown();
                    }
                },
                Some(done) = self.registrations.join_next(), if !self.registrations.is_empty() => {
                    match done {
                        Ok(done) => self.on_registered(done),
                        Err(join) => tracing::error!(error = %join, "registration task failed"),
                    }
                }
                Some(done) = self.deregistrations.join_next(), if !self.deregistrations.is_empty() => {
                    match done {
                        Ok((id, result)) => self.on_deregistered(&id, result),
                        Err(join) => tracing::error!(error = %join, "deregistration task failed"),
                    }
                }
                event = link_event(&mut self.link) => match event {
                    LinkEvent::Connected(connected) => self.on_connected(connected),
                    LinkEvent::Response(response) => self.on_response(response),
                },
                () = tokio::time::sleep_until(wake) => {}
            }
        }
        for reply in self.shutdown_replies.drain(..) {
            let _ = reply.send(std::mem::take(&mut self.report));
        }
        tracing::debug!("provider stopped");
    }

    fn finished(&self) -> bool {
        self.shutting_down
            && self.entries.is_empty()
            && self.registrations.is_empty()
            && self.deregistrations.is_empty()
    }

    fn next_wakeup(&self, now: Instant) -> Instant {
        let mut wake = now + Duration::from_secs(3600);
        match &self.link {
            Link::Up(_) => {
                if self.in_flight.len() < self.config.max_batches_in_flight
                    && let Some((at, _)) = self.due.first()
                {
                    wake = wake.min(*at);
                }
                if let Some(oldest) = self.in_flight.front() {
                    wake = wake.min(oldest.sent_at + self.client.config().request_timeout);
                }
            }
            Link::Down { retry_at } => wake = wake.min(*retry_at),
            Link::Idle | Link::Connecting(_) => {}
        }
        wake
    }

    // --- commands ---------------------------------------------------------------------------

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Register { spec, reply } => self.on_register(spec, reply),
            Command::Deregister {
                id,
                generation,
                reply,
            } => self.on_deregister(&id, generation, reply),
            Command::Shutdown { reply } => {
                self.shutdown_replies.push(reply);
                self.begin_shutdown();
            }
        }
    }

    fn on_register(&mut self, spec: InstanceSpec, reply: RegisterReply) {
        if self.shutting_down {
            let _ = reply.send(Err(closed_register()));
            return;
        }
        let id = spec.id();
        self.next_generation += 1;
        let generation = self.next_generation;
        match self.entries.get_mut(&id) {
            Some(entry) if entry.removal.is_some() => {
                // Serialise with the deregistration in flight; replayed when it completes.
                self.after_removal
                    .entry(id)
                    .or_default()
                    .push((spec, reply));
            }
            Some(entry) => {
                entry.spec = spec;
                entry.generation = generation;
                entry.waiters.push(reply);
                match entry.registration {
                    Registration::Running => entry.register_again = true,
                    Registration::Queued => {}
                    Registration::Idle => {
                        entry.registration = Registration::Queued;
                        self.register_queue.push_back(id);
                    }
                }
            }
            None => {
                let (status, _) = watch::channel(LeaseStatus::Registering);
                self.entries.insert(
                    id.clone(),
                    Entry {
                        spec,
                        generation,
                        interval: None,
                        due: None,
                        beat_in_flight: false,
                        registration: Registration::Queued,
                        register_again: false,
                        cancel: CancellationToken::new(),
                        ever_registered: false,
                        maybe_on_server: false,
                        status,
                        waiters: vec![reply],
                        removal: None,
                    },
                );
                self.stats
                    .instances
                    .store(self.entries.len() as u64, Ordering::Relaxed);
                self.register_queue.push_back(id);
            }
        }
    }

    fn on_deregister(&mut self, id: &str, generation: Option<u64>, reply: Option<DeregisterReply>) {
        let Some(entry) = self.entries.get_mut(id) else {
            if let Some(reply) = reply {
                let _ = reply.send(Ok(()));
            }
            return;
        };
        if generation.is_some_and(|generation| generation != entry.generation) {
            // A superseded handle was dropped; the newer registration owns the instance.
            if let Some(reply) = reply {
                let _ = reply.send(Ok(()));
            }
            return;
        }
        if let Some(removal) = &mut entry.removal {
            removal.waiters.extend(reply);
            return;
        }
        entry.removal = Some(Removal {
            waiters: reply.into_iter().collect(),
            started: false,
        });
        entry.set_status(LeaseStatus::Deregistering);
        entry.cancel.cancel();
        for waiter in entry.waiters.drain(..) {
            let _ = waiter.send(Err(Error::new(
                RegisterErrorKind::Closed,
                "deregistered while registering",
            )));
        }
        if let Some(at) = entry.due.take() {
            self.due.remove(&(at, id.to_owned()));
        }
        match entry.registration {
            // Wait for the registration in flight: deregistering before it lands could let it
            // resurrect the instance.
            Registration::Running => {}
            Registration::Queued | Registration::Idle => {
                entry.registration = Registration::Idle;
                self.start_deregistration(id);
            }
        }
    }

    fn begin_shutdown(&mut self) {
        if self.shutting_down {
            return;
        }
        self.shutting_down = true;
        let ids: Vec<String> = self.entries.keys().cloned().collect();
        for id in ids {
            self.on_deregister(&id, None, None);
        }
        for (_, waiting) in self.after_removal.drain() {
            for (_, reply) in waiting {
                let _ = reply.send(Err(closed_register()));
            }
        }
    }

    // --- registration -----------------------------------------------------------------------

    fn start_registrations(&mut self) {
        while self.registrations.len() < self.config.registration_concurrency {
            let Some(id) = self.register_queue.pop_front() else {
                return;
            };
            let Some(entry) = self.entries.get_mut(&id) else {
                continue;
            };
            if entry.registration != Registration::Queued || entry.removal.is_some() {
                continue;
            }
            entry.registration = Registration::Running;
            entry.maybe_on_server = true;
            entry.cancel = CancellationToken::new();
            let cancel = entry.cancel.clone();
            let spec = entry.spec.clone();
            // A caller waiting in `register` gets an answer within the retry timeout; a
            // re-registration in the background retries until it succeeds or is cancelled.
            let deadline = (!entry.waiters.is_empty())
                .then(|| Instant::now() + self.client.config().retry_timeout);
            let client = self.client.clone();
            self.registrations.spawn(async move {
                let request_id = uuid::Uuid::new_v4().simple().to_string();
                let result = client
                    .register_until(&spec, &request_id, deadline, Some(&cancel))
                    .await;
                RegistrationDone {
                    id: spec.id(),
                    result,
                }
            });
        }
    }

    fn on_registered(&mut self, done: RegistrationDone) {
        let Some(entry) = self.entries.get_mut(&done.id) else {
            return;
        };
        entry.registration = Registration::Idle;
        if entry.removal.is_some() {
            let id = done.id;
            self.start_deregistration(&id);
            return;
        }
        if entry.register_again {
            entry.register_again = false;
            entry.registration = Registration::Queued;
            self.register_queue.push_back(done.id);
            return;
        }
        match done.result {
            Ok(registered) => {
                bump(&self.stats.registrations, 1);
                entry.ever_registered = true;
                let interval = registered
                    .heartbeat_interval
                    .or(entry.spec.ttl)
                    .filter(|_| entry.spec.ttl.is_some())
                    .map(|interval| interval.max(self.config.min_interval));
                entry.interval = interval;
                entry.set_status(LeaseStatus::Active {
                    interval,
                    last_heartbeat: None,
                });
                for waiter in entry.waiters.drain(..) {
                    let _ = waiter.send(Ok(Admitted {
                        generation: entry.generation,
                        status: entry.status.subscribe(),
                        registered: registered.clone(),
                    }));
                }
                if let Some(interval) = interval {
                    let at = Instant::now() + jittered(interval, self.config.jitter);
                    schedule(&mut self.due, &done.id, entry, at);
                }
            }
            Err(error) => {
                tracing::warn!(instance = %done.id, %error, "registration failed");
                entry.set_status(LeaseStatus::Failed {
                    error: error.to_string(),
                });
                let waiters = std::mem::take(&mut entry.waiters);
                if !entry.ever_registered {
                    // Refused (or never answered) on first registration: forget it before
                    // answering, so that the caller sees a provider without it. An attempt
                    // that timed out may still land on the server; an ephemeral instance then
                    // expires with its lease.
                    self.entries.remove(&done.id);
                    self.stats
                        .instances
                        .store(self.entries.len() as u64, Ordering::Relaxed);
                }
                let (kind, detail) = (error.kind(), error.message().to_owned());
                let mut error = Some(error);
                for waiter in waiters {
                    let answer = error
                        .take()
                        .unwrap_or_else(|| Error::new(kind, detail.clone()));
                    let _ = waiter.send(Err(answer));
                }
            }
        }
    }

    fn queue_registration(&mut self, id: &str) {
        let Some(entry) = self.entries.get_mut(id) else {
            return;
        };
        if entry.removal.is_some() {
            return;
        }
        if let Some(at) = entry.due.take() {
            self.due.remove(&(at, id.to_owned()));
        }
        entry.set_status(LeaseStatus::Registering);
        match entry.registration {
            Registration::Idle => {
                entry.registration = Registration::Queued;
                self.register_queue.push_back(id.to_owned());
            }
            Registration::Queued | Registration::Running => {}
        }
    }

    // --- deregistration ---------------------------------------------------------------------

    fn start_deregistration(&mut self, id: &str) {
        let Some(entry) = self.entries.get_mut(id) else {
            return;
        };
        let Some(removal) = &mut entry.removal else {
            return;
        };
        if removal.started {
            return;
        }
        removal.started = true;
        if !entry.maybe_on_server {
            // Never sent to a server: nothing to remove there.
            self.deregistrations
                .spawn(std::future::ready((id.to_owned(), Ok(()))));
            return;
        }
        let client = self.client.clone();
        let deadline = Instant::now() + self.config.shutdown_timeout;
        let id = id.to_owned();
        self.deregistrations.spawn(async move {
            let request_id = uuid::Uuid::new_v4().simple().to_string();
            let result = match client
                .deregister_until(&id, &request_id, Some(deadline))
                .await
            {
                Ok(_) => Ok(()),
                // Already gone (expired, or removed by an operator): the goal is reached.
                Err(error) if error.kind() == DeregisterErrorKind::NotFound => Ok(()),
                Err(error) => Err(error),
            };
            (id, result)
        });
    }

    fn on_deregistered(&mut self, id: &str, result: Result<(), DeregisterError>) {
        let Some(entry) = self.entries.remove(id) else {
            return;
        };
        self.stats
            .instances
            .store(self.entries.len() as u64, Ordering::Relaxed);
        if let Some(at) = entry.due {
            self.due.remove(&(at, id.to_owned()));
        }
        entry.set_status(LeaseStatus::Deregistered);
        let waiters = entry.removal.map(|r| r.waiters).unwrap_or_default();
        match &result {
            Ok(()) => {
                bump(&self.stats.deregistrations, 1);
                if self.shutting_down {
                    self.report.deregistered.push(id.to_owned());
                }
            }
            Err(error) => {
                tracing::warn!(instance = %id, %error, "deregistration failed");
            }
        }
        let mut result = Some(result);
        for waiter in waiters {
            let answer = match result.take() {
                Some(result) => result,
                None => Ok(()),
            };
            let _ = waiter.send(answer);
        }
        if let Some(Err(error)) = result
            && self.shutting_down
        {
            self.report.failed.push((id.to_owned(), error));
        }
        if let Some(waiting) = self.after_removal.remove(id) {
            for (spec, reply) in waiting {
                self.on_register(spec, reply);
            }
        }
    }

    // --- heartbeats -------------------------------------------------------------------------

    /// Periodic work: registrations to start, the stream to (re)open, due beats to send, a
    /// stuck stream to break.
    fn maintain(&mut self, now: Instant) {
        self.start_registrations();
        let needs_stream = !self.due.is_empty() || !self.in_flight.is_empty();
        match &self.link {
            Link::Idle if needs_stream => self.connect(),
            Link::Down { retry_at } if needs_stream && *retry_at <= now => self.connect(),
            Link::Up(_) if !needs_stream && self.entries.is_empty() => self.link = Link::Idle,
            Link::Up(_) => {
                let timeout = self.client.config().request_timeout;
                if self
                    .in_flight
                    .front()
                    .is_some_and(|oldest| oldest.sent_at + timeout <= now)
                {
                    self.break_link(format!("no heartbeat answer within {timeout:?}"));
                } else {
                    self.send_due(now);
                }
            }
            _ => {}
        }
    }

    fn connect(&mut self) {
        let client = self.client.clone();
        let buffer = self.config.max_batches_in_flight + 1;
        self.link = Link::Connecting(tokio::spawn(async move {
            let (index, mut grpc) = client.pick();
            client.ready(index).await.map_err(|error| (index, error))?;
            let (sender, receiver) = mpsc::channel(buffer);
            let opened = tokio::time::timeout(
                client.config().request_timeout,
                grpc.stream_heartbeats(tokio_stream::wrappers::ReceiverStream::new(receiver)),
            )
            .await;
            match opened {
                Ok(Ok(response)) => Ok(Box::new(Up {
                    index,
                    sender,
                    responses: response.into_inner(),
                })),
                Ok(Err(status)) => {
                    Err((index, format!("{:?}: {}", status.code(), status.message())))
                }
                Err(_) => Err((index, "opening the heartbeat stream timed out".into())),
            }
        }));
    }

    fn on_connected(&mut self, connected: Result<Box<Up>, (usize, String)>) {
        match connected {
            Ok(up) => {
                bump(&self.stats.streams_opened, 1);
                tracing::debug!(endpoint = %self.client.endpoint_url(up.index), "heartbeat stream open");
                self.link = Link::Up(up);
            }
            Err((index, error)) => {
                tracing::debug!(endpoint = %self.client.endpoint_url(index), %error, "heartbeat stream not opened");
                self.client.failed(index);
                self.mark_unreachable(&error);
                self.link = Link::Down {
                    retry_at: Instant::now() + self.reconnect.next_delay(),
                };
            }
        }
    }

    fn mark_unreachable(&mut self, error: &str) {
        let since = match &self.unreachable {
            Some((since, _)) => *since,
            None => Instant::now(),
        };
        self.unreachable = Some((since, error.to_owned()));
        for entry in self.entries.values() {
            if entry.interval.is_some()
                && entry.removal.is_none()
                && entry.status.borrow().is_active()
            {
                entry.set_status(LeaseStatus::Unreachable {
                    since,
                    error: error.to_owned(),
                });
            }
        }
    }

    fn break_link(&mut self, error: String) {
        let index = match &self.link {
            Link::Up(up) => Some(up.index),
            _ => None,
        };
        bump(&self.stats.stream_failures, 1);
        tracing::debug!(%error, "heartbeat stream broken");
        if let Some(index) = index {
            self.client.failed(index);
        }
        // Beats in flight were perhaps not recorded: send them again on the next stream.
        let now = Instant::now();
        for batch in std::mem::take(&mut self.in_flight) {
            for (id, generation) in batch.beats {
                if let Some(entry) = self.entries.get_mut(&id)
                    && entry.generation == generation
                    && entry.beat_in_flight
                {
                    entry.beat_in_flight = false;
                    if entry.removal.is_none() && entry.registration == Registration::Idle {
                        schedule(&mut self.due, &id, entry, now);
                    }
                }
            }
        }
        self.mark_unreachable(&error);
        self.link = Link::Down {
            retry_at: now + self.reconnect.next_delay(),
        };
    }

    fn send_due(&mut self, now: Instant) {
        // Send only once the earliest beat is due, then take every beat due within the
        // coalescing window along: sending whatever entered the window at each wake-up (a
        // response, a registration) would make many small messages instead of a few big ones.
        if self.due.first().is_none_or(|(at, _)| *at > now) {
            return;
        }
        let horizon = now + self.config.coalesce;
        while self.in_flight.len() < self.config.max_batches_in_flight {
            let mut beats = Vec::new();
            while beats.len() < self.config.max_batch {
                let Some((at, _)) = self.due.first() else {
                    break;
                };
                if *at > horizon {
                    break;
                }
                let Some((_, id)) = self.due.pop_first() else {
                    break;
                };
                let Some(entry) = self.entries.get_mut(&id) else {
                    continue;
                };
                entry.due = None;
                entry.beat_in_flight = true;
                beats.push((id, entry.generation));
            }
            if beats.is_empty() {
                return;
            }
            let request = proto::BatchHeartbeatRequest {
                instances: beats.iter().filter_map(|(id, _)| by_id(id)).collect(),
            };
            let Link::Up(up) = &self.link else {
                return;
            };
            let count = beats.len() as u64;
            self.in_flight.push_back(InFlight {
                beats,
                sent_at: now,
            });
            if up.sender.try_send(request).is_err() {
                self.break_link("heartbeat stream closed".into());
                return;
            }
            bump(&self.stats.batches_sent, 1);
            bump(&self.stats.heartbeats_sent, count);
        }
    }

    fn on_response(
        &mut self,
        response: Option<Result<proto::BatchHeartbeatResponse, tonic::Status>>,
    ) {
        let response = match response {
            Some(Ok(response)) => response,
            Some(Err(status)) => {
                self.break_link(format!("{:?}: {}", status.code(), status.message()));
                return;
            }
            None => {
                self.break_link("the server closed the heartbeat stream".into());
                return;
            }
        };
        let Some(batch) = self.in_flight.pop_front() else {
            self.break_link("heartbeat answer without a request".into());
            return;
        };
        if response.results.len() != batch.beats.len() {
            let error = format!(
                "heartbeat answer has {} results for {} beats",
                response.results.len(),
                batch.beats.len()
            );
            self.in_flight.push_front(batch);
            self.break_link(error);
            return;
        }
        let now = Instant::now();
        self.reconnect.reset();
        if self.unreachable.take().is_some() {
            tracing::debug!("heartbeats delivered again");
        }
        let mut acknowledged = 0;
        let mut not_found = Vec::new();
        for ((id, generation), result) in batch.beats.into_iter().zip(response.results) {
            let Some(entry) = self.entries.get_mut(&id) else {
                continue;
            };
            if entry.generation != generation || !entry.beat_in_flight {
                continue;
            }
            entry.beat_in_flight = false;
            if entry.removal.is_some() || entry.registration != Registration::Idle {
                continue;
            }
            if !result.instance_id.is_empty() && result.instance_id != id {
                tracing::warn!(expected = %id, got = %result.instance_id, "heartbeat answer for another instance; ignored");
                let at = now + self.config.min_interval;
                schedule(&mut self.due, &id, entry, at);
                continue;
            }
            match BeatStatus::try_from(result.status) {
                Ok(BeatStatus::Ok) => {
                    acknowledged += 1;
                    let interval = if result.heartbeat_interval_ms > 0 {
                        Duration::from_millis(result.heartbeat_interval_ms)
                            .max(self.config.min_interval)
                    } else {
                        entry.interval.unwrap_or(self.config.min_interval)
                    };
                    entry.interval = Some(interval);
                    entry.set_status(LeaseStatus::Active {
                        interval: Some(interval),
                        last_heartbeat: Some(now),
                    });
                    let at = now + jittered(interval, self.config.jitter);
                    schedule(&mut self.due, &id, entry, at);
                }
                Ok(BeatStatus::NotFound) => not_found.push(id),
                Ok(BeatStatus::Invalid) => {
                    // Our reference is an id derived from the spec; registering again lets the
                    // server say precisely what it dislikes.
                    tracing::warn!(instance = %id, message = %result.message, "heartbeat refused as invalid; registering again");
                    not_found.push(id);
                }
                Ok(BeatStatus::Unspecified) | Err(_) => {
                    tracing::warn!(instance = %id, status = result.status, "heartbeat answer with an unknown status; retrying");
                    let at = now + entry.interval.unwrap_or(self.config.min_interval);
                    schedule(&mut self.due, &id, entry, at);
                }
            }
        }
        bump(&self.stats.heartbeats_acknowledged, acknowledged);
        bump(&self.stats.not_found, not_found.len() as u64);
        for id in not_found {
            tracing::debug!(instance = %id, "unknown to the server; registering again");
            self.queue_registration(&id);
        }
    }
}

fn schedule(due: &mut BTreeSet<(Instant, String)>, id: &str, entry: &mut Entry, at: Instant) {
    if let Some(previous) = entry.due.take() {
        due.remove(&(previous, id.to_owned()));
    }
    entry.due = Some(at);
    due.insert((at, id.to_owned()));
}

/// `interval` shortened by a random share of up to `jitter`: beats are never later than the
/// server asked, and instances registered together drift apart.
fn jittered(interval: Duration, jitter: f64) -> Duration {
    if jitter <= 0.0 {
        return interval;
    }
    let share = rand::rng().random_range(0.0..=jitter);
    interval.mul_f64(1.0 - share)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_only_ever_beats_early_and_spreads() {
        let interval = Duration::from_secs(5);
        let samples: Vec<Duration> = (0..200).map(|_| jittered(interval, 0.1)).collect();
        assert!(
            samples
                .iter()
                .all(|d| *d <= interval && *d >= interval.mul_f64(0.9))
        );
        let distinct: BTreeSet<Duration> = samples.into_iter().collect();
        assert!(distinct.len() > 100, "jitter should spread beats");
        assert_eq!(jittered(interval, 0.0), interval);
    }
}
