//! The connection to the registry: a list of server addresses with failover, unary calls
//! retried with capped exponential backoff, and the readiness check used before long-lived
//! streams.
//!
//! A [`Client`] holds one lazily connected gRPC channel per configured server and a "current"
//! server. A call that fails in a way another attempt might fix (UNAVAILABLE, a timeout, a
//! broken connection) moves the current server to the next one and retries after a backoff,
//! until the retry timeout. Writes carry a client request id that stays the same across
//! attempts, so a retried write is applied once.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::error::{
    self, BuildError, BuildErrorKind, DeregisterError, Error, Kind, QueryError, RegisterError,
    UpdateError,
};
use crate::instance::{
    Instance, InstanceSpec, InstanceUpdate, NamespaceSummary, Registered, ServiceSummary, by_id,
};
use crate::proto;
use crate::proto::registry_client::RegistryClient;

/// The address `cargo xtask up` serves on.
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:50051";

/// Largest message the client accepts (a Discover of a very large service).
const MAX_DECODING_BYTES: usize = 16 << 20;

/// The gRPC service name the server reports in `grpc.health.v1` once its read model has caught
/// up with the event log.
const REGISTRY_SERVICE: &str = "registry.v1.Registry";

/// Capped exponential backoff: the delays between attempts grow from `min` by a factor of 2
/// with random jitter, and never exceed `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffConfig {
    /// First delay.
    pub min: Duration,
    /// Largest delay.
    pub max: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            min: Duration::from_millis(100),
            max: Duration::from_secs(5),
        }
    }
}

/// A backoff sequence (built on `backon`'s exponential backoff, capped at `max` after jitter).
#[derive(Debug)]
pub(crate) struct Backoff {
    config: BackoffConfig,
    delays: backon::ExponentialBackoff,
}

impl Backoff {
    pub(crate) fn new(config: BackoffConfig) -> Backoff {
        use backon::BackoffBuilder;
        // backon's jitter adds up to one more current delay; start from half so that the
        // average first delay is about `min`.
        let delays = backon::ExponentialBuilder::new()
            .with_min_delay(config.min / 2)
            .with_max_delay(config.max)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
            .build();
        Backoff { config, delays }
    }

    /// The next delay.
    pub(crate) fn next_delay(&mut self) -> Duration {
        self.delays
            .next()
            .unwrap_or(self.config.max)
            .min(self.config.max)
    }

    /// Starts over from the smallest delay (after a success).
    pub(crate) fn reset(&mut self) {
        *self = Backoff::new(self.config);
    }
}

/// Settings of a [`Client`].
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Server addresses (`http://host:port` or `host:port`), tried in order; at least one.
    pub endpoints: Vec<String>,
    /// How long establishing a connection may take.
    pub connect_timeout: Duration,
    /// How long one attempt of a call may take (a write waits for the event log's
    /// acknowledgement, so leave room for that).
    pub request_timeout: Duration,
    /// How long a call is retried (across servers) before it fails as unavailable.
    pub retry_timeout: Duration,
    /// Delays between attempts and reconnects.
    pub backoff: BackoffConfig,
    /// HTTP/2 keepalive ping interval: how fast a silently dead server is noticed on a
    /// long-lived stream (a ping unanswered for this long closes the connection).
    pub keepalive: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            endpoints: vec![DEFAULT_ENDPOINT.to_owned()],
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(10),
            retry_timeout: Duration::from_secs(30),
            backoff: BackoffConfig::default(),
            keepalive: Duration::from_secs(10),
        }
    }
}

impl ClientConfig {
    /// The defaults with these server addresses.
    ///
    /// ```
    /// let config = sdk::ClientConfig::with_endpoints(["127.0.0.1:50051", "127.0.0.1:50052"]);
    /// assert_eq!(config.endpoints.len(), 2);
    /// ```
    pub fn with_endpoints<S: Into<String>>(endpoints: impl IntoIterator<Item = S>) -> ClientConfig {
        ClientConfig {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            ..ClientConfig::default()
        }
    }
}

#[derive(Debug)]
struct Server {
    url: String,
    channel: Channel,
}

#[derive(Debug)]
struct Shared {
    config: ClientConfig,
    servers: Vec<Server>,
    current: AtomicUsize,
}

/// A connection to the registry's servers with failover. Cheap to clone; clones share the
/// connections. Building one does no IO (connections are made on first use) but needs a Tokio
/// runtime.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use sdk::{Client, ClientConfig};
///
/// let client = Client::new(ClientConfig::with_endpoints([
///     "http://127.0.0.1:50051",
///     "http://127.0.0.1:50052",
/// ]))?;
/// let services = client.list_services("default").await?;
/// println!("{services:?}");
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Client {
    shared: Arc<Shared>,
}

fn normalise(endpoint: &str) -> String {
    let endpoint = endpoint.trim();
    if endpoint.contains("://") {
        endpoint.to_owned()
    } else {
        format!("http://{endpoint}")
    }
}

fn request_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

impl Client {
    /// A client of the servers in `config`.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), sdk::BuildError> {
    /// let client = sdk::Client::new(sdk::ClientConfig::default())?;
    /// # Ok(()) }
    /// ```
    pub fn new(config: ClientConfig) -> Result<Client, BuildError> {
        if config.endpoints.is_empty() {
            return Err(Error::new(
                BuildErrorKind::NoEndpoints,
                "configure at least one server address",
            ));
        }
        for (name, value) in [
            ("connect_timeout", config.connect_timeout),
            ("request_timeout", config.request_timeout),
            ("keepalive", config.keepalive),
            ("backoff.min", config.backoff.min),
        ] {
            if value.is_zero() {
                return Err(Error::new(
                    BuildErrorKind::InvalidConfig,
                    format!("{name} must be above zero"),
                ));
            }
        }
        if config.backoff.max < config.backoff.min {
            return Err(Error::new(
                BuildErrorKind::InvalidConfig,
                "backoff.max must not be below backoff.min",
            ));
        }
        let mut servers = Vec::with_capacity(config.endpoints.len());
        for endpoint in &config.endpoints {
            let url = normalise(endpoint);
            let channel = Endpoint::from_shared(url.clone())
                .map_err(|error| {
                    Error::new(
                        BuildErrorKind::InvalidEndpoint,
                        format!("{endpoint}: {error}"),
                    )
                    .with_source(error)
                })?
                .connect_timeout(config.connect_timeout)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(config.keepalive)
                .keep_alive_timeout(config.keepalive)
                .keep_alive_while_idle(true)
                .connect_lazy();
            servers.push(Server { url, channel });
        }
        Ok(Client {
            shared: Arc::new(Shared {
                config,
                servers,
                current: AtomicUsize::new(0),
            }),
        })
    }

    /// A client of one server at `endpoint` with the default settings.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), sdk::BuildError> {
    /// let client = sdk::Client::connect_to("127.0.0.1:50051")?;
    /// # Ok(()) }
    /// ```
    pub fn connect_to(endpoint: impl Into<String>) -> Result<Client, BuildError> {
        Client::new(ClientConfig::with_endpoints([endpoint]))
    }

    /// The settings.
    pub fn config(&self) -> &ClientConfig {
        &self.shared.config
    }

    /// The address calls currently go to.
    ///
    /// ```no_run
    /// # fn demo(client: sdk::Client) {
    /// println!("talking to {}", client.current_endpoint());
    /// # }
    /// ```
    pub fn current_endpoint(&self) -> &str {
        let (index, _) = self.pick();
        &self.shared.servers[index].url
    }

    /// The current server's index and a gRPC client for it.
    pub(crate) fn pick(&self) -> (usize, RegistryClient<Channel>) {
        let index = self.shared.current.load(Ordering::Relaxed) % self.shared.servers.len();
        let client = RegistryClient::new(self.shared.servers[index].channel.clone())
            .max_decoding_message_size(MAX_DECODING_BYTES);
        (index, client)
    }

    /// Records that server `index` failed: the next call goes to the next server (unless
    /// another caller has already moved on).
    pub(crate) fn failed(&self, index: usize) {
        let next = (index + 1) % self.shared.servers.len();
        if next != index {
            let _ = self.shared.current.compare_exchange(
                index,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            tracing::debug!(
                failed = %self.shared.servers[index].url,
                next = %self.shared.servers[next].url,
                "failing over"
            );
        }
    }

    pub(crate) fn endpoint_url(&self, index: usize) -> &str {
        &self.shared.servers[index % self.shared.servers.len()].url
    }

    pub(crate) fn backoff(&self) -> Backoff {
        Backoff::new(self.shared.config.backoff)
    }

    /// Asks server `index` whether it serves (its read model has caught up with the event
    /// log). A server without the health service counts as ready.
    pub(crate) async fn ready(&self, index: usize) -> Result<(), String> {
        let channel = self.shared.servers[index].channel.clone();
        let mut health = HealthClient::new(channel);
        let check = health.check(tonic_health::pb::HealthCheckRequest {
            service: REGISTRY_SERVICE.to_owned(),
        });
        match tokio::time::timeout(self.shared.config.request_timeout, check).await {
            Err(_) => Err("health check timed out".into()),
            Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => Ok(()),
            Ok(Err(status)) => Err(format!("{:?}: {}", status.code(), status.message())),
            Ok(Ok(response)) => match response.into_inner().status() {
                ServingStatus::Serving => Ok(()),
                other => Err(format!("server is {}", other.as_str_name())),
            },
        }
    }

    /// Runs `call` until it succeeds, fails permanently, the deadline passes or `cancel` fires
    /// (checked between attempts only, so that an attempt in flight is never abandoned
    /// half-way). Transient failures move to the next server and back off.
    pub(crate) async fn retry<K, T, F, Fut>(
        &self,
        what: &str,
        deadline: Option<Instant>,
        cancel: Option<&CancellationToken>,
        mut call: F,
    ) -> Result<T, Error<K>>
    where
        K: Kind,
        F: FnMut(RegistryClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut backoff = self.backoff();
        loop {
            let (index, client) = self.pick();
            let last_error = match tokio::time::timeout(
                self.shared.config.request_timeout,
                call(client),
            )
            .await
            {
                Ok(Ok(response)) => return Ok(response.into_inner()),
                Ok(Err(status)) => {
                    let error = error::from_status::<K>(status);
                    if error.kind() != K::unavailable() {
                        return Err(error);
                    }
                    error
                }
                Err(_) => error::unavailable(format!(
                    "no answer within {:?}",
                    self.shared.config.request_timeout
                )),
            };
            tracing::debug!(endpoint = %self.endpoint_url(index), error = %last_error, "{what} failed; retrying");
            self.failed(index);
            let delay = backoff.next_delay();
            if deadline.is_some_and(|deadline| Instant::now() + delay > deadline) {
                return Err(error::unavailable(format!(
                    "{what}: no server answered before the retry timeout; last error: {}",
                    last_error.message()
                )));
            }
            match cancel {
                Some(cancel) => {
                    tokio::select! {
                        () = cancel.cancelled() => return Err(last_error),
                        () = tokio::time::sleep(delay) => {}
                    }
                }
                None => tokio::time::sleep(delay).await,
            }
        }
    }

    fn deadline(&self) -> Option<Instant> {
        Some(Instant::now() + self.shared.config.retry_timeout)
    }

    /// Registers (or re-registers) an instance once, retrying transient failures across the
    /// servers until the retry timeout. Use a [`Provider`](crate::Provider) to keep it alive.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// let client = sdk::Client::connect_to("127.0.0.1:50051")?;
    /// let spec = sdk::InstanceSpec::new("default", "echo", "10.0.0.1", 8080);
    /// let registered = client.register(&spec).await?;
    /// assert_eq!(registered.instance_id, spec.id());
    /// # Ok(()) }
    /// ```
    pub async fn register(&self, spec: &InstanceSpec) -> Result<Registered, RegisterError> {
        self.register_until(spec, &request_id(), self.deadline(), None)
            .await
    }

    pub(crate) async fn register_until(
        &self,
        spec: &InstanceSpec,
        request_id: &str,
        deadline: Option<Instant>,
        cancel: Option<&CancellationToken>,
    ) -> Result<Registered, RegisterError> {
        let request = spec.to_request(request_id);
        let response = self
            .retry("register", deadline, cancel, |mut client| {
                let request = request.clone();
                async move { client.register_instance(request).await }
            })
            .await?;
        let expected = spec.id();
        if response.instance_id != expected {
            return Err(error::protocol(format!(
                "server registered {} as {}, expected {expected}",
                spec.host, response.instance_id
            )));
        }
        Ok(Registered {
            instance_id: response.instance_id,
            revision: response.revision,
            heartbeat_interval: (response.heartbeat_interval_ms > 0)
                .then(|| Duration::from_millis(response.heartbeat_interval_ms)),
        })
    }

    /// Deregisters an instance by id, retrying transient failures until the retry timeout.
    /// Returns the revision of the deregistration.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// let client = sdk::Client::connect_to("127.0.0.1:50051")?;
    /// let id = sdk::InstanceSpec::new("default", "echo", "10.0.0.1", 8080).id();
    /// match client.deregister(&id).await {
    ///     Ok(revision) => println!("gone at revision {revision}"),
    ///     Err(e) if e.kind() == sdk::DeregisterErrorKind::NotFound => println!("was not there"),
    ///     Err(e) => return Err(e.into()),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn deregister(&self, instance_id: &str) -> Result<u64, DeregisterError> {
        self.deregister_until(instance_id, &request_id(), self.deadline())
            .await
    }

    pub(crate) async fn deregister_until(
        &self,
        instance_id: &str,
        request_id: &str,
        deadline: Option<Instant>,
    ) -> Result<u64, DeregisterError> {
        let request = proto::DeregisterInstanceRequest {
            instance: by_id(instance_id),
            request_id: request_id.to_owned(),
        };
        let response = self
            .retry("deregister", deadline, None, |mut client| {
                let request = request.clone();
                async move { client.deregister_instance(request).await }
            })
            .await?;
        Ok(response.revision)
    }

    /// Applies a status change (isolation, weight, metadata) and returns the instance after it.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// let client = sdk::Client::connect_to("127.0.0.1:50051")?;
    /// let id = sdk::InstanceSpec::new("default", "echo", "10.0.0.1", 8080).id();
    /// let instance = client
    ///     .update_instance(&id, sdk::InstanceUpdate::default().isolate(true))
    ///     .await?;
    /// assert!(instance.isolated);
    /// # Ok(()) }
    /// ```
    pub async fn update_instance(
        &self,
        instance_id: &str,
        update: InstanceUpdate,
    ) -> Result<Instance, UpdateError> {
        let request = proto::UpdateInstanceRequest {
            instance: by_id(instance_id),
            isolate: update.isolate,
            weight: update.weight,
            metadata: update.metadata.map(|entries| proto::MetadataUpdate {
                entries: entries.into_iter().collect(),
            }),
            expected_revision: update.expected_revision,
            request_id: request_id(),
        };
        let response = self
            .retry("update", self.deadline(), None, |mut client| {
                let request = request.clone();
                async move { client.update_instance(request).await }
            })
            .await?;
        let instance = response
            .instance
            .ok_or_else(|| error::protocol("update answered without the instance"))?;
        Instance::from_proto(instance).map_err(error::protocol)
    }

    /// One instance by id.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// let client = sdk::Client::connect_to("127.0.0.1:50051")?;
    /// let id = sdk::InstanceSpec::new("default", "echo", "10.0.0.1", 8080).id();
    /// let instance = client.get_instance(&id).await?;
    /// println!("{} healthy={}", instance.address(), instance.healthy);
    /// # Ok(()) }
    /// ```
    pub async fn get_instance(&self, instance_id: &str) -> Result<Instance, QueryError> {
        let request = proto::GetInstanceRequest {
            instance: by_id(instance_id),
        };
        let response = self
            .retry("get instance", self.deadline(), None, |mut client| {
                let request = request.clone();
                async move { client.get_instance(request).await }
            })
            .await?;
        let instance = response
            .instance
            .ok_or_else(|| error::protocol("answer without the instance"))?;
        Instance::from_proto(instance).map_err(error::protocol)
    }

    /// The namespaces with their counts.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// let client = sdk::Client::connect_to("127.0.0.1:50051")?;
    /// for namespace in client.list_namespaces().await? {
    ///     println!("{}: {} services", namespace.name, namespace.services);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn list_namespaces(&self) -> Result<Vec<NamespaceSummary>, QueryError> {
        let response = self
            .retry(
                "list namespaces",
                self.deadline(),
                None,
                |mut client| async move {
                    client
                        .list_namespaces(proto::ListNamespacesRequest {})
                        .await
                },
            )
            .await?;
        Ok(response
            .namespaces
            .into_iter()
            .map(|n| NamespaceSummary {
                name: n.name,
                services: n.services,
                instances: n.instances,
            })
            .collect())
    }

    /// The services of a namespace with their counts.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// let client = sdk::Client::connect_to("127.0.0.1:50051")?;
    /// for service in client.list_services("default").await? {
    ///     println!("{}: {}/{} healthy", service.name, service.healthy, service.total);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn list_services(&self, namespace: &str) -> Result<Vec<ServiceSummary>, QueryError> {
        let request = proto::ListServicesRequest {
            namespace: namespace.to_owned(),
        };
        let response = self
            .retry("list services", self.deadline(), None, |mut client| {
                let request = request.clone();
                async move { client.list_services(request).await }
            })
            .await?;
        Ok(response
            .services
            .into_iter()
            .map(|s| ServiceSummary {
                namespace: s.namespace,
                name: s.name,
                total: s.total,
                healthy: s.healthy,
                isolated: s.isolated,
                revision: s.revision,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_stays_capped() {
        let mut backoff = Backoff::new(BackoffConfig {
            min: Duration::from_millis(100),
            max: Duration::from_secs(1),
        });
        let delays: Vec<Duration> = (0..20).map(|_| backoff.next_delay()).collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(1)));
        assert!(delays[0] <= Duration::from_millis(100));
        assert!(delays[19] >= Duration::from_millis(500), "{delays:?}");
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }

    #[tokio::test]
    async fn configuration_mistakes_are_refused() {
        let none = Client::new(ClientConfig::with_endpoints(Vec::<String>::new()));
        assert_eq!(none.unwrap_err().kind(), BuildErrorKind::NoEndpoints);
        let bad = Client::connect_to("http://[::1");
        assert_eq!(bad.unwrap_err().kind(), BuildErrorKind::InvalidEndpoint);
        let zero = Client::new(ClientConfig {
            request_timeout: Duration::ZERO,
            ..ClientConfig::default()
        });
        assert_eq!(zero.unwrap_err().kind(), BuildErrorKind::InvalidConfig);
        let client = Client::connect_to("127.0.0.1:1").unwrap();
        assert_eq!(client.current_endpoint(), "http://127.0.0.1:1");
    }

    #[tokio::test]
    async fn failover_moves_to_the_next_server_and_wraps() {
        let client =
            Client::new(ClientConfig::with_endpoints(["127.0.0.1:1", "127.0.0.1:2"])).unwrap();
        assert_eq!(client.pick().0, 0);
        client.failed(0);
        assert_eq!(client.current_endpoint(), "http://127.0.0.1:2");
        // A stale report about server 0 does not move us off server 1.
        client.failed(0);
        assert_eq!(client.pick().0, 1);
        client.failed(1);
        assert_eq!(client.pick().0, 0);
    }

    #[tokio::test]
    async fn unreachable_servers_fail_as_unavailable_after_the_retry_timeout() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let client = Client::new(ClientConfig {
            retry_timeout: Duration::from_millis(600),
            backoff: BackoffConfig {
                min: Duration::from_millis(50),
                max: Duration::from_millis(200),
            },
            ..ClientConfig::with_endpoints([format!("127.0.0.1:{port}")])
        })
        .unwrap();
        let started = std::time::Instant::now();
        let error = client
            .register(&InstanceSpec::new("default", "echo", "10.0.0.1", 8080))
            .await
            .unwrap_err();
        assert_eq!(error.kind(), crate::RegisterErrorKind::Unavailable);
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
