//! Rebuild: project the whole events stream into fresh tables, then swap them in atomically.
//!
//! The fresh tables are created by the same migrations in a schema of their own
//! (`registry_rebuild`) and filled by the same batch writer the projector uses, from sequence 1 to
//! the end of the stream. Then, in one transaction that holds the live checkpoint table
//! exclusively (so no projector batch can commit meanwhile), the rebuild catches up to exactly the
//! live checkpoint if the live projector got further, and swaps the schemas by renaming; the old
//! tables are dropped in the same transaction. Readers see either the old tables or the new ones.
//!
//! A live projector needs no restart: its next batch locks the new checkpoint row, finds the
//! position it expected (or a later one, which it skips to) and goes on. PostgreSQL resolves its
//! prepared statements against the new tables because the old ones no longer exist.

use std::time::{Duration, Instant};

use event_log::{EventLog, RecordStream, StreamKind};
use tokio_postgres::Client;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::replay;
use crate::schema::{self, PROJECTION, REBUILD_SCHEMA, RETIRED_SCHEMA, SCHEMA, lock};
use crate::writer::{self, Writer};

/// What a rebuild did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebuildSummary {
    /// The checkpoint of the tables swapped in: every event up to it is applied.
    pub sequence: u64,
    /// Events read from the stream and applied.
    pub events: u64,
    /// Rows in the new `instance` table (tombstones included).
    pub instances: u64,
    /// Wall-clock time of the whole rebuild.
    pub elapsed: Duration,
}

impl std::fmt::Display for RebuildSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "rebuilt the projection from {} events up to sequence {}: {} instances, in {:.1} s",
            self.events,
            self.sequence,
            self.instances,
            self.elapsed.as_secs_f64()
        )
    }
}

const APPLICATION_NAME: &str = "registry-store-rebuild";

/// Rebuilds the projection tables of `config`'s database from the start of `log`'s events
/// stream and swaps them in atomically. Safe while a projector runs. Fails with
/// [`Error::RebuildInProgress`] when another rebuild is running, and with
/// [`Error::Undecodable`] on an event it cannot read (the live tables are then left untouched).
/// Dropping the future abandons the rebuild; the next one clears what it left behind.
pub async fn rebuild(config: &Config, log: &dyn EventLog) -> Result<RebuildSummary> {
    config.validate()?;
    let started = Instant::now();
    let mut admin = schema::connect(&config.database_url, SCHEMA, APPLICATION_NAME).await?;
    let locked: bool = admin
        .query_one("SELECT pg_try_advisory_lock($1)", &[&lock::REBUILD])
        .await?
        .get(0);
    if !locked {
        return Err(Error::RebuildInProgress);
    }
    let drop_leftovers = format!("DROP SCHEMA IF EXISTS {REBUILD_SCHEMA} CASCADE");
    admin.batch_execute(&drop_leftovers).await?;
    let result = fill_and_swap(config, log, &mut admin).await;
    if result.is_err() {
        // Best effort: a failed rebuild leaves the live tables as they were and, if the
        // connection still works, nothing else behind.
        let _ = admin.batch_execute(&drop_leftovers).await;
    }
    let _ = admin
        .execute("SELECT pg_advisory_unlock($1)", &[&lock::REBUILD])
        .await;
    let (sequence, events, instances) = result?;
    let summary = RebuildSummary {
        sequence,
        events,
        instances,
        elapsed: started.elapsed(),
    };
    tracing::info!(%summary, "rebuild swapped in");
    Ok(summary)
}

/// Fills the rebuild schema and swaps it in: (checkpoint, events applied, instance rows).
async fn fill_and_swap(
    config: &Config,
    log: &dyn EventLog,
    admin: &mut Client,
) -> Result<(u64, u64, u64)> {
    let mut fill = Fill {
        writer: Writer::open(
            &config.database_url,
            REBUILD_SCHEMA,
            APPLICATION_NAME,
            config.cache_instances,
        )
        .await?,
        log,
        batch_size: config.batch_size,
        stream: None,
        events: 0,
    };
    let stream_last = log.last_sequence(StreamKind::Events).await?;
    tracing::info!(stream_last, "rebuilding the projection tables");
    fill.through(stream_last).await?;

    let live_exists = schema::schema_exists(admin, SCHEMA).await?;
    if live_exists {
        // Get close to the live projector without holding anything, then hold the live
        // checkpoint for the last stretch and the swap.
        let live = live_checkpoint(admin).await?;
        fill.through(live).await?;
        let transaction = admin.transaction().await?;
        transaction
            .batch_execute(&format!(
                "LOCK TABLE {SCHEMA}.projector_checkpoint IN ACCESS EXCLUSIVE MODE"
            ))
            .await?;
        let live = live_checkpoint_in(&transaction).await?;
        fill.through(live).await?;
        transaction
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {RETIRED_SCHEMA} CASCADE;
                 ALTER SCHEMA {SCHEMA} RENAME TO {RETIRED_SCHEMA};
                 ALTER SCHEMA {REBUILD_SCHEMA} RENAME TO {SCHEMA};
                 DROP SCHEMA {RETIRED_SCHEMA} CASCADE;"
            ))
            .await?;
        transaction.commit().await?;
    } else {
        // Nothing live to race with; an empty, unmigrated schema of that name goes away.
        admin
            .batch_execute(&format!(
                "BEGIN;
                 DROP SCHEMA IF EXISTS {SCHEMA} CASCADE;
                 ALTER SCHEMA {REBUILD_SCHEMA} RENAME TO {SCHEMA};
                 COMMIT;"
            ))
            .await?;
    }
    let instances: i64 = admin
        .query_one("SELECT count(*) FROM instance", &[])
        .await?
        .get(0);
    Ok((
        fill.writer.applied().sequence,
        fill.events,
        u64::try_from(instances).unwrap_or(0),
    ))
}

async fn live_checkpoint(client: &Client) -> Result<u64> {
    let row = client
        .query_one(
            &format!(
                "SELECT last_sequence FROM {SCHEMA}.projector_checkpoint WHERE projection = $1"
            ),
            &[&PROJECTION],
        )
        .await?;
    Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
}

async fn live_checkpoint_in(transaction: &tokio_postgres::Transaction<'_>) -> Result<u64> {
    let row = transaction
        .query_one(
            &format!(
                "SELECT last_sequence FROM {SCHEMA}.projector_checkpoint WHERE projection = $1"
            ),
            &[&PROJECTION],
        )
        .await?;
    Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
}

/// Fills the rebuild schema from one ordered replay of the stream.
struct Fill<'a> {
    writer: Writer,
    log: &'a dyn EventLog,
    batch_size: usize,
    stream: Option<RecordStream>,
    events: u64,
}

impl Fill<'_> {
    /// Applies every event up to `target` that is not applied yet.
    async fn through(&mut self, target: u64) -> Result<()> {
        while self.writer.applied().sequence < target {
            let stream = match &mut self.stream {
                Some(stream) => stream,
                None => self.stream.insert(
                    self.log
                        .replay(StreamKind::Events, self.writer.applied().sequence + 1, None)
                        .await?,
                ),
            };
            let batch = replay::read_batch(stream, self.batch_size, target).await?;
            let done = batch.done;
            let (decoded, undecodable) = writer::decode(batch.records);
            self.events += decoded.len() as u64;
            // Nobody else writes the rebuild schema, so its checkpoint cannot move.
            self.writer.apply(&decoded).await?;
            if let Some(error) = undecodable {
                return Err(error);
            }
            if done {
                // The stream no longer holds `target` itself (it passed it): nothing more to
                // read up to it.
                if self.writer.applied().sequence < target {
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}
