//! The consumer side: discovery from a local cache kept current by `Watch`.
//!
//! The first [`Consumer::discover`] of a service starts a background watcher for it: it opens
//! `Watch` on a ready server, takes the snapshot into the cache, then applies each change in
//! order. When the stream breaks it reconnects with capped exponential backoff, moving to the
//! next server, and resumes with `from_revision` = the last revision it applied, so it gets the
//! changes it missed (or a fresh snapshot when the server no longer has them). Meanwhile
//! discovery keeps answering from the cache and says since when it is stale.
//!
//! Every answer is an [`Instances`]: an immutable view with the selection helpers.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::client::Client;
use crate::error::{DiscoverError, DiscoverErrorKind, Error};
use crate::instance::Instance;
use crate::instances::Instances;
use crate::proto;

/// Settings of a [`Consumer`].
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// How long the first discovery of a service waits for its snapshot before failing with
    /// [`DiscoverErrorKind::Unavailable`]. Later discoveries answer from the cache at once.
    pub initial_wait: Duration,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            initial_wait: Duration::from_secs(5),
        }
    }
}

/// The cache of one service, as published by its watcher.
#[derive(Debug, Clone)]
struct CacheState {
    instances: Instances,
    /// A snapshot has been applied at least once.
    synced: bool,
    /// The watcher stopped for good (the server refused the service name).
    fatal: Option<(DiscoverErrorKind, String)>,
    /// The last connection problem, for the error of a first discovery that times out.
    last_error: Option<String>,
}

type ServiceKey = (String, String);

#[derive(Debug)]
struct Shared {
    client: Client,
    config: ConsumerConfig,
    services: Mutex<HashMap<ServiceKey, watch::Receiver<CacheState>>>,
    shutdown: CancellationToken,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // The watchers hold no reference to the consumer; this stops them.
        self.shutdown.cancel();
    }
}

/// Discovers instances from a local cache kept current through `Watch`. Cheap to clone;
/// clones share the cache. The watchers stop when the last clone is dropped or on
/// [`Consumer::close`]. Create it inside a Tokio runtime.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let consumer = sdk::Consumer::new(sdk::Client::connect_to("127.0.0.1:50051")?);
/// let instances = consumer.discover("default", "echo").await?;
/// if let Some(stale) = instances.staleness() {
///     eprintln!("registry unreachable; answering from a cache {stale:?} old");
/// }
/// if let Some(instance) = instances.routable().choose_weighted() {
///     println!("call {}", instance.address());
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Consumer {
    shared: Arc<Shared>,
}

impl Consumer {
    /// A consumer with the default settings.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), sdk::BuildError> {
    /// let consumer = sdk::Consumer::new(sdk::Client::connect_to("127.0.0.1:50051")?);
    /// # Ok(()) }
    /// ```
    pub fn new(client: Client) -> Consumer {
        Consumer::with_config(client, ConsumerConfig::default())
    }

    /// A consumer with `config`.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), sdk::BuildError> {
    /// use std::time::Duration;
    /// let consumer = sdk::Consumer::with_config(
    ///     sdk::Client::connect_to("127.0.0.1:50051")?,
    ///     sdk::ConsumerConfig { initial_wait: Duration::from_secs(2) },
    /// );
    /// # Ok(()) }
    /// ```
    pub fn with_config(client: Client, config: ConsumerConfig) -> Consumer {
        Consumer {
            shared: Arc::new(Shared {
                client,
                config,
                services: Mutex::new(HashMap::new()),
                shutdown: CancellationToken::new(),
            }),
        }
    }

    /// The instances of a service (all of them: healthy or not, isolated or not; narrow with
    /// the [`Instances`] helpers). The first call for a service waits up to the configured
    /// initial wait for its snapshot; later calls answer from the cache immediately, also
    /// while the servers are unreachable ([`Instances::staleness`] then says for how long).
    /// A service nobody registered is empty, not an error.
    ///
    /// ```no_run
    /// # async fn demo(consumer: sdk::Consumer) -> Result<(), sdk::DiscoverError> {
    /// let instances = consumer.discover("default", "echo").await?;
    /// for instance in instances.healthy().iter() {
    ///     println!("{} weight {}", instance.address(), instance.weight);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn discover(
        &self,
        namespace: &str,
        service: &str,
    ) -> Result<Instances, DiscoverError> {
        let mut receiver = self.synced(namespace, service).await?;
        let state = receiver.borrow_and_update();
        Ok(state.instances.clone())
    }

    /// Follows a service: a [`Subscription`] whose [`Subscription::changed`] returns each new
    /// state of the cache (instances changed, or the cache turned stale or live again).
    ///
    /// ```no_run
    /// # async fn demo(consumer: sdk::Consumer) -> Result<(), sdk::DiscoverError> {
    /// let mut subscription = consumer.subscribe("default", "echo").await?;
    /// println!("now: {} instances", subscription.current().len());
    /// loop {
    ///     let instances = subscription.changed().await?;
    ///     println!("revision {}: {} instances", instances.revision(), instances.len());
    /// }
    /// # }
    /// ```
    pub async fn subscribe(
        &self,
        namespace: &str,
        service: &str,
    ) -> Result<Subscription, DiscoverError> {
        let mut receiver = self.synced(namespace, service).await?;
        receiver.mark_unchanged();
        Ok(Subscription {
            receiver,
            shutdown: self.shared.shutdown.clone(),
        })
    }

    /// Stops every watcher; later discoveries fail with [`DiscoverErrorKind::Closed`].
    ///
    /// ```no_run
    /// # fn demo(consumer: sdk::Consumer) {
    /// consumer.close();
    /// # }
    /// ```
    pub fn close(&self) {
        self.shared.shutdown.cancel();
    }

    fn services(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<ServiceKey, watch::Receiver<CacheState>>> {
        self.shared
            .services
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The cache of a service once it has its first snapshot (or failed for good).
    async fn synced(
        &self,
        namespace: &str,
        service: &str,
    ) -> Result<watch::Receiver<CacheState>, DiscoverError> {
        if self.shared.shutdown.is_cancelled() {
            return Err(Error::new(
                DiscoverErrorKind::Closed,
                "the consumer is closed",
            ));
        }
        let key = (namespace.to_owned(), service.to_owned());
        let mut receiver = {
            let mut services = self.services();
            services
                .entry(key.clone())
                .or_insert_with(|| {
                    let (sender, receiver) = watch::channel(CacheState {
                        instances: Instances::empty(),
                        synced: false,
                        fatal: None,
                        last_error: None,
                    });
                    tokio::spawn(watch_service(
                        self.shared.client.clone(),
                        namespace.to_owned(),
                        service.to_owned(),
                        sender,
                        self.shared.shutdown.clone(),
                    ));
                    receiver
                })
                .clone()
        };
        let waited = tokio::time::timeout(
            self.shared.config.initial_wait,
            receiver.wait_for(|state| state.synced || state.fatal.is_some()),
        )
        .await
        .map(|result| result.is_ok());
        let state = receiver.borrow().clone();
        if let Some((kind, message)) = state.fatal {
            // Forget it, so that a bad name does not keep a cache entry.
            self.services().remove(&key);
            return Err(Error::new(kind, message));
        }
        match waited {
            Ok(true) => Ok(receiver),
            Ok(false) => Err(Error::new(
                DiscoverErrorKind::Closed,
                "the consumer is closed",
            )),
            Err(_) => Err(Error::new(
                DiscoverErrorKind::Unavailable,
                format!(
                    "no snapshot of {namespace}/{service} within {:?}{}",
                    self.shared.config.initial_wait,
                    state
                        .last_error
                        .map(|e| format!("; last error: {e}"))
                        .unwrap_or_default()
                ),
            )),
        }
    }
}

/// A service followed through the consumer's cache. Created by [`Consumer::subscribe`].
#[derive(Debug)]
pub struct Subscription {
    receiver: watch::Receiver<CacheState>,
    shutdown: CancellationToken,
}

impl Subscription {
    /// The cache now.
    ///
    /// ```no_run
    /// # fn demo(subscription: sdk::Subscription) {
    /// println!("{} instances", subscription.current().len());
    /// # }
    /// ```
    pub fn current(&self) -> Instances {
        self.receiver.borrow().instances.clone()
    }

    /// Waits for the next state of the cache and returns it. Fails with
    /// [`DiscoverErrorKind::Closed`] once the consumer is closed.
    ///
    /// ```no_run
    /// # async fn demo(mut subscription: sdk::Subscription) -> Result<(), sdk::DiscoverError> {
    /// let next = subscription.changed().await?;
    /// println!("revision {}", next.revision());
    /// # Ok(()) }
    /// ```
    pub async fn changed(&mut self) -> Result<Instances, DiscoverError> {
        let closed = || Error::new(DiscoverErrorKind::Closed, "the consumer is closed");
        tokio::select! {
            changed = self.receiver.changed() => changed.map_err(|_| closed())?,
            () = self.shutdown.cancelled() => return Err(closed()),
        }
        Ok(self.receiver.borrow_and_update().instances.clone())
    }
}

/// The watcher's view of the service: the instances by id and the revision they are at.
struct Cache {
    instances: BTreeMap<String, Arc<Instance>>,
    revision: u64,
}

impl Cache {
    /// Applies one Watch message. Returns whether the instance set changed, or why the
    /// message breaks the protocol.
    fn apply(&mut self, message: proto::WatchResponse) -> Result<bool, String> {
        match message.body {
            Some(proto::watch_response::Body::Snapshot(snapshot)) => {
                // A snapshot replaces everything: the server sends one on first contact, when
                // it no longer has the changes after our revision, or after it fell behind.
                let mut instances = BTreeMap::new();
                for instance in snapshot.instances {
                    let instance = Instance::from_proto(instance)?;
                    instances.insert(instance.id.clone(), Arc::new(instance));
                }
                self.instances = instances;
                self.revision = message.revision;
                Ok(true)
            }
            Some(proto::watch_response::Body::Change(change)) => {
                // Changes are in order; one at or below our revision was already applied (a
                // resumed stream overlapping what we had).
                if message.revision <= self.revision {
                    return Ok(false);
                }
                let instance = change
                    .instance
                    .ok_or_else(|| "change without an instance".to_owned())
                    .and_then(Instance::from_proto)?;
                match proto::instance_change::Kind::try_from(change.kind) {
                    Ok(proto::instance_change::Kind::Upserted) => {
                        self.instances
                            .insert(instance.id.clone(), Arc::new(instance));
                    }
                    Ok(proto::instance_change::Kind::Deleted) => {
                        self.instances.remove(&instance.id);
                    }
                    Ok(proto::instance_change::Kind::Unspecified) | Err(_) => {
                        return Err(format!("change of unknown kind {}", change.kind));
                    }
                }
                self.revision = message.revision;
                Ok(true)
            }
            None => Err("watch message without a body".into()),
        }
    }

    fn view(&self, stale_since: Option<Instant>) -> Instances {
        Instances::new(
            self.instances.values().cloned().collect(),
            self.revision,
            stale_since,
        )
    }
}

fn publish(sender: &watch::Sender<CacheState>, update: impl FnOnce(&mut CacheState)) {
    sender.send_modify(update);
}

/// The watcher of one service: keeps `sender`'s cache current until `shutdown`.
async fn watch_service(
    client: Client,
    namespace: String,
    service: String,
    sender: watch::Sender<CacheState>,
    shutdown: CancellationToken,
) {
    let mut cache = Cache {
        instances: BTreeMap::new(),
        revision: 0,
    };
    let mut backoff = client.backoff();
    // Since when the cache may be behind the registry (`None` while a stream is open).
    let mut stale_since: Option<Instant> = None;
    let mut synced = false;
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        let (index, mut grpc) = client.pick();
        let opened = async {
            client.ready(index).await?;
            let request = proto::WatchRequest {
                namespace: namespace.clone(),
                service: service.clone(),
                from_revision: cache.revision,
            };
            match tokio::time::timeout(client.config().request_timeout, grpc.watch(request)).await {
                Err(_) => Err("opening the watch timed out".to_owned()),
                Ok(Ok(response)) => Ok(Ok(response.into_inner())),
                Ok(Err(status)) => Ok(Err(status)),
            }
        };
        let opened = tokio::select! {
            () = shutdown.cancelled() => return,
            opened = opened => opened,
        };
        let error = match opened {
            Ok(Ok(mut stream)) => {
                // Connected to a ready server: what we missed (or a fresh snapshot) comes
                // first on the stream, so the cache is live again from here on.
                if synced && stale_since.take().is_some() {
                    backoff.reset();
                    let view = cache.view(None);
                    publish(&sender, |state| {
                        state.instances = view;
                        state.last_error = None;
                    });
                }
                loop {
                    let next = tokio::select! {
                        () = shutdown.cancelled() => return,
                        next = stream.next() => next,
                    };
                    match next {
                        Some(Ok(message)) => match cache.apply(message) {
                            Ok(_) => {
                                synced = true;
                                stale_since = None;
                                backoff.reset();
                                let view = cache.view(None);
                                publish(&sender, |state| {
                                    state.instances = view;
                                    state.synced = true;
                                    state.last_error = None;
                                });
                            }
                            Err(problem) => {
                                break format!("protocol error: {problem}");
                            }
                        },
                        Some(Err(status)) => {
                            if is_fatal(&status) {
                                let error = crate::error::from_status::<DiscoverErrorKind>(status);
                                publish(&sender, |state| {
                                    state.fatal = Some((error.kind(), error.message().to_owned()));
                                });
                                return;
                            }
                            break format!("{:?}: {}", status.code(), status.message());
                        }
                        None => break "the server closed the watch".to_owned(),
                    }
                }
            }
            Ok(Err(status)) => {
                if is_fatal(&status) {
                    let error = crate::error::from_status::<DiscoverErrorKind>(status);
                    publish(&sender, |state| {
                        state.fatal = Some((error.kind(), error.message().to_owned()));
                    });
                    return;
                }
                format!("{:?}: {}", status.code(), status.message())
            }
            Err(not_ready) => not_ready,
        };
        tracing::debug!(%namespace, %service, endpoint = %client.endpoint_url(index), %error, "watch interrupted; serving from cache");
        client.failed(index);
        let newly_stale = synced && stale_since.is_none();
        let since = *stale_since.get_or_insert_with(Instant::now);
        // Subscribers hear of the cache turning stale once, not of every failed retry.
        sender.send_if_modified(|state| {
            state.last_error = Some(error);
            if newly_stale {
                state.instances = cache.view(Some(since));
            }
            newly_stale
        });
        let delay = backoff.next_delay();
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// Statuses no retry can fix: the service name is invalid, or the request is refused.
fn is_fatal(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::InvalidArgument
            | tonic::Code::OutOfRange
            | tonic::Code::PermissionDenied
            | tonic::Code::Unauthenticated
            | tonic::Code::Unimplemented
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(port: u32, healthy: bool, revision: u64) -> proto::Instance {
        proto::Instance {
            id: event_log::instance_id("default", "echo", "10.0.0.1", port as u16),
            namespace: "default".into(),
            service: "echo".into(),
            host: "10.0.0.1".into(),
            port,
            weight: 100,
            healthy,
            revision,
            ..Default::default()
        }
    }

    fn change(
        kind: proto::instance_change::Kind,
        instance: proto::Instance,
        revision: u64,
    ) -> proto::WatchResponse {
        proto::WatchResponse {
            revision,
            body: Some(proto::watch_response::Body::Change(proto::InstanceChange {
                kind: kind.into(),
                instance: Some(instance),
                event_type: String::new(),
            })),
        }
    }

    #[test]
    fn snapshot_then_changes_in_order_and_replays_ignored() {
        use proto::instance_change::Kind;
        let mut cache = Cache {
            instances: BTreeMap::new(),
            revision: 0,
        };
        let snapshot = proto::WatchResponse {
            revision: 5,
            body: Some(proto::watch_response::Body::Snapshot(proto::Snapshot {
                instances: vec![wire(1, true, 4), wire(2, true, 5)],
            })),
        };
        assert_eq!(cache.apply(snapshot), Ok(true));
        assert_eq!(cache.instances.len(), 2);
        // A change the snapshot already contains is skipped.
        assert_eq!(
            cache.apply(change(Kind::Deleted, wire(1, true, 5), 5)),
            Ok(false)
        );
        assert_eq!(cache.instances.len(), 2);
        assert_eq!(
            cache.apply(change(Kind::Upserted, wire(1, false, 6), 6)),
            Ok(true)
        );
        assert_eq!(
            cache.apply(change(Kind::Deleted, wire(2, true, 7), 7)),
            Ok(true)
        );
        let view = cache.view(None);
        assert_eq!(view.revision(), 7);
        assert_eq!(view.len(), 1);
        assert!(!view.iter().next().unwrap().healthy);
        assert_eq!(view.staleness(), None);
    }

    #[tokio::test]
    async fn nothing_cached_and_no_server_is_unavailable_then_closed() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let client = Client::connect_to(format!("127.0.0.1:{port}")).unwrap();
        let consumer = Consumer::with_config(
            client,
            ConsumerConfig {
                initial_wait: Duration::from_millis(300),
            },
        );
        let error = consumer.discover("default", "echo").await.unwrap_err();
        assert_eq!(error.kind(), DiscoverErrorKind::Unavailable);
        assert!(error.message().contains("last error"), "{error}");
        consumer.close();
        let error = consumer.discover("default", "echo").await.unwrap_err();
        assert_eq!(error.kind(), DiscoverErrorKind::Closed);
    }

    #[test]
    fn malformed_messages_are_errors_not_panics() {
        let mut cache = Cache {
            instances: BTreeMap::new(),
            revision: 0,
        };
        let empty = proto::WatchResponse {
            revision: 1,
            body: None,
        };
        assert!(cache.apply(empty).is_err());
        let no_instance = proto::WatchResponse {
            revision: 1,
            body: Some(proto::watch_response::Body::Change(proto::InstanceChange {
                kind: 1,
                instance: None,
                event_type: String::new(),
            })),
        };
        assert!(cache.apply(no_instance).is_err());
        let unknown_kind = proto::WatchResponse {
            revision: 2,
            body: Some(proto::watch_response::Body::Change(proto::InstanceChange {
                kind: 42,
                instance: Some(wire(1, true, 2)),
                event_type: String::new(),
            })),
        };
        assert!(cache.apply(unknown_kind).is_err());
        let bad_port = change(
            proto::instance_change::Kind::Upserted,
            wire(70_000, true, 3),
            3,
        );
        assert!(cache.apply(bad_port).is_err());
        assert_eq!(cache.revision, 0);
    }
}
