//! Client SDK for the service registry.
//!
//! Most users meet the registry through this crate. It does the hard parts of being a good
//! registry client, the way the polaris-go, Nacos and Eureka clients do, and then some:
//!
//! * **[`Provider`]**: [`Provider::register`] returns an [`InstanceHandle`] that keeps the
//!   instance alive. Heartbeats go at the interval the server advertises, with jitter; all the
//!   instances of a process share **one** batched `StreamHeartbeats` stream. A NOT_FOUND answer
//!   (the server lost or expired the instance) registers it again with the same id. Transient
//!   failures are retried with capped exponential backoff, failing over to the next configured
//!   server. Dropping the handle, [`InstanceHandle::deregister`] or [`Provider::shutdown`]
//!   deregisters.
//! * **[`Consumer`]**: [`Consumer::discover`] answers from a local cache that a `Watch` stream
//!   keeps current, resumed from the last revision after reconnects. While the servers are
//!   unreachable it keeps answering with the last known instances and says how stale they are
//!   ([`Instances::staleness`]). [`Instances`] has the selection helpers: healthy only, by
//!   metadata, weighted random.
//! * **[`Events`]**: downstream consumers follow the registry's event stream in JetStream,
//!   ephemerally from a sequence ([`Events::follow`]) or with a durable consumer
//!   ([`Events::durable`]), typed with the `event-log` contract.
//! * **[`Client`]**: the connection with failover and the plain calls (register, deregister,
//!   status changes, reads) for tools.
//! * **Errors** ([`error`]): one [`Error`] type with a kind enum per operation, so that callers
//!   can `match err.kind()`; nothing the server sends can make the SDK panic.
//!
//! # Quick start
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use sdk::{Client, Consumer, InstanceSpec, Provider};
//!
//! let client = Client::connect_to("127.0.0.1:50051")?;
//!
//! // Provide: register and keep alive until shutdown.
//! let provider = Provider::new(client.clone());
//! let _handle = provider
//!     .register(InstanceSpec::new("default", "echo", "10.0.0.1", 8080).metadata("zone", "a"))
//!     .await?;
//!
//! // Consume: discover from the watched cache and pick a target.
//! let consumer = Consumer::new(client);
//! let instances = consumer.discover("default", "echo").await?;
//! if let Some(target) = instances.routable().with_metadata("zone", "a").choose_weighted() {
//!     println!("calling {}", target.address());
//! }
//!
//! provider.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! # Examples
//!
//! `sdk/examples/` has three programs that run against a local registry started with
//! `cargo xtask up` (gRPC on `127.0.0.1:50051`, NATS at `NATS_URL` or
//! `nats://127.0.0.1:4222`, stream prefix `registry`). In a second terminal:
//!
//! ```sh
//! # Register default/echo at 127.0.0.1:8080 and keep it alive; Ctrl-C deregisters it.
//! cargo run -p sdk --example provider
//! # Follow default/echo through the cache: each change, staleness, a weighted pick.
//! cargo run -p sdk --example consumer
//! # Print the events of default/echo from the start of the stream, then follow new ones
//! # (add `-- --durable NAME` to resume where the last run stopped).
//! cargo run -p sdk --example events
//! ```
//!
//! Each takes the registry's address from `REGISTRY_ENDPOINTS` (comma-separated, default
//! `http://127.0.0.1:50051`); `events` takes `NATS_URL` and `REGISTRY_STREAM_PREFIX`. When
//! `cargo xtask up` started a private NATS (no `NATS_URL` set), it prints that server's URL:
//! pass it as `NATS_URL` to `events`. Run several providers with `-- --port 8081` etc.; the
//! consumer shows them come and go, and shows its cache turn stale (and live again) when
//! `registryd` is stopped (and started again).
//!
//! # Generated code
//!
//! [`proto`] holds the `registry.v1` gRPC types and client generated from `proto/` (and the
//! server traits with the `server` feature, for registry-api).

#![forbid(unsafe_code)]

mod client;
mod consumer;
pub mod error;
mod events;
mod instance;
mod instances;
mod provider;

pub use client::{BackoffConfig, Client, ClientConfig, DEFAULT_ENDPOINT};
pub use consumer::{Consumer, ConsumerConfig, Subscription};
pub use error::{
    BuildError, BuildErrorKind, DeregisterError, DeregisterErrorKind, DiscoverError,
    DiscoverErrorKind, Error, EventsError, EventsErrorKind, QueryError, QueryErrorKind,
    RegisterError, RegisterErrorKind, UpdateError, UpdateErrorKind, Violation,
};
pub use events::{
    DEFAULT_NATS_URL, DEFAULT_STREAM_PREFIX, DurableEvents, EventRecord, EventStream, Events,
    Scope, StartAt,
};
pub use instance::{
    DEFAULT_TTL, Instance, InstanceSpec, InstanceUpdate, Location, NamespaceSummary, Registered,
    ServiceSummary,
};
pub use instances::Instances;
pub use provider::{
    InstanceHandle, LeaseStatus, MAX_BATCH, Provider, ProviderConfig, ProviderStats, ShutdownReport,
};

/// The `registry.v1` protobuf types and gRPC client (and server traits with the `server`
/// feature), generated from `proto/registry/v1/registry.proto`.
pub mod proto {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("registry.v1");

    #[cfg(feature = "server")]
    include!(concat!(env!("OUT_DIR"), "/server/registry.v1.rs"));

    pub mod wire;

    /// Encoded `FileDescriptorSet` of `registry.v1`, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/registry_descriptor.bin"));
}
