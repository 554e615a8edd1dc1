//! Applying a batch of events to the tables: one transaction per batch, the checkpoint in it.
//!
//! A batch is applied with the canonical [`Fold`] itself, so the projection cannot drift from the
//! meaning of the events: the transaction locks the checkpoint row, loads the current state of
//! the instances the batch touches, restores them into a fresh fold, applies the events, and
//! writes back the instances that changed together with the new checkpoint. Events at or below
//! the checkpoint were applied by an earlier transaction and are skipped; the fold also ignores
//! sequences at or below an instance's revision, so applying an event twice changes nothing.

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
#[derive(Debug)]
pub(crate) struct Writer {
    client: Client,
    statements: Statements,
    applied: Checkpoint,
}

impl Writer {
    /// Connects to the projection in `schema`, migrating it first.
    pub(crate) async fn open(
        database_url: &str,
        schema: &str,
        application_name: &str,
    ) -> Result<Writer> {
        let mut client = schema::connect(database_url, schema, application_name).await?;
        schema::migrate_schema(&mut client, schema).await?;
        let statements = Statements::prepare(&client).await?;
        let applied = statements.checkpoint(&client, false).await?;
        Ok(Writer {
            client,
            statements,
            applied,
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
            self.applied = self.statements.checkpoint(&self.client, false).await?;
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
        self.applied = self.statements.checkpoint(&self.client, false).await?;
        Ok(())
    }

    /// The last applied sequence and when the log stored it, as far as this writer knows.
    pub(crate) fn applied(&self) -> Checkpoint {
        self.applied
    }

    /// Applies `events` (in stream order) in one transaction. Events at or below the checkpoint
    /// are skipped.
    pub(crate) async fn apply(&mut self, events: &[Decoded]) -> Result<Outcome> {
        let applied = self.applied.sequence;
        let events: Vec<&Decoded> = events.iter().filter(|e| e.sequence > applied).collect();
        let Some(last) = events.last() else {
            return Ok(Outcome::Committed {
                events: 0,
                instances: 0,
            });
        };
        let transaction = self.client.transaction().await?;
        let in_database = self.statements.checkpoint(&transaction, true).await?;
        if in_database.sequence != applied {
            transaction.rollback().await?;
            tracing::info!(
                expected = applied,
                found = in_database.sequence,
                "checkpoint moved by another writer; resynchronising"
            );
            self.applied = in_database;
            return Ok(Outcome::Moved);
        }

        let mut seen = HashSet::new();
        let touched: Vec<&str> = events
            .iter()
            .filter(|e| touches_instance(&e.envelope.event))
            .map(|e| e.envelope.instance_id.as_str())
            .filter(|id| seen.insert(*id))
            .collect();
        let loaded = self.statements.load(&transaction, &touched).await?;

        let mut fold = Fold::new();
        let mut metadata_before = HashMap::with_capacity(loaded.len());
        for state in loaded {
            metadata_before.insert(state.id.clone(), state.metadata.clone());
            fold.restore(state);
        }
        let mut changed = HashSet::new();
        for event in &events {
            if fold.apply(event.sequence, &event.envelope) == Applied::Changed {
                changed.insert(event.envelope.instance_id.as_str());
            }
        }
        let states: Vec<&InstanceState> = changed.iter().filter_map(|id| fold.get(id)).collect();
        // Metadata is rewritten only where it changed: most events (health transitions) leave
        // it alone, and deleting and reinserting identical rows would be pure write load.
        let metadata_of: Vec<&InstanceState> = states
            .iter()
            .copied()
            .filter(|state| metadata_before.get(&state.id) != Some(&state.metadata))
            .collect();
        // Only instances that existed before the batch can have rows to delete.
        let metadata_replaced: Vec<&str> = metadata_of
            .iter()
            .map(|state| state.id.as_str())
            .filter(|id| metadata_before.contains_key(*id))
            .collect();
        let checkpoint = Checkpoint {
            sequence: last.sequence,
            stored_at_ms: Some(last.stored_at_ms),
        };
        self.statements
            .write(
                &transaction,
                &states,
                &metadata_of,
                &metadata_replaced,
                checkpoint,
            )
            .await?;
        transaction.commit().await?;
        self.applied = checkpoint;
        Ok(Outcome::Committed {
            events: events.len(),
            instances: states.len(),
        })
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
