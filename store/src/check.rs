//! Consistency check: fold the events stream independently and compare it with the tables.
//!
//! The tables are read in one repeatable-read snapshot together with their checkpoint, and the
//! stream is folded with [`event_log::fold::Fold`] from the start up to exactly that checkpoint,
//! so a running projector does not cause false differences. The comparison goes through its own
//! plain `SELECT`s and its own rendering of expected rows, not through the projector's loader, so
//! that a bug shared by the projector's writing and reading paths still shows up.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use event_log::event::millis_to_datetime;
use event_log::fold::{Fold, InstanceState};
use event_log::{EventLog, StreamKind};
use time::OffsetDateTime;
use tokio_postgres::IsolationLevel;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::replay;
use crate::rows::{CHECK_HEARTBEAT, CHECK_NONE, to_i64, transition_name};
use crate::schema::{self, PROJECTION, SCHEMA};

/// One difference between the fold of the stream and the tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// The table (or view) where it shows.
    pub table: &'static str,
    /// Which row: an instance id, or `namespace/service` for the service summary.
    pub key: String,
    /// The column, or `None` when the whole row is missing or unexpected.
    pub column: Option<&'static str>,
    /// What the fold of the stream says (`absent` for no row).
    pub in_stream: String,
    /// What the table holds (`absent` for no row).
    pub in_table: String,
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.table, self.key)?;
        if let Some(column) = self.column {
            write!(f, " .{column}")?;
        }
        write!(
            f,
            ": stream says {}, table has {}",
            self.in_stream, self.in_table
        )
    }
}

/// The result of [`check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The tables' checkpoint: the stream was folded up to this sequence.
    pub checkpoint: u64,
    /// The stream's last sequence when checked (events after the checkpoint are not projected
    /// yet, which is not a difference).
    pub stream_sequence: u64,
    /// Instances in the fold, tombstones included.
    pub instances_in_stream: usize,
    /// Rows in the `instance` table.
    pub instances_in_table: usize,
    /// Every difference found, ordered by table and key.
    pub differences: Vec<Difference>,
}

impl Report {
    /// True when the tables equal the fold of the stream up to the checkpoint.
    pub fn is_consistent(&self) -> bool {
        self.differences.is_empty()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "checked the tables at sequence {} against the fold of the event stream (stream at {}, {} not projected yet)",
            self.checkpoint,
            self.stream_sequence,
            self.stream_sequence.saturating_sub(self.checkpoint)
        )?;
        writeln!(
            f,
            "instances: {} in the stream, {} in the table (tombstones included)",
            self.instances_in_stream, self.instances_in_table
        )?;
        if self.is_consistent() {
            write!(f, "consistent: no difference")
        } else {
            writeln!(f, "{} difference(s):", self.differences.len())?;
            for difference in &self.differences {
                writeln!(f, "  {difference}")?;
            }
            Ok(())
        }
    }
}

/// Folds `log`'s events stream independently and compares the result with the tables of
/// `config`'s database, without changing anything.
pub async fn check(config: &Config, log: &dyn EventLog) -> Result<Report> {
    config.validate()?;
    let mut client = schema::connect(&config.database_url, SCHEMA, "registry-store-check").await?;
    let tables = if schema::schema_exists(&client, SCHEMA).await? {
        Tables::read(&mut client).await?
    } else {
        Tables::default()
    };
    let stream_sequence = log.last_sequence(StreamKind::Events).await?;
    let mut differences = Vec::new();
    if tables.checkpoint > stream_sequence {
        differences.push(Difference {
            table: "projector_checkpoint",
            key: PROJECTION.to_owned(),
            column: Some("last_sequence"),
            in_stream: format!("at most {stream_sequence}"),
            in_table: tables.checkpoint.to_string(),
        });
    }
    let fold = fold_stream(
        log,
        tables.checkpoint.min(stream_sequence),
        config.batch_size,
    )
    .await?;
    compare(&fold, &tables, &mut differences);
    differences.sort_by(|a, b| (a.table, &a.key, a.column).cmp(&(b.table, &b.key, b.column)));
    Ok(Report {
        checkpoint: tables.checkpoint,
        stream_sequence,
        instances_in_stream: fold.len(),
        instances_in_table: tables.instances.len(),
        differences,
    })
}

async fn fold_stream(log: &dyn EventLog, through: u64, batch_size: usize) -> Result<Fold> {
    let mut fold = Fold::new();
    if through == 0 {
        return Ok(fold);
    }
    let mut stream = log.replay(StreamKind::Events, 1, None).await?;
    loop {
        let batch = replay::read_batch(&mut stream, batch_size, through).await?;
        for record in &batch.records {
            let envelope = record.decode().map_err(|source| Error::Undecodable {
                sequence: record.sequence,
                source,
            })?;
            fold.apply(record.sequence, &envelope);
        }
        if batch.done {
            return Ok(fold);
        }
    }
}

/// An `instance` row as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
struct InstanceRow {
    namespace: String,
    service: String,
    host: String,
    port: i32,
    protocol: String,
    version: String,
    weight: i64,
    ephemeral: bool,
    isolate: bool,
    healthy: bool,
    region: String,
    zone: String,
    campus: String,
    revision: i64,
    created_at: OffsetDateTime,
    updated_at: OffsetDateTime,
    deleted_at: Option<OffsetDateTime>,
}

impl InstanceRow {
    /// The row the documented schema rules derive from a folded state.
    fn expected(state: &InstanceState) -> InstanceRow {
        InstanceRow {
            namespace: state.namespace.clone(),
            service: state.service.clone(),
            host: state.host.clone(),
            port: i32::from(state.port),
            protocol: state.protocol.clone(),
            version: state.version.clone(),
            weight: i64::from(state.weight),
            ephemeral: state.ephemeral,
            isolate: state.isolate,
            healthy: state.healthy,
            region: state.location.region.clone(),
            zone: state.location.zone.clone(),
            campus: state.location.campus.clone(),
            revision: to_i64(state.revision),
            created_at: millis_to_datetime(state.created_at_ms),
            updated_at: millis_to_datetime(state.updated_at_ms),
            deleted_at: state
                .deleted
                .then(|| millis_to_datetime(state.updated_at_ms)),
        }
    }
}

/// A `health_check` row as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
struct HealthCheckRow {
    check_type: String,
    ttl_ms: Option<i64>,
    last_heartbeat_at: Option<OffsetDateTime>,
    last_transition: Option<String>,
    last_transition_at: Option<OffsetDateTime>,
}

impl HealthCheckRow {
    fn expected(state: &InstanceState) -> HealthCheckRow {
        HealthCheckRow {
            check_type: if state.health_check.is_some() {
                CHECK_HEARTBEAT
            } else {
                CHECK_NONE
            }
            .to_owned(),
            ttl_ms: state
                .health_check
                .as_ref()
                .map(|check| to_i64(check.ttl_ms)),
            last_heartbeat_at: state.last_heartbeat_ms.map(millis_to_datetime),
            last_transition: state
                .last_transition
                .map(|(kind, _)| transition_name(kind).to_owned()),
            last_transition_at: state.last_transition.map(|(_, at)| millis_to_datetime(at)),
        }
    }
}

/// A `service_summary` row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct ServiceRow {
    total: i64,
    healthy: i64,
    isolated: i64,
    revision: i64,
}

/// Everything the projection holds, read in one snapshot.
#[derive(Debug, Default)]
struct Tables {
    checkpoint: u64,
    instances: BTreeMap<String, InstanceRow>,
    health_checks: BTreeMap<String, HealthCheckRow>,
    metadata: BTreeMap<String, BTreeMap<String, String>>,
    services: BTreeMap<String, ServiceRow>,
}

impl Tables {
    async fn read(client: &mut tokio_postgres::Client) -> Result<Tables> {
        let transaction = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        let checkpoint: i64 = transaction
            .query_one(
                "SELECT last_sequence FROM projector_checkpoint WHERE projection = $1",
                &[&PROJECTION],
            )
            .await?
            .get(0);
        let mut tables = Tables {
            checkpoint: u64::try_from(checkpoint).unwrap_or(0),
            ..Tables::default()
        };
        for row in transaction
            .query(
                "SELECT id, namespace, service, host, port, protocol, version, weight, ephemeral,
                        isolate, healthy, region, zone, campus, revision, created_at, updated_at,
                        deleted_at
                 FROM instance",
                &[],
            )
            .await?
        {
            tables.instances.insert(
                row.get(0),
                InstanceRow {
                    namespace: row.get(1),
                    service: row.get(2),
                    host: row.get(3),
                    port: row.get(4),
                    protocol: row.get(5),
                    version: row.get(6),
                    weight: row.get(7),
                    ephemeral: row.get(8),
                    isolate: row.get(9),
                    healthy: row.get(10),
                    region: row.get(11),
                    zone: row.get(12),
                    campus: row.get(13),
                    revision: row.get(14),
                    created_at: row.get(15),
                    updated_at: row.get(16),
                    deleted_at: row.get(17),
                },
            );
        }
        for row in transaction
            .query(
                "SELECT instance_id, type, ttl_ms, last_heartbeat_at, last_transition,
                        last_transition_at
                 FROM health_check",
                &[],
            )
            .await?
        {
            tables.health_checks.insert(
                row.get(0),
                HealthCheckRow {
                    check_type: row.get(1),
                    ttl_ms: row.get(2),
                    last_heartbeat_at: row.get(3),
                    last_transition: row.get(4),
                    last_transition_at: row.get(5),
                },
            );
        }
        for row in transaction
            .query("SELECT instance_id, key, value FROM instance_metadata", &[])
            .await?
        {
            tables
                .metadata
                .entry(row.get(0))
                .or_default()
                .insert(row.get(1), row.get(2));
        }
        for row in transaction
            .query(
                "SELECT namespace, service, total, healthy, isolated, revision
                 FROM service_summary",
                &[],
            )
            .await?
        {
            let namespace: String = row.get(0);
            let service: String = row.get(1);
            tables.services.insert(
                service_key(&namespace, &service),
                ServiceRow {
                    total: row.get(2),
                    healthy: row.get(3),
                    isolated: row.get(4),
                    revision: row.get(5),
                },
            );
        }
        transaction.commit().await?;
        Ok(tables)
    }
}

fn service_key(namespace: &str, service: &str) -> String {
    format!("{namespace}/{service}")
}

fn absent() -> String {
    "absent".to_owned()
}

/// Compares two values of a row field by field, recording each differing column.
macro_rules! compare_fields {
    ($differences:expr, $table:expr, $key:expr, $expected:expr, $found:expr, [$($field:ident),* $(,)?]) => {{
        $(
            if $expected.$field != $found.$field {
                $differences.push(Difference {
                    table: $table,
                    key: $key.to_owned(),
                    column: Some(stringify!($field)),
                    in_stream: format!("{:?}", $expected.$field),
                    in_table: format!("{:?}", $found.$field),
                });
            }
        )*
    }};
}

fn compare(fold: &Fold, tables: &Tables, differences: &mut Vec<Difference>) {
    let mut services: BTreeMap<String, ServiceRow> = BTreeMap::new();
    for state in fold.instances() {
        let id = state.id.as_str();
        let expected = InstanceRow::expected(state);
        match tables.instances.get(id) {
            None => differences.push(Difference {
                table: "instance",
                key: id.to_owned(),
                column: None,
                in_stream: format!("{expected:?}"),
                in_table: absent(),
            }),
            Some(found) => compare_fields!(
                differences,
                "instance",
                id,
                expected,
                found,
                [
                    namespace, service, host, port, protocol, version, weight, ephemeral, isolate,
                    healthy, region, zone, campus, revision, created_at, updated_at, deleted_at,
                ]
            ),
        }
        let expected = HealthCheckRow::expected(state);
        match tables.health_checks.get(id) {
            None => differences.push(Difference {
                table: "health_check",
                key: id.to_owned(),
                column: None,
                in_stream: format!("{expected:?}"),
                in_table: absent(),
            }),
            Some(found) => compare_fields!(
                differences,
                "health_check",
                id,
                expected,
                found,
                [
                    check_type,
                    ttl_ms,
                    last_heartbeat_at,
                    last_transition,
                    last_transition_at,
                ]
            ),
        }
        let empty = BTreeMap::new();
        let found = tables.metadata.get(id).unwrap_or(&empty);
        let keys: BTreeSet<&String> = state.metadata.keys().chain(found.keys()).collect();
        for key in keys {
            let (in_stream, in_table) = (state.metadata.get(key), found.get(key));
            if in_stream != in_table {
                differences.push(Difference {
                    table: "instance_metadata",
                    key: format!("{id} {key:?}"),
                    column: Some("value"),
                    in_stream: in_stream.map_or_else(absent, |value| format!("{value:?}")),
                    in_table: in_table.map_or_else(absent, |value| format!("{value:?}")),
                });
            }
        }
        let service = services
            .entry(service_key(&state.namespace, &state.service))
            .or_default();
        if !state.deleted {
            service.total += 1;
            service.healthy += i64::from(state.healthy);
            service.isolated += i64::from(state.isolate);
        }
        service.revision = service.revision.max(to_i64(state.revision));
    }
    for (table, ids) in [
        ("instance", tables.instances.keys().collect::<Vec<_>>()),
        ("health_check", tables.health_checks.keys().collect()),
        ("instance_metadata", tables.metadata.keys().collect()),
    ] {
        for id in ids {
            if fold.get(id).is_none() {
                differences.push(Difference {
                    table,
                    key: id.clone(),
                    column: None,
                    in_stream: absent(),
                    in_table: "a row".to_owned(),
                });
            }
        }
    }
    let keys: BTreeSet<&String> = services.keys().chain(tables.services.keys()).collect();
    for key in keys {
        match (services.get(key), tables.services.get(key)) {
            (Some(expected), Some(found)) => compare_fields!(
                differences,
                "service_summary",
                key,
                expected,
                found,
                [total, healthy, isolated, revision]
            ),
            (expected, found) => differences.push(Difference {
                table: "service_summary",
                key: key.clone(),
                column: None,
                in_stream: expected.map_or_else(absent, |row| format!("{row:?}")),
                in_table: found.map_or_else(absent, |row| format!("{row:?}")),
            }),
        }
    }
}
