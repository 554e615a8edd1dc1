//! Applying a batch of events to the tables: one transaction per batch, the checkpoint in it.
//!
//! A batch is applied with the canonical [`Fold`] itself, so the projection cannot drift from the
//! meaning of the events: the transaction locks the checkpoint row, loads the current state of
//! the instances the batch touches (those not in the writer's cache), restores them into a fresh
//! fold, applies the events, and writes back the instances that changed together with the new
//! checkpoint. Events at or below the checkpoint were applied by an earlier transaction and are
//! skipped; the fold also ignores sequences at or below an instance's revision, so applying an
//! event twice changes nothing.

use std::collections::{HashMap, HashSet};

use event_log::fold::{Applied, Fold, InstanceState};
use event_log::{Envelope, Event, Record};
use tokio_postgres::Client;

use crate::error::{Error, Result};
use crate::rows::{Checkpoint, Statements};
use crate::schema::{self, lock};

/// An event read from the log, decoded.
#[derive(Debug, Clone)]
pub(crate) struct Decoded {
    pub sequence: u64,
    pub stored_at_ms: i64,
    pub envelope: Envelope,
}

/// Decodes `records` in order, stopping at the first that cannot be decoded: the decoded prefix
/// and the error naming the failing sequence.
pub(crate) fn decode(records: Vec<Record>) -> (Vec<Decoded>, Option<Error>) {
    let mut decoded = Vec::with_capacity(records.len());
    for record in records {
        match record.decode() {
            Ok(envelope) => decoded.push(Decoded {
                sequence: record.sequence,
                stored_at_ms: record.stored_at_ms,
                envelope,
            }),
            Err(source) => {
                return (
                    decoded,
                    Some(Error::Undecodable {
                        sequence: record.sequence,
                        source,
                    }),
                );
            }
        }
    }
    (decoded, None)
}

/// What one [`Writer::apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The batch is committed.
    Committed {
        /// Events applied (after dropping those already applied).
        events: usize,
        /// Instances written.
        instances: usize,
    },
    /// Another writer (a rebuild swapping tables in, or a projector that held the lock before)
    /// moved the checkpoint; nothing was written. The writer now knows the new checkpoint: drop
    /// what it covers and apply the rest again.
    Moved,
}

/// A connection that applies batches to the projection in one schema.
///
/// It keeps the states it has read or written in a bounded cache, so that a batch only loads the
/// instances it has not seen yet: most events touch instances a recent batch already touched.
/// The cache is right because this writer is the only one writing the schema while it applies
/// batches (the projector lock, or a rebuild's private schema); when the checkpoint shows another
/// writer was at work, or a transaction fails, the cache is dropped.
#[derive(Debug)]
pub(crate) struct Writer {
    client: Client,
    statements: Statements,
    applied: Checkpoint,
    /// OID of the checkpoint table the writer works on; another one means a rebuild swapped the
    /// tables.
    table: u32,
    cache: HashMap<String, InstanceState>,
    cache_capacity: usize,
}

impl Writer {
    /// Connects to the projection in `schema`, migrating it first; caches at most
    /// `cache_capacity` instance states.
    pub(crate) async fn open(
        database_url: &str,
        schema: &str,
        application_name: &str,
        cache_capacity: usize,
    ) -> Result<Writer> {
        let mut client = schema::connect(database_url, schema, application_name).await?;
        schema::migrate_schema(&mut client, schema).await?;
        let statements = Statements::prepare(&client).await?;
        let (applied, table) = statements.checkpoint(&client, false).await?;
        Ok(Writer {
            client,
            statements,
            applied,
            table,
            cache: HashMap::new(),
            cache_capacity,
        })
    }

    /// Takes the projector lock if it is free; see [`Writer::lock_projector`].
    pub(crate) async fn try_lock_projector(&mut self) -> Result<bool> {
        let row = self
            .client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&lock::PROJECTOR])
            .await?;
        let locked: bool = row.get(0);
        if locked {
            (self.applied, self.table) = self.statements.checkpoint(&self.client, false).await?;
            self.cache.clear();
        }
        Ok(locked)
    }

    /// Waits until this connection holds the projector lock: one active projector per
    /// database, so that two `registryd` processes do not fight over the durable consumer.
    /// The lock goes with the connection, so a crashed projector releases it.
    pub(crate) async fn lock_projector(&mut self) -> Result<()> {
        self.client
            .execute("SELECT pg_advisory_lock($1)", &[&lock::PROJECTOR])
            .await?;
        // Another projector may have moved on while this one waited.
        (self.applied, self.table) = self.statements.checkpoint(&self.client, false).await?;
        self.cache.clear();
        Ok(())
    }

    /// The last applied sequence and when the log stored it, as far as this writer knows.
    pub(crate) fn applied(&self) -> Checkpoint {
        self.applied
    }

    /// Applies `events` (in stream order) in one transaction. Events at or below the checkpoint
    /// are skipped.
    ///
    /// Two round trips whatever the batch size: `BEGIN`, the checkpoint lock and the load of the
    /// touched instances are pipelined, then the writes, the checkpoint and `COMMIT`. The
    /// transaction is managed by hand rather than with `Client::transaction` because the latter
    /// waits for `BEGIN` alone, and each wait costs a scheduling round on a busy machine.
    pub(crate) async fn apply(&mut self, events: &[Decoded]) -> Result<Outcome> {
        let result = self.apply_in_transaction(events).await;
        if result.is_err() {
            // Whether the transaction committed is not known for every failure (a connection
            // lost after COMMIT was sent); the next batch finds out through the checkpoint.
            self.cache.clear();
            // Leave the connection usable when it still is; a broken one fails here too and is
            // dropped by the caller.
            let _ = self.client.batch_execute("ROLLBACK").await;
        }
        result
    }

    async fn apply_in_transaction(&mut self, events: &[Decoded]) -> Result<Outcome> {
        let applied = self.applied.sequence;
        let events: Vec<&Decoded> = events.iter().filter(|e| e.sequence > applied).collect();
        let Some(last) = events.last() else {
            return Ok(Outcome::Committed {
                events: 0,
                instances: 0,
            });
        };
        let mut seen = HashSet::new();
        let touched: Vec<&str> = events
            .iter()
            .filter(|e| touches_instance(&e.envelope.event))
            .map(|e| e.envelope.instance_id.as_str())
            .filter(|id| seen.insert(*id))
            .collect();
        let missing: Vec<&str> = touched
            .iter()
            .copied()
            .filter(|id| !self.cache.contains_key(*id))
            .collect();

        // Sent in this order, executed in this order: the load runs once the checkpoint row is
        // locked, so it sees everything committed before this transaction owns the projection.
        let (began, in_database, loaded) = futures::join!(
            self.client.batch_execute("BEGIN"),
            self.statements.checkpoint(&self.client, true),
            self.statements.load(&self.client, &missing),
        );
        began?;
        let (in_database, table) = in_database?;
        let loaded = loaded?;
        if in_database.sequence != applied || table != self.table {
            // Someone else wrote the projection: the cache and the loaded states may not
            // describe the tables any more. Start over from what they say.
            self.client.batch_execute("ROLLBACK").await?;
            tracing::info!(
                expected = applied,
                found = in_database.sequence,
                swapped = table != self.table,
                "checkpoint moved by another writer or tables swapped by a rebuild; resynchronising"
            );
            self.applied = in_database;
            self.table = table;
            self.cache.clear();
            return Ok(Outcome::Moved);
        }

        let mut fold = Fold::new();
        let mut before: HashMap<&str, &InstanceState> = HashMap::with_capacity(touched.len());
        for id in &touched {
            if let Some(state) = self.cache.get(*id) {
                before.insert(id, state);
                fold.restore(state.clone());
            }
        }
        for state in &loaded {
            before.insert(&state.id, state);
            fold.restore(state.clone());
        }
        let mut changed = HashSet::new();
        for event in &events {
            if fold.apply(event.sequence, &event.envelope) == Applied::Changed {
                changed.insert(event.envelope.instance_id.as_str());
            }
        }
        let states: Vec<&InstanceState> = changed.iter().filter_map(|id| fold.get(id)).collect();
        // The health_check and metadata rows are rewritten only where they changed: most events
        // leave one or both alone, and rewriting identical rows would be pure write load.
        let checks_of: Vec<&InstanceState> = states
            .iter()
            .copied()
            .filter(|state| {
                before.get(state.id.as_str()).is_none_or(|old| {
                    old.health_check != state.health_check
                        || old.last_heartbeat_ms != state.last_heartbeat_ms
                        || old.last_transition != state.last_transition
                })
            })
            .collect();
        let metadata_of: Vec<&InstanceState> = states
            .iter()
            .copied()
            .filter(|state| {
                before
                    .get(state.id.as_str())
                    .is_none_or(|old| old.metadata != state.metadata)
            })
            .collect();
        // Only instances that existed before the batch can have rows to delete.
        let metadata_replaced: Vec<&str> = metadata_of
            .iter()
            .map(|state| state.id.as_str())
            .filter(|id| before.contains_key(*id))
            .collect();
        let checkpoint = Checkpoint {
            sequence: last.sequence,
            stored_at_ms: Some(last.stored_at_ms),
        };
        self.statements
            .write_and_commit(
                &self.client,
                &states,
                &checks_of,
                &metadata_of,
                &metadata_replaced,
                checkpoint,
            )
            .await?;
        self.applied = checkpoint;
        let written = states.len();
        self.remember(&fold);
        Ok(Outcome::Committed {
            events: events.len(),
            instances: written,
        })
    }

    /// Keeps the committed states of a batch's instances for the next batches. A full cache is
    /// emptied rather than trimmed: simpler, and it refills with the instances in use.
    fn remember(&mut self, fold: &Fold) {
        if self.cache_capacity == 0 {
            return;
        }
        if self.cache.len() + fold.len() > self.cache_capacity {
            self.cache.clear();
        }
        for state in fold.instances() {
            if self.cache.len() >= self.cache_capacity {
                break;
            }
            self.cache.insert(state.id.clone(), state.clone());
        }
    }
}

/// Events the fold may apply to an instance; the others only move the checkpoint.
fn touches_instance(event: &Event) -> bool {
    !matches!(
        event,
        Event::HeartbeatsReceived(_)
            | Event::SelfPreservationEntered(_)
            | Event::SelfPreservationExited(_)
    )
}
