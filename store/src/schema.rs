//! The database schema: refinery migrations, the schemas they are applied to, and connections.
//!
//! The projection lives in its own PostgreSQL schema, [`SCHEMA`] (`registry`), rather than in
//! `public`: a rebuild fills a second schema from the same migration files and swaps the two by
//! renaming, which is atomic and keeps every object (tables, view, indexes, migration history)
//! together. The migration files use unqualified names; each connection sets `search_path` to the
//! schema it works on. Operators query `registry.instance` (or `SET search_path = registry`).

use std::time::Duration;

use tokio_postgres::{Client, NoTls};

use crate::error::{Error, Result};

/// The schema holding the live projection tables.
pub const SCHEMA: &str = "registry";

/// The schema a rebuild fills before swapping it in.
pub(crate) const REBUILD_SCHEMA: &str = "registry_rebuild";

/// The name the live schema takes for the instant between the swap and its removal.
pub(crate) const RETIRED_SCHEMA: &str = "registry_retired";

/// The checkpoint row of the instance projection.
pub(crate) const PROJECTION: &str = "instances";

/// Advisory lock keys (scoped to the database by PostgreSQL). Arbitrary constants, spelled as
/// ASCII so that they are recognisable in `pg_locks`.
pub(crate) mod lock {
    /// Held while migrating, so that concurrent starts do not race on `CREATE TABLE`.
    pub const MIGRATE: i64 = i64::from_be_bytes(*b"reg-migr");
    /// Held by the one active projector for the whole session.
    pub const PROJECTOR: i64 = i64::from_be_bytes(*b"reg-proj");
    /// Held by a running rebuild.
    pub const REBUILD: i64 = i64::from_be_bytes(*b"reg-rbld");
}

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Creates or upgrades the projection tables in [`SCHEMA`] of the database at `database_url`.
/// Idempotent and safe to run from several processes at once. The projector runs it at the start
/// of every session too, so calling it is only needed before reading the tables without one.
pub async fn migrate(database_url: &str) -> Result<()> {
    let mut client = connect(database_url, SCHEMA, "registry-store-migrate").await?;
    migrate_schema(&mut client, SCHEMA).await
}

/// Runs the embedded migrations in `schema`, which `client`'s `search_path` must name.
pub(crate) async fn migrate_schema(client: &mut Client, schema: &str) -> Result<()> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&lock::MIGRATE])
        .await?;
    let result = async {
        client
            .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
            .await?;
        // Grouped: a fresh schema gets all its tables in one transaction or none.
        let report = embedded::migrations::runner()
            .set_grouped(true)
            .run_async(client)
            .await?;
        for migration in report.applied_migrations() {
            tracing::info!(%schema, migration = %migration, "applied schema migration");
        }
        Ok::<_, Error>(())
    }
    .await;
    // Unlock even after a failure; if the connection is gone, so is the lock.
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&lock::MIGRATE])
        .await;
    result
}

/// Opens a connection whose `search_path` is `schema` (the migrations and every statement of the
/// crate use unqualified names), named `application_name` in `pg_stat_activity`.
pub(crate) async fn connect(
    database_url: &str,
    schema: &str,
    application_name: &str,
) -> Result<Client> {
    let mut config: tokio_postgres::Config = database_url
        .parse()
        .map_err(|error| Error::Config(format!("database URL: {error}")))?;
    let options = match config.get_options() {
        Some(existing) if !existing.is_empty() => format!("{existing} -c search_path={schema}"),
        _ => format!("-c search_path={schema}"),
    };
    config.options(&options);
    config.application_name(application_name);
    if config.get_connect_timeout().is_none() {
        // Without a timeout, a connection attempt to a host that swallows packets hangs forever
        // and the projector's backoff never gets a turn.
        config.connect_timeout(Duration::from_secs(5));
    }
    let (client, connection) = config.connect(NoTls).await?;
    let application_name = application_name.to_owned();
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, application = %application_name, "PostgreSQL connection closed");
        }
    });
    Ok(client)
}

/// True when `schema` holds the projection's checkpoint table, i.e. has been migrated.
pub(crate) async fn schema_exists(client: &Client, schema: &str) -> Result<bool> {
    let row = client
        .query_one(
            "SELECT to_regclass(format('%I.projector_checkpoint', $1::text)) IS NOT NULL",
            &[&schema],
        )
        .await?;
    Ok(row.get(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_keys_are_distinct() {
        assert_ne!(lock::MIGRATE, lock::PROJECTOR);
        assert_ne!(lock::PROJECTOR, lock::REBUILD);
        assert_ne!(lock::MIGRATE, lock::REBUILD);
    }

    #[test]
    fn migrations_are_embedded_in_order() {
        let migrations = embedded::migrations::runner().get_migrations().to_vec();
        assert!(!migrations.is_empty());
        assert_eq!(migrations[0].version(), 1);
        assert!(
            migrations
                .windows(2)
                .all(|pair| pair[0].version() < pair[1].version())
        );
    }
}
