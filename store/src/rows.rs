//! The projection's rows: reading instance states back from the tables, and writing changed
//! states with one set-based statement per table (arrays bound as parameters and `unnest`ed), so
//! that a batch costs a handful of round trips whatever its size.

use std::collections::{BTreeMap, HashMap};

use event_log::EventType;
use event_log::event::{HealthCheck, Location, UnixMillis, millis_to_datetime};
use event_log::fold::InstanceState;
use time::OffsetDateTime;
use tokio_postgres::{Client, Row, Statement};

use crate::error::{Error, Result};
use crate::schema::PROJECTION;

/// `health_check.type` of an instance with a heartbeat lease.
pub(crate) const CHECK_HEARTBEAT: &str = "heartbeat";
/// `health_check.type` of an instance without health checking.
pub(crate) const CHECK_NONE: &str = "none";

// `tableoid` identifies the table the row lives in: a rebuild swaps in a new table with the same
// checkpoint value, and the writer must notice that too.
const LOCK_CHECKPOINT: &str = "SELECT last_sequence, last_stored_at, tableoid \
     FROM projector_checkpoint WHERE projection = $1 FOR UPDATE";

const READ_CHECKPOINT: &str = "SELECT last_sequence, last_stored_at, tableoid \
     FROM projector_checkpoint WHERE projection = $1";

const SAVE_CHECKPOINT: &str = "UPDATE projector_checkpoint \
     SET last_sequence = $2, last_stored_at = $3, updated_at = now() WHERE projection = $1";

// The ids are joined as a set rather than filtered with `= ANY($1)`: whatever the statistics
// of a young table say, this plans as one index probe per id.
const LOAD_INSTANCES: &str = "\
SELECT i.id, i.namespace, i.service, i.host, i.port, i.protocol, i.version, i.weight,
       i.ephemeral, i.isolate, i.healthy, i.region, i.zone, i.campus, i.revision,
       i.created_at, i.updated_at, i.deleted_at,
       h.type, h.ttl_ms, h.last_heartbeat_at, h.last_transition, h.last_transition_at
FROM unnest($1::text[]) AS wanted (id)
JOIN instance i ON i.id = wanted.id
LEFT JOIN health_check h ON h.instance_id = i.id";

const LOAD_METADATA: &str = "\
SELECT m.instance_id, m.key, m.value
FROM unnest($1::text[]) AS wanted (id)
JOIN instance_metadata m ON m.instance_id = wanted.id";

const UPSERT_INSTANCE: &str = "\
INSERT INTO instance (id, namespace, service, host, port, protocol, version, weight,
                      ephemeral, isolate, healthy, region, zone, campus, revision,
                      created_at, updated_at, deleted_at)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int4[], $6::text[],
                     $7::text[], $8::int8[], $9::bool[], $10::bool[], $11::bool[], $12::text[],
                     $13::text[], $14::text[], $15::int8[], $16::timestamptz[],
                     $17::timestamptz[], $18::timestamptz[])
ON CONFLICT (id) DO UPDATE SET
    namespace = EXCLUDED.namespace, service = EXCLUDED.service, host = EXCLUDED.host,
    port = EXCLUDED.port, protocol = EXCLUDED.protocol, version = EXCLUDED.version,
    weight = EXCLUDED.weight, ephemeral = EXCLUDED.ephemeral, isolate = EXCLUDED.isolate,
    healthy = EXCLUDED.healthy, region = EXCLUDED.region, zone = EXCLUDED.zone,
    campus = EXCLUDED.campus, revision = EXCLUDED.revision, created_at = EXCLUDED.created_at,
    updated_at = EXCLUDED.updated_at, deleted_at = EXCLUDED.deleted_at";

const UPSERT_HEALTH_CHECK: &str = "\
INSERT INTO health_check (instance_id, type, ttl_ms, last_heartbeat_at, last_transition,
                          last_transition_at)
SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::timestamptz[], $5::text[],
                     $6::timestamptz[])
ON CONFLICT (instance_id) DO UPDATE SET
    type = EXCLUDED.type, ttl_ms = EXCLUDED.ttl_ms,
    last_heartbeat_at = EXCLUDED.last_heartbeat_at, last_transition = EXCLUDED.last_transition,
    last_transition_at = EXCLUDED.last_transition_at";

const DELETE_METADATA: &str = "DELETE FROM instance_metadata WHERE instance_id = ANY($1::text[])";

const INSERT_METADATA: &str = "INSERT INTO instance_metadata (instance_id, key, value) \
     SELECT * FROM unnest($1::text[], $2::text[], $3::text[])";

/// The crate's statements, prepared once per connection.
#[derive(Debug)]
pub(crate) struct Statements {
    lock_checkpoint: Statement,
    read_checkpoint: Statement,
    save_checkpoint: Statement,
    load_instances: Statement,
    load_metadata: Statement,
    upsert_instance: Statement,
    upsert_health_check: Statement,
    delete_metadata: Statement,
    insert_metadata: Statement,
}

/// Where a projection stands: the last applied sequence and when the log stored that event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Checkpoint {
    pub sequence: u64,
    pub stored_at_ms: Option<UnixMillis>,
}

impl Statements {
    pub(crate) async fn prepare(client: &Client) -> Result<Statements> {
        let (
            lock_checkpoint,
            read_checkpoint,
            save_checkpoint,
            load_instances,
            load_metadata,
            upsert_instance,
            upsert_health_check,
            delete_metadata,
            insert_metadata,
        ) = futures::try_join!(
            client.prepare(LOCK_CHECKPOINT),
            client.prepare(READ_CHECKPOINT),
            client.prepare(SAVE_CHECKPOINT),
            client.prepare(LOAD_INSTANCES),
            client.prepare(LOAD_METADATA),
            client.prepare(UPSERT_INSTANCE),
            client.prepare(UPSERT_HEALTH_CHECK),
            client.prepare(DELETE_METADATA),
            client.prepare(INSERT_METADATA),
        )?;
        Ok(Statements {
            lock_checkpoint,
            read_checkpoint,
            save_checkpoint,
            load_instances,
            load_metadata,
            upsert_instance,
            upsert_health_check,
            delete_metadata,
            insert_metadata,
        })
    }

    /// Reads the checkpoint and the OID of the table holding it; with `for_update`, also locks
    /// its row until the transaction ends, which serialises every writer of the projection
    /// (projector, rebuild swap).
    pub(crate) async fn checkpoint(
        &self,
        client: &Client,
        for_update: bool,
    ) -> Result<(Checkpoint, u32)> {
        let statement = if for_update {
            &self.lock_checkpoint
        } else {
            &self.read_checkpoint
        };
        let row = client.query_one(statement, &[&PROJECTION]).await?;
        let checkpoint = Checkpoint {
            sequence: to_u64(row.get(0), "projector_checkpoint", "last_sequence")?,
            stored_at_ms: row.get::<_, Option<OffsetDateTime>>(1).map(to_millis),
        };
        Ok((checkpoint, row.get(2)))
    }

    /// Loads the states of the given instances (those that exist).
    pub(crate) async fn load(&self, client: &Client, ids: &[&str]) -> Result<Vec<InstanceState>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&ids];
        let (instances, metadata) = futures::try_join!(
            client.query(&self.load_instances, &params),
            client.query(&self.load_metadata, &params),
        )?;
        let mut metadata_of: HashMap<String, BTreeMap<String, String>> = HashMap::new();
        for row in metadata {
            metadata_of
                .entry(row.get(0))
                .or_default()
                .insert(row.get(1), row.get(2));
        }
        instances
            .iter()
            .map(|row| {
                let mut state = state_from_row(row)?;
                state.metadata = metadata_of.remove(&state.id).unwrap_or_default();
                Ok(state)
            })
            .collect()
    }

    /// Writes the `instance` rows of `states` and the `health_check` rows of `checks_of` over
    /// whatever the tables hold for them, deletes the metadata rows of the instances in
    /// `metadata_replaced`, inserts the metadata of those in `metadata_of`, moves the checkpoint
    /// to `checkpoint`, and commits the transaction `client` is in.
    ///
    /// The statements are pipelined: all sent back to back, then awaited together, so the whole
    /// write costs one round trip. PostgreSQL executes them in the order sent, which is the order
    /// the foreign keys need (instances before the rows that reference them). Should any of them
    /// fail, the transaction is aborted and the `COMMIT` behind them only rolls it back, and the
    /// failure is returned.
    pub(crate) async fn write_and_commit(
        &self,
        client: &Client,
        states: &[&InstanceState],
        checks_of: &[&InstanceState],
        metadata_of: &[&InstanceState],
        metadata_replaced: &[&str],
        checkpoint: Checkpoint,
    ) -> Result<()> {
        let instances = InstanceColumns::new(states);
        let checks = HealthCheckColumns::new(checks_of);
        let metadata = MetadataColumns::new(metadata_of);
        let sequence = to_i64(checkpoint.sequence);
        let stored_at = checkpoint.stored_at_ms.map(millis_to_datetime);
        // Each async block sends its statement on its first poll; `try_join!` polls them in the
        // order written, which fixes the order they reach the server.
        let upsert_instances = async {
            if states.is_empty() {
                return Ok(0);
            }
            client
                .execute(&self.upsert_instance, &instances.params())
                .await
        };
        let upsert_checks = async {
            if checks_of.is_empty() {
                return Ok(0);
            }
            client
                .execute(&self.upsert_health_check, &checks.params())
                .await
        };
        let delete_metadata = async {
            if metadata_replaced.is_empty() {
                return Ok(0);
            }
            client
                .execute(&self.delete_metadata, &[&metadata_replaced])
                .await
        };
        let insert_metadata = async {
            if metadata.instance_id.is_empty() {
                return Ok(0);
            }
            client
                .execute(
                    &self.insert_metadata,
                    &[&metadata.instance_id, &metadata.key, &metadata.value],
                )
                .await
        };
        let save_params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
            [&PROJECTION, &sequence, &stored_at];
        let save = client.execute(&self.save_checkpoint, &save_params);
        let commit = client.batch_execute("COMMIT");
        futures::try_join!(
            upsert_instances,
            upsert_checks,
            delete_metadata,
            insert_metadata,
            save,
            commit
        )?;
        Ok(())
    }
}

/// Unix milliseconds of a timestamp (the fold's unit; the tables store exactly these).
pub(crate) fn to_millis(at: OffsetDateTime) -> UnixMillis {
    (at.unix_timestamp_nanos() / 1_000_000) as UnixMillis
}

/// Stream sequences and TTLs are `u64` in the events and `bigint` in the tables; real values stay
/// far below `i64::MAX`, so saturating is only a guard against nonsense.
pub(crate) fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn to_u64(value: i64, table: &str, column: &str) -> Result<u64> {
    u64::try_from(value).map_err(|_| Error::InvalidRow {
        instance_id: String::new(),
        detail: format!("{table}.{column} is negative ({value})"),
    })
}

fn invalid(id: &str, detail: impl Into<String>) -> Error {
    Error::InvalidRow {
        instance_id: id.to_owned(),
        detail: detail.into(),
    }
}

/// The text stored in `health_check.last_transition` for a transition event type.
pub(crate) fn transition_name(event_type: EventType) -> &'static str {
    event_type.as_str()
}

fn state_from_row(row: &Row) -> Result<InstanceState> {
    let id: String = row.get(0);
    let port: i32 = row.get(4);
    let weight: i64 = row.get(7);
    let revision: i64 = row.get(14);
    let check_type: Option<String> = row.get(18);
    let ttl_ms: Option<i64> = row.get(19);
    let health_check = match (check_type.as_deref(), ttl_ms) {
        (Some(CHECK_HEARTBEAT), Some(ttl_ms)) => Some(HealthCheck {
            ttl_ms: u64::try_from(ttl_ms).map_err(|_| invalid(&id, "negative ttl_ms"))?,
        }),
        (Some(CHECK_NONE), None) => None,
        (None, _) => return Err(invalid(&id, "no health_check row")),
        (Some(other), ttl) => {
            return Err(invalid(
                &id,
                format!("health_check type {other:?} with ttl_ms {ttl:?}"),
            ));
        }
    };
    let transition: Option<String> = row.get(21);
    let transition_at: Option<OffsetDateTime> = row.get(22);
    let last_transition = match (transition, transition_at) {
        (Some(name), Some(at)) => Some((
            EventType::parse(&name)
                .ok_or_else(|| invalid(&id, format!("unknown transition {name:?}")))?,
            to_millis(at),
        )),
        (None, None) => None,
        _ => {
            return Err(invalid(
                &id,
                "last_transition without its time or vice versa",
            ));
        }
    };
    let deleted_at: Option<OffsetDateTime> = row.get(17);
    Ok(InstanceState {
        namespace: row.get(1),
        service: row.get(2),
        host: row.get(3),
        port: u16::try_from(port).map_err(|_| invalid(&id, format!("port {port}")))?,
        protocol: row.get(5),
        version: row.get(6),
        weight: u32::try_from(weight).map_err(|_| invalid(&id, format!("weight {weight}")))?,
        // Filled in by the caller from the metadata query.
        metadata: BTreeMap::new(),
        health_check,
        ephemeral: row.get(8),
        isolate: row.get(9),
        location: Location {
            region: row.get(11),
            zone: row.get(12),
            campus: row.get(13),
        },
        healthy: row.get(10),
        deleted: deleted_at.is_some(),
        revision: u64::try_from(revision).map_err(|_| invalid(&id, "negative revision"))?,
        created_at_ms: to_millis(row.get(15)),
        updated_at_ms: to_millis(row.get(16)),
        last_heartbeat_ms: row.get::<_, Option<OffsetDateTime>>(20).map(to_millis),
        last_transition,
        id,
    })
}

/// `instance` rows as parallel arrays, one element per state.
struct InstanceColumns<'a> {
    id: Vec<&'a str>,
    namespace: Vec<&'a str>,
    service: Vec<&'a str>,
    host: Vec<&'a str>,
    port: Vec<i32>,
    protocol: Vec<&'a str>,
    version: Vec<&'a str>,
    weight: Vec<i64>,
    ephemeral: Vec<bool>,
    isolate: Vec<bool>,
    healthy: Vec<bool>,
    region: Vec<&'a str>,
    zone: Vec<&'a str>,
    campus: Vec<&'a str>,
    revision: Vec<i64>,
    created_at: Vec<OffsetDateTime>,
    updated_at: Vec<OffsetDateTime>,
    deleted_at: Vec<Option<OffsetDateTime>>,
}

impl<'a> InstanceColumns<'a> {
    fn new(states: &[&'a InstanceState]) -> Self {
        let n = states.len();
        let mut columns = InstanceColumns {
            id: Vec::with_capacity(n),
            namespace: Vec::with_capacity(n),
            service: Vec::with_capacity(n),
            host: Vec::with_capacity(n),
            port: Vec::with_capacity(n),
            protocol: Vec::with_capacity(n),
            version: Vec::with_capacity(n),
            weight: Vec::with_capacity(n),
            ephemeral: Vec::with_capacity(n),
            isolate: Vec::with_capacity(n),
            healthy: Vec::with_capacity(n),
            region: Vec::with_capacity(n),
            zone: Vec::with_capacity(n),
            campus: Vec::with_capacity(n),
            revision: Vec::with_capacity(n),
            created_at: Vec::with_capacity(n),
            updated_at: Vec::with_capacity(n),
            deleted_at: Vec::with_capacity(n),
        };
        for state in states {
            let updated_at = millis_to_datetime(state.updated_at_ms);
            columns.id.push(&state.id);
            columns.namespace.push(&state.namespace);
            columns.service.push(&state.service);
            columns.host.push(&state.host);
            columns.port.push(i32::from(state.port));
            columns.protocol.push(&state.protocol);
            columns.version.push(&state.version);
            columns.weight.push(i64::from(state.weight));
            columns.ephemeral.push(state.ephemeral);
            columns.isolate.push(state.isolate);
            columns.healthy.push(state.healthy);
            columns.region.push(&state.location.region);
            columns.zone.push(&state.location.zone);
            columns.campus.push(&state.location.campus);
            columns.revision.push(to_i64(state.revision));
            columns
                .created_at
                .push(millis_to_datetime(state.created_at_ms));
            columns.updated_at.push(updated_at);
            // The fold's tombstone carries no separate deletion time: the deleting event is the
            // last one applied, so its time is `updated_at`.
            columns.deleted_at.push(state.deleted.then_some(updated_at));
        }
        columns
    }

    fn params(&self) -> [&(dyn tokio_postgres::types::ToSql + Sync); 18] {
        [
            &self.id,
            &self.namespace,
            &self.service,
            &self.host,
            &self.port,
            &self.protocol,
            &self.version,
            &self.weight,
            &self.ephemeral,
            &self.isolate,
            &self.healthy,
            &self.region,
            &self.zone,
            &self.campus,
            &self.revision,
            &self.created_at,
            &self.updated_at,
            &self.deleted_at,
        ]
    }
}

/// `health_check` rows as parallel arrays.
struct HealthCheckColumns<'a> {
    instance_id: Vec<&'a str>,
    check_type: Vec<&'static str>,
    ttl_ms: Vec<Option<i64>>,
    last_heartbeat_at: Vec<Option<OffsetDateTime>>,
    last_transition: Vec<Option<&'static str>>,
    last_transition_at: Vec<Option<OffsetDateTime>>,
}

impl<'a> HealthCheckColumns<'a> {
    fn new(states: &[&'a InstanceState]) -> Self {
        let mut columns = HealthCheckColumns {
            instance_id: Vec::with_capacity(states.len()),
            check_type: Vec::with_capacity(states.len()),
            ttl_ms: Vec::with_capacity(states.len()),
            last_heartbeat_at: Vec::with_capacity(states.len()),
            last_transition: Vec::with_capacity(states.len()),
            last_transition_at: Vec::with_capacity(states.len()),
        };
        for state in states {
            columns.instance_id.push(&state.id);
            columns.check_type.push(if state.health_check.is_some() {
                CHECK_HEARTBEAT
            } else {
                CHECK_NONE
            });
            columns.ttl_ms.push(
                state
                    .health_check
                    .as_ref()
                    .map(|check| to_i64(check.ttl_ms)),
            );
            columns
                .last_heartbeat_at
                .push(state.last_heartbeat_ms.map(millis_to_datetime));
            columns
                .last_transition
                .push(state.last_transition.map(|(kind, _)| transition_name(kind)));
            columns
                .last_transition_at
                .push(state.last_transition.map(|(_, at)| millis_to_datetime(at)));
        }
        columns
    }

    fn params(&self) -> [&(dyn tokio_postgres::types::ToSql + Sync); 6] {
        [
            &self.instance_id,
            &self.check_type,
            &self.ttl_ms,
            &self.last_heartbeat_at,
            &self.last_transition,
            &self.last_transition_at,
        ]
    }
}

/// `instance_metadata` rows as parallel arrays.
struct MetadataColumns<'a> {
    instance_id: Vec<&'a str>,
    key: Vec<&'a str>,
    value: Vec<&'a str>,
}

impl<'a> MetadataColumns<'a> {
    fn new(states: &[&'a InstanceState]) -> Self {
        let mut columns = MetadataColumns {
            instance_id: Vec::new(),
            key: Vec::new(),
            value: Vec::new(),
        };
        for state in states {
            for (key, value) in &state.metadata {
                columns.instance_id.push(&state.id);
                columns.key.push(key);
                columns.value.push(value);
            }
        }
        columns
    }
}
