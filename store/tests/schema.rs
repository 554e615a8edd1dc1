//! The schema the migrations create, as operators see it, and `migrate` being safe to run from
//! several processes at once.

mod common;

use common::{Setup, client};

/// The documented shape of the projection: tables and view with their columns, and indexes.
const EXPECTED: &str = "\
health_check.instance_id text
health_check.type text
health_check.ttl_ms bigint null
health_check.last_heartbeat_at timestamp with time zone null
health_check.last_transition text null
health_check.last_transition_at timestamp with time zone null
instance.id text
instance.namespace text
instance.service text
instance.host text
instance.port integer
instance.protocol text
instance.version text
instance.weight bigint
instance.ephemeral boolean
instance.isolate boolean
instance.healthy boolean
instance.region text
instance.zone text
instance.campus text
instance.revision bigint
instance.created_at timestamp with time zone
instance.updated_at timestamp with time zone
instance.deleted_at timestamp with time zone null
instance_metadata.instance_id text
instance_metadata.key text
instance_metadata.value text
projector_checkpoint.projection text
projector_checkpoint.last_sequence bigint
projector_checkpoint.last_stored_at timestamp with time zone null
projector_checkpoint.updated_at timestamp with time zone
service_summary.namespace text null
service_summary.service text null
service_summary.total bigint null
service_summary.healthy bigint null
service_summary.isolated bigint null
service_summary.revision bigint null
index health_check_pkey (instance_id)
index instance_host_idx (host, port)
index instance_metadata_pkey (instance_id, key)
index instance_namespace_service_idx (namespace, service)
index instance_pkey (id)
index projector_checkpoint_pkey (projection)
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_create_the_documented_schema_once_even_when_run_concurrently() {
    let setup = Setup::new().await;
    let url = setup.env.database_url.as_str();
    let (first, second) = tokio::join!(store::migrate(url), store::migrate(url));
    first.unwrap();
    second.unwrap();
    store::migrate(url).await.unwrap();

    let client = client(url).await;
    let mut shape = String::new();
    for row in client
        .query(
            "SELECT table_name || '.' || column_name || ' ' || data_type
                    || CASE WHEN is_nullable = 'YES' THEN ' null' ELSE '' END
             FROM information_schema.columns
             WHERE table_schema = $1 AND table_name <> 'refinery_schema_history'
             ORDER BY table_name, ordinal_position",
            &[&store::SCHEMA],
        )
        .await
        .unwrap()
    {
        shape.push_str(&row.get::<_, String>(0));
        shape.push('\n');
    }
    for row in client
        .query(
            "SELECT 'index ' || indexname || ' ' || substring(indexdef from '\\(.*\\)$')
             FROM pg_indexes
             WHERE schemaname = $1 AND tablename <> 'refinery_schema_history'
             ORDER BY indexname",
            &[&store::SCHEMA],
        )
        .await
        .unwrap()
    {
        shape.push_str(&row.get::<_, String>(0));
        shape.push('\n');
    }
    assert_eq!(shape, EXPECTED);

    let versions: Vec<i32> = client
        .query(
            "SELECT version FROM registry.refinery_schema_history ORDER BY version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(versions, [1, 2], "each migration applied once");
    let checkpoint: i64 = client
        .query_one(
            "SELECT last_sequence FROM registry.projector_checkpoint WHERE projection = 'instances'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(checkpoint, 0);
}
