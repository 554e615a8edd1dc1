//! The gRPC server: the registry service, `grpc.health.v1.Health` and server reflection, on
//! one listener, with the read-model follower and the heartbeat collector behind them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use event_log::EventLog;
use sdk::proto::registry_server::RegistryServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::heartbeats::{self, Batcher};
use crate::read_model::{self, ReadModel};
use crate::service::RegistryService;

/// Largest request or response message, in bytes; larger ones are refused by the transport.
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;

/// Server settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to listen on (port 0: any free port; see [`Server::local_addr`]).
    pub listen: SocketAddr,
    /// Read-model limits.
    pub read_model: read_model::Config,
    /// Heartbeat group-commit limits.
    pub heartbeats: heartbeats::Config,
    /// How long a write waits to become visible in the read model before answering anyway.
    pub visibility_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            read_model: read_model::Config::default(),
            heartbeats: heartbeats::Config::default(),
            visibility_timeout: Duration::from_secs(5),
        }
    }
}

/// A bound, not yet serving, API server.
#[derive(Debug)]
pub struct Server {
    config: Config,
    listener: TcpListener,
    log: Arc<dyn EventLog>,
    model: Arc<ReadModel>,
}

impl Server {
    /// Binds the listener. The log's streams must exist (`EventLog::ensure_streams`).
    pub async fn bind(config: Config, log: Arc<dyn EventLog>) -> std::io::Result<Server> {
        let listener = TcpListener::bind(config.listen).await?;
        let model = Arc::new(ReadModel::new(config.read_model.clone()));
        Ok(Server {
            config,
            listener,
            log,
            model,
        })
    }

    /// The address actually listened on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The read model (for tests and metrics).
    pub fn read_model(&self) -> Arc<ReadModel> {
        Arc::clone(&self.model)
    }

    /// Serves until `shutdown`: then stops accepting, finishes in-flight calls and flushes
    /// the pending heartbeat batch.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), tonic::transport::Error> {
        let (ready_sender, mut ready) = watch::channel(false);
        let follower = tokio::spawn(read_model::follow(
            Arc::clone(&self.log),
            Arc::clone(&self.model),
            ready_sender,
            shutdown.clone(),
        ));
        // The collector outlives the gRPC server by its own token, so that calls still in
        // flight at shutdown get their beats recorded before it flushes and stops.
        let collector_shutdown = CancellationToken::new();
        let (batcher, collector) = Batcher::spawn(
            self.config.heartbeats.clone(),
            Arc::clone(&self.log),
            collector_shutdown.clone(),
        );
        let service = RegistryService::new(
            Arc::clone(&self.log),
            Arc::clone(&self.model),
            batcher,
            self.config.visibility_timeout,
            shutdown.clone(),
        );
        let registry = RegistryServer::new(service)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(16 * MAX_MESSAGE_BYTES);

        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_not_serving::<RegistryServer<RegistryService>>()
            .await;
        health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        let health_shutdown = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = health_shutdown.cancelled() => return,
                _ = ready.wait_for(|ready| *ready) => {}
            }
            health
                .set_serving::<RegistryServer<RegistryService>>()
                .await;
            health
                .set_service_status("", tonic_health::ServingStatus::Serving)
                .await;
            tracing::info!("read model caught up; serving");
        });

        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(sdk::proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        // Both reflection versions: grpcurl and older tools still speak v1alpha. The
        // descriptors are compiled in, so building them only fails on a broken build.
        let reflection_v1 = reflection().build_v1();
        let reflection_v1alpha = reflection().build_v1alpha();
        if let Err(error) = &reflection_v1 {
            tracing::error!(%error, "server reflection unavailable");
        }
        // Our own listener (so that port 0 can be reported before serving): the builder's
        // TCP options do not apply to it, so set TCP_NODELAY on accepted connections here.
        // Without it small responses wait out delayed ACKs (about 40 ms each).
        let incoming = tonic::transport::server::TcpIncoming::from(self.listener)
            .with_nodelay(Some(true))
            .with_keepalive(Some(Duration::from_secs(60)));
        let result = tonic::transport::Server::builder()
            .layer(crate::rpc::RpcLayer::new())
            .add_service(registry)
            .add_service(health_service)
            .add_optional_service(reflection_v1.ok())
            .add_optional_service(reflection_v1alpha.ok())
            .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
            .await;
        collector_shutdown.cancel();
        let _ = collector.await;
        follower.abort();
        result
    }
}
