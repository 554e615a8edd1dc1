//! A deterministic generator of realistic event streams, for the store's tests and the projector
//! benchmark (behind the `test-util` feature).
//!
//! It keeps a population of instance slots and, for each event, picks a slot: a slot without a
//! live instance gets registered (again); a live one gets a status change, a health transition,
//! a re-registration, a deregistration or an expiry. A small share of events is engine-wide
//! (self-preservation) or addresses an instance that was never registered, which the projection
//! must ignore exactly like the fold does.

use std::collections::BTreeMap;

use event_log::event::{
    HealthCheck, InstanceDeregistered, InstanceExpired, InstanceRegistered, InstanceStatusChanged,
    InstanceTurnedHealthy, InstanceTurnedUnhealthy, Location, SelfPreservationEntered,
    SelfPreservationExited, now_millis,
};
use event_log::{Append, Envelope, Event, EventLog, StreamKind, Streams};

/// Generates events; the same seed and sizes give the same sequence of event kinds.
#[derive(Debug, Clone)]
pub struct Workload {
    state: u64,
    slots: Vec<Slot>,
    services: usize,
}

#[derive(Debug, Clone)]
struct Slot {
    namespace: String,
    service: String,
    host: String,
    port: u16,
    live: bool,
    healthy: bool,
}

impl Workload {
    /// A workload over `instances` instance slots spread over `services` services in two
    /// namespaces.
    pub fn new(seed: u64, instances: usize, services: usize) -> Workload {
        let services = services.max(1);
        let mut workload = Workload {
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            slots: Vec::with_capacity(instances),
            services,
        };
        for index in 0..instances.max(1) {
            let service = index % services;
            workload.slots.push(Slot {
                namespace: if service.is_multiple_of(2) {
                    "default"
                } else {
                    "prod"
                }
                .to_owned(),
                // Dots and spaces on purpose: names NATS subjects cannot carry as they are.
                service: format!("com.example.svc {service}"),
                host: format!(
                    "10.{}.{}.{}",
                    index / 65_536 % 256,
                    index / 256 % 256,
                    index % 256
                ),
                port: 1024 + (index % 60_000) as u16,
                live: false,
                healthy: false,
            });
        }
        workload
    }

    /// xorshift64*: deterministic, fast and good enough to pick event kinds.
    fn next_u64(&mut self) -> u64 {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound.max(1)
    }

    fn registration(&mut self, slot: usize) -> Event {
        let ttl_ms = 1000 + self.below(9) * 1000;
        let metadata: BTreeMap<String, String> = (0..self.below(4))
            .map(|key| (format!("key{key}"), format!("value {}", self.below(5))))
            .collect();
        let isolate = match self.below(10) {
            0 => Some(true),
            1 => Some(false),
            _ => None,
        };
        let slot = &self.slots[slot];
        Event::InstanceRegistered(InstanceRegistered {
            host: slot.host.clone(),
            port: slot.port,
            protocol: "grpc".to_owned(),
            version: "1.0.0".to_owned(),
            weight: Some(100),
            metadata,
            health_check: (!ttl_ms.is_multiple_of(5000)).then_some(HealthCheck { ttl_ms }),
            ephemeral: !ttl_ms.is_multiple_of(3000),
            isolate,
            location: Location {
                region: "eu-west".to_owned(),
                zone: format!("eu-west-{}", ttl_ms / 1000 % 3),
                campus: String::new(),
            },
        })
    }

    /// The next event: where it goes and what it says.
    pub fn next_envelope(&mut self) -> Envelope {
        let roll = self.below(100);
        if roll == 0 {
            let total = self.slots.len() as u64;
            let event = if self.below(2) == 0 {
                Event::SelfPreservationEntered(SelfPreservationEntered {
                    expiring: total / 2,
                    total,
                })
            } else {
                Event::SelfPreservationExited(SelfPreservationExited { total })
            };
            return Envelope::new("", "", "", event);
        }
        if roll == 1 {
            // A status change for an instance nobody registered: the fold ignores it.
            let id =
                event_log::instance_id("default", "ghost", "192.0.2.1", self.below(100) as u16 + 1);
            let change = InstanceStatusChanged {
                weight: Some(1),
                ..Default::default()
            };
            return Envelope::new("default", "ghost", id, Event::InstanceStatusChanged(change));
        }
        let index = self.below(self.slots.len() as u64) as usize;
        let event = if !self.slots[index].live {
            self.slots[index].live = true;
            self.slots[index].healthy = true;
            self.registration(index)
        } else {
            let now = now_millis();
            match self.below(100) {
                0..=24 => {
                    let change = match self.below(3) {
                        0 => InstanceStatusChanged {
                            isolate: Some(self.below(2) == 0),
                            ..Default::default()
                        },
                        1 => InstanceStatusChanged {
                            weight: Some(self.below(200) as u32),
                            ..Default::default()
                        },
                        _ => InstanceStatusChanged {
                            metadata: Some(BTreeMap::from([(
                                "changed".to_owned(),
                                self.below(10).to_string(),
                            )])),
                            ..Default::default()
                        },
                    };
                    Event::InstanceStatusChanged(change)
                }
                25..=64 => {
                    let healthy = self.slots[index].healthy;
                    self.slots[index].healthy = !healthy;
                    if healthy {
                        Event::InstanceTurnedUnhealthy(InstanceTurnedUnhealthy {
                            last_heartbeat_ms: (self.below(4) != 0).then_some(now - 3000),
                            deadline_ms: now,
                            generation: 1,
                        })
                    } else {
                        Event::InstanceTurnedHealthy(InstanceTurnedHealthy {
                            heartbeat_ms: now,
                            generation: 1,
                        })
                    }
                }
                65..=79 => self.registration(index),
                80..=89 => {
                    self.slots[index].live = false;
                    Event::InstanceDeregistered(InstanceDeregistered {})
                }
                _ => {
                    self.slots[index].live = false;
                    Event::InstanceExpired(InstanceExpired {
                        last_heartbeat_ms: Some(now - 10_000),
                        deadline_ms: now,
                        generation: 1,
                    })
                }
            }
        };
        let slot = &self.slots[index];
        let id = event_log::instance_id(&slot.namespace, &slot.service, &slot.host, slot.port);
        Envelope::new(slot.namespace.clone(), slot.service.clone(), id, event)
    }

    /// The next `count` events as appends on their subjects.
    pub fn appends(&mut self, streams: &Streams, count: usize) -> event_log::Result<Vec<Append>> {
        (0..count)
            .map(|_| {
                let envelope = self.next_envelope();
                if envelope.instance_id.is_empty() {
                    Append::event_on(streams.system_subject("self-preservation"), &envelope)
                } else {
                    Append::event(streams, &envelope)
                }
            })
            .collect()
    }

    /// Number of services the workload spreads instances over.
    pub fn services(&self) -> usize {
        self.services
    }
}

/// Appends `appends` to the events stream with many acknowledgements in flight; returns the
/// sequence of the last one.
pub async fn append_all(log: &dyn EventLog, appends: Vec<Append>) -> event_log::Result<u64> {
    let mut last = 0;
    let mut appends = appends.into_iter().peekable();
    while appends.peek().is_some() {
        let chunk: Vec<Append> = appends.by_ref().take(512).collect();
        for ack in log.append_many(StreamKind::Events, chunk).await {
            last = last.max(ack?.sequence);
        }
    }
    Ok(last)
}
