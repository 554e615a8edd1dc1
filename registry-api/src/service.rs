//! The `registry.v1.Registry` gRPC service.
//!
//! Writes validate, append one event and wait until the read model has applied it (read your
//! writes); reads are served from the read model. Errors are mapped to gRPC in one place,
//! [`crate::error`].

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use event_log::event::{
    Beat, Event, InstanceDeregistered, InstanceRegistered, InstanceStatusChanged, now_millis,
};
use event_log::fold::InstanceState;
use event_log::{Append, Envelope, EventLog, StreamKind};
use futures::{Stream, StreamExt};
use sdk::proto::registry_server::Registry;
use sdk::proto::{self, wire};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::convert;
use crate::error::{Error, Result};
use crate::heartbeats::Batcher;
use crate::metrics::ApiMetrics;
use crate::read_model::{
    Change, ChangeKind, DiscoverFilter, REQUEST_MSG_ID_PREFIX, ReadModel, WatchStart,
};
use crate::validate::{self, Target};

/// How often a write that lost an optimistic-concurrency race without the caller asking for a
/// revision is retried (it conflicted with a health transition, say) before ABORTED.
const INTERNAL_RETRIES: usize = 3;

/// The service implementation. Cheap to clone.
#[derive(Debug, Clone)]
pub struct RegistryService {
    log: Arc<dyn EventLog>,
    model: Arc<ReadModel>,
    batcher: Batcher,
    visibility_timeout: Duration,
    shutdown: CancellationToken,
    metrics: ApiMetrics,
}

/// A boxed response stream.
pub type ResponseStream<T> = Pin<Box<dyn Stream<Item = std::result::Result<T, Status>> + Send>>;

impl RegistryService {
    /// A service over `log`, reading from `model` (kept current by
    /// [`crate::read_model::follow`]) and recording heartbeats through `batcher`.
    pub fn new(
        log: Arc<dyn EventLog>,
        model: Arc<ReadModel>,
        batcher: Batcher,
        visibility_timeout: Duration,
        shutdown: CancellationToken,
    ) -> RegistryService {
        RegistryService {
            log,
            model,
            batcher,
            visibility_timeout,
            shutdown,
            metrics: ApiMetrics::new(),
        }
    }

    async fn visible(&self, sequence: u64) {
        if !self
            .model
            .wait_applied(sequence, self.visibility_timeout)
            .await
        {
            tracing::warn!(
                sequence,
                "write acknowledged but not yet visible in the read model"
            );
        }
    }

    fn request_msg_id(instance_id: &str, request_id: Option<&String>) -> Option<String> {
        request_id.map(|request_id| format!("{REQUEST_MSG_ID_PREFIX}{instance_id}:{request_id}"))
    }

    /// Appends an event about an existing instance with optimistic concurrency. `expected`
    /// is the caller's revision (conflict: ABORTED at once) or `None` (the server uses what it
    /// knows and retries a few times).
    async fn append_to_instance(
        &self,
        instance_id: &str,
        expected: Option<u64>,
        msg_id: Option<String>,
        event: impl Fn(&InstanceState) -> Event,
    ) -> Result<u64> {
        let mut attempt = 0;
        loop {
            let state = self.model.instance(instance_id).ok_or_else(|| {
                Error::NotFound(format!("instance {instance_id} is not registered"))
            })?;
            let envelope =
                Envelope::new(&state.namespace, &state.service, &state.id, event(&state));
            let mut append = Append::event(self.log.streams(), &envelope)
                .map_err(|e| Error::Internal(e.to_string()))?
                .expecting_last_subject_sequence(expected.unwrap_or(state.revision));
            if let Some(msg_id) = &msg_id {
                append.msg_id = Some(msg_id.clone());
            }
            match self.log.append(StreamKind::Events, append).await {
                Ok(ack) => {
                    self.visible(ack.sequence).await;
                    return Ok(ack.sequence);
                }
                Err(event_log::Error::Conflict { .. })
                    if expected.is_none() && attempt < INTERNAL_RETRIES =>
                {
                    attempt += 1;
                    // Someone else wrote to the instance: catch up with the log, then retry.
                    let last = self.log.last_sequence(StreamKind::Events).await?;
                    self.visible(last).await;
                }
                Err(error) => return Err(error.into()),
            }
        }
    }

    fn resolve(&self, target: &Target) -> Result<InstanceState> {
        let id = target.instance_id();
        self.model
            .instance(&id)
            .ok_or_else(|| Error::NotFound(format!("instance {id} is not registered")))
    }

    async fn heartbeat_batch(
        &self,
        request: proto::BatchHeartbeatRequest,
    ) -> Result<proto::BatchHeartbeatResponse> {
        validate::batch_size(request.instances.len())?;
        let now = now_millis();
        let mut beats = Vec::with_capacity(request.instances.len());
        let mut results = Vec::with_capacity(request.instances.len());
        let (mut not_found, mut invalid) = (0, 0);
        for (index, reference) in request.instances.iter().enumerate() {
            let field = format!("instances[{index}]");
            let result = match validate::target(&field, Some(reference)) {
                Err(error) => {
                    invalid += 1;
                    proto::HeartbeatResult {
                        status: proto::heartbeat_result::Status::Invalid.into(),
                        message: error.to_string(),
                        ..Default::default()
                    }
                }
                Ok(target) => {
                    let id = target.instance_id();
                    match self.model.with_instance(&id, heartbeat_interval) {
                        None => {
                            not_found += 1;
                            proto::HeartbeatResult {
                                instance_id: id,
                                status: proto::heartbeat_result::Status::NotFound.into(),
                                message: "instance is not registered: register it again".into(),
                                ..Default::default()
                            }
                        }
                        Some(interval) => {
                            beats.push(Beat {
                                instance_id: id.clone(),
                                at_ms: now,
                            });
                            proto::HeartbeatResult {
                                instance_id: id,
                                status: proto::heartbeat_result::Status::Ok.into(),
                                heartbeat_interval_ms: interval,
                                message: String::new(),
                            }
                        }
                    }
                }
            };
            results.push(result);
        }
        let recorded = beats.len() as u64;
        self.metrics.heartbeats(0, not_found, invalid);
        self.batcher.record(beats).await?;
        self.metrics.heartbeats(recorded, 0, 0);
        Ok(proto::BatchHeartbeatResponse { results })
    }

    fn watch_stream(
        &self,
        namespace: String,
        service: String,
        start: WatchStart,
        mut changes: broadcast::Receiver<Arc<Change>>,
        from_revision: u64,
    ) -> ResponseStream<proto::WatchResponse> {
        let (sender, receiver) = mpsc::channel(16);
        let model = Arc::clone(&self.model);
        let shutdown = self.shutdown.clone();
        let watcher = self.metrics.watcher();
        tokio::spawn(async move {
            // Counted open for as long as this task serves the stream.
            let _watcher = watcher;
            let mut sent_through = from_revision;
            match start {
                WatchStart::Snapshot {
                    instances,
                    revision,
                } => {
                    if sender
                        .send(Ok(snapshot_message(&instances, revision)))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    sent_through = revision;
                }
                WatchStart::Resume(resumed) => {
                    for change in resumed {
                        sent_through = change.sequence;
                        if sender.send(Ok(change_message(&change))).await.is_err() {
                            return;
                        }
                    }
                }
            }
            loop {
                let next = tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = sender.closed() => return,
                    next = changes.recv() => next,
                };
                let message = match next {
                    Ok(change) if change.sequence <= sent_through => continue,
                    Ok(change) => {
                        sent_through = change.sequence;
                        change_message(&change)
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        // Too far behind: a fresh snapshot instead of an unbounded buffer.
                        tracing::debug!(%namespace, %service, missed, "slow watcher resynchronised");
                        let (instances, revision) = model.snapshot(&namespace, &service);
                        sent_through = revision;
                        snapshot_message(&instances, revision)
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if sender.send(Ok(message)).await.is_err() {
                    return;
                }
            }
        });
        Box::pin(tokio_stream::wrappers::ReceiverStream::new(receiver))
    }
}

/// The heartbeat interval the server asks of an instance: its TTL, or 0 without health checks.
fn heartbeat_interval(state: &InstanceState) -> u64 {
    state.health_check.as_ref().map_or(0, |hc| hc.ttl_ms)
}

fn snapshot_message(instances: &[InstanceState], revision: u64) -> proto::WatchResponse {
    proto::WatchResponse {
        revision,
        body: Some(proto::watch_response::Body::Snapshot(proto::Snapshot {
            instances: instances.iter().map(convert::instance).collect(),
        })),
    }
}

fn change_message(change: &Change) -> proto::WatchResponse {
    let kind = match change.kind {
        ChangeKind::Upserted => proto::instance_change::Kind::Upserted,
        ChangeKind::Deleted => proto::instance_change::Kind::Deleted,
    };
    proto::WatchResponse {
        revision: change.sequence,
        body: Some(proto::watch_response::Body::Change(proto::InstanceChange {
            kind: kind.into(),
            instance: Some(convert::instance(&change.instance)),
            event_type: change.event_type.as_str().to_owned(),
        })),
    }
}

#[tonic::async_trait]
impl Registry for RegistryService {
    async fn register_instance(
        &self,
        request: Request<proto::RegisterInstanceRequest>,
    ) -> std::result::Result<Response<proto::RegisterInstanceResponse>, Status> {
        let registration = validate::registration(request.get_ref())?;
        let id = event_log::instance_id(
            &registration.namespace,
            &registration.service,
            &registration.host,
            registration.port,
        );
        let interval = registration.health_check.as_ref().map_or(0, |hc| hc.ttl_ms);
        let msg_id = Self::request_msg_id(&id, registration.request_id.as_ref());
        if let Some((sequence, _)) = msg_id
            .as_deref()
            .and_then(|m| self.model.earlier_request(m))
        {
            return Ok(Response::new(proto::RegisterInstanceResponse {
                instance_id: id,
                revision: sequence,
                heartbeat_interval_ms: interval,
            }));
        }
        let envelope = Envelope::new(
            &registration.namespace,
            &registration.service,
            &id,
            Event::InstanceRegistered(InstanceRegistered {
                host: registration.host,
                port: registration.port,
                protocol: registration.protocol,
                version: registration.version,
                weight: registration.weight,
                metadata: registration.metadata,
                health_check: registration.health_check,
                ephemeral: registration.ephemeral,
                isolate: registration.isolate,
                location: registration.location,
            }),
        );
        let mut append = Append::event(self.log.streams(), &envelope)
            .map_err(|e| Error::Internal(e.to_string()))?;
        if let Some(msg_id) = msg_id {
            append.msg_id = Some(msg_id);
        }
        let ack = self
            .log
            .append(StreamKind::Events, append)
            .await
            .map_err(Error::from)?;
        self.visible(ack.sequence).await;
        tracing::debug!(instance_id = %id, sequence = ack.sequence, duplicate = ack.duplicate,
            "instance registered");
        Ok(Response::new(proto::RegisterInstanceResponse {
            instance_id: id,
            revision: ack.sequence,
            heartbeat_interval_ms: interval,
        }))
    }

    async fn deregister_instance(
        &self,
        request: Request<proto::DeregisterInstanceRequest>,
    ) -> std::result::Result<Response<proto::DeregisterInstanceResponse>, Status> {
        let (target, request_id) = validate::deregistration(request.get_ref())?;
        let id = target.instance_id();
        let msg_id = Self::request_msg_id(&id, request_id.as_ref());
        if let Some((sequence, _)) = msg_id
            .as_deref()
            .and_then(|m| self.model.earlier_request(m))
        {
            return Ok(Response::new(proto::DeregisterInstanceResponse {
                instance_id: id,
                revision: sequence,
            }));
        }
        let revision = self
            .append_to_instance(&id, None, msg_id, |_| {
                Event::InstanceDeregistered(InstanceDeregistered {})
            })
            .await?;
        tracing::debug!(instance_id = %id, sequence = revision, "instance deregistered");
        Ok(Response::new(proto::DeregisterInstanceResponse {
            instance_id: id,
            revision,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<proto::HeartbeatRequest>,
    ) -> std::result::Result<Response<proto::HeartbeatResponse>, Status> {
        let target = validate::target("instance", request.get_ref().instance.as_ref())
            .inspect_err(|_| self.metrics.heartbeats(0, 0, 1))?;
        let id = target.instance_id();
        let interval = self
            .model
            .with_instance(&id, heartbeat_interval)
            .ok_or_else(|| {
                self.metrics.heartbeats(0, 1, 0);
                Error::NotFound(format!(
                    "instance {id} is not registered: register it again"
                ))
            })?;
        let at_ms = now_millis();
        self.batcher
            .record(vec![Beat {
                instance_id: id.clone(),
                at_ms,
            }])
            .await?;
        self.metrics.heartbeats(1, 0, 0);
        Ok(Response::new(proto::HeartbeatResponse {
            instance_id: id,
            heartbeat_interval_ms: interval,
        }))
    }

    async fn batch_heartbeat(
        &self,
        request: Request<proto::BatchHeartbeatRequest>,
    ) -> std::result::Result<Response<proto::BatchHeartbeatResponse>, Status> {
        Ok(Response::new(
            self.heartbeat_batch(request.into_inner()).await?,
        ))
    }

    type StreamHeartbeatsStream = ResponseStream<proto::BatchHeartbeatResponse>;

    async fn stream_heartbeats(
        &self,
        request: Request<Streaming<proto::BatchHeartbeatRequest>>,
    ) -> std::result::Result<Response<Self::StreamHeartbeatsStream>, Status> {
        let service = self.clone();
        let responses = request
            .into_inner()
            .map(move |message| {
                let service = service.clone();
                async move {
                    let message = message?;
                    service.heartbeat_batch(message).await.map_err(Status::from)
                }
            })
            // Several batches of one stream in flight at once, answered in order.
            .buffered(8);
        Ok(Response::new(Box::pin(responses)))
    }

    async fn update_instance(
        &self,
        request: Request<proto::UpdateInstanceRequest>,
    ) -> std::result::Result<Response<proto::UpdateInstanceResponse>, Status> {
        let update = validate::update(request.get_ref())?;
        let id = update.target.instance_id();
        let msg_id = Self::request_msg_id(&id, update.request_id.as_ref());
        if msg_id
            .as_deref()
            .and_then(|m| self.model.earlier_request(m))
            .is_none()
        {
            let change = InstanceStatusChanged {
                isolate: update.isolate,
                weight: update.weight,
                metadata: update.metadata.clone(),
            };
            self.append_to_instance(&id, update.expected_revision, msg_id, |_| {
                Event::InstanceStatusChanged(change.clone())
            })
            .await?;
        }
        let state = self.resolve(&update.target)?;
        Ok(Response::new(proto::UpdateInstanceResponse {
            instance: Some(convert::instance(&state)),
        }))
    }

    async fn get_instance(
        &self,
        request: Request<proto::GetInstanceRequest>,
    ) -> std::result::Result<Response<proto::GetInstanceResponse>, Status> {
        let target = validate::target("instance", request.get_ref().instance.as_ref())?;
        let state = self.resolve(&target)?;
        Ok(Response::new(proto::GetInstanceResponse {
            instance: Some(convert::instance(&state)),
        }))
    }

    async fn discover(
        &self,
        request: Request<proto::DiscoverRequest>,
    ) -> std::result::Result<Response<wire::EncodedDiscoverResponse>, Status> {
        let request = request.into_inner();
        validate::service(&request.namespace, &request.service)?;
        validate::selector(&request.metadata_selector)?;
        let filter = DiscoverFilter {
            healthy_only: request.healthy_only,
            include_isolated: request.include_isolated,
            selector: &request.metadata_selector,
        };
        let response = match self.model.discover(
            &request.namespace,
            &request.service,
            request.revision,
            filter,
        ) {
            None => wire::EncodedDiscoverResponse::default(),
            Some((revision, None)) => wire::EncodedDiscoverResponse {
                not_modified: true,
                revision,
                ..Default::default()
            },
            Some((revision, Some(instances))) => wire::EncodedDiscoverResponse {
                not_modified: false,
                revision,
                instances,
            },
        };
        Ok(Response::new(response))
    }

    type WatchStream = ResponseStream<proto::WatchResponse>;

    async fn watch(
        &self,
        request: Request<proto::WatchRequest>,
    ) -> std::result::Result<Response<Self::WatchStream>, Status> {
        let request = request.into_inner();
        validate::service(&request.namespace, &request.service)?;
        let (start, changes) =
            self.model
                .watch(&request.namespace, &request.service, request.from_revision);
        Ok(Response::new(self.watch_stream(
            request.namespace,
            request.service,
            start,
            changes,
            request.from_revision,
        )))
    }

    async fn list_namespaces(
        &self,
        _request: Request<proto::ListNamespacesRequest>,
    ) -> std::result::Result<Response<proto::ListNamespacesResponse>, Status> {
        let mut namespaces: Vec<proto::NamespaceSummary> = Vec::new();
        for summary in self.model.services(None) {
            match namespaces.last_mut() {
                Some(last) if last.name == summary.namespace => {
                    last.services += 1;
                    last.instances += summary.total;
                }
                _ => namespaces.push(proto::NamespaceSummary {
                    name: summary.namespace,
                    services: 1,
                    instances: summary.total,
                }),
            }
        }
        Ok(Response::new(proto::ListNamespacesResponse { namespaces }))
    }

    async fn list_services(
        &self,
        request: Request<proto::ListServicesRequest>,
    ) -> std::result::Result<Response<proto::ListServicesResponse>, Status> {
        let namespace = request.into_inner().namespace;
        validate::namespace(&namespace)?;
        let services = self
            .model
            .services(Some(&namespace))
            .into_iter()
            .map(|summary| proto::ServiceSummary {
                namespace: summary.namespace,
                name: summary.service,
                total: summary.total,
                healthy: summary.healthy,
                isolated: summary.isolated,
                revision: summary.revision,
            })
            .collect();
        Ok(Response::new(proto::ListServicesResponse { services }))
    }
}
