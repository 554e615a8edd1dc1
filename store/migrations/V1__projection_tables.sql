-- The instance projection: what the event stream says about every instance, as operators query
-- it. Names are unqualified on purpose: the migrations run with `search_path` set to the target
-- schema (`registry` for the live tables, `registry_rebuild` while a rebuild fills fresh ones), so
-- the same files create both.

-- One row per instance id ever registered. Deregistered and expired instances are kept as
-- tombstones (`deleted_at` set, the time of the deregistration or expiry): revisions keep
-- increasing across a delete and re-registration, and "gone" stays distinguishable from "never
-- seen". A re-registration clears `deleted_at`. Live instances: `WHERE deleted_at IS NULL`.
CREATE TABLE instance (
    id          text        PRIMARY KEY,   -- hex(sha1("{namespace}##{service}##{host}##{port}"))
    namespace   text        NOT NULL,
    service     text        NOT NULL,
    host        text        NOT NULL,
    port        integer     NOT NULL,
    protocol    text        NOT NULL,
    version     text        NOT NULL,
    weight      bigint      NOT NULL,      -- u32 on the wire, so wider than integer
    ephemeral   boolean     NOT NULL,
    isolate     boolean     NOT NULL,
    healthy     boolean     NOT NULL,
    region      text        NOT NULL,
    zone        text        NOT NULL,
    campus      text        NOT NULL,
    revision    bigint      NOT NULL,      -- stream sequence of the last event applied
    created_at  timestamptz NOT NULL,      -- first registration (of the current life)
    updated_at  timestamptz NOT NULL,      -- occurred_at of the last event applied
    deleted_at  timestamptz                -- soft-delete marker, see above
);

CREATE INDEX instance_namespace_service_idx ON instance (namespace, service);
CREATE INDEX instance_host_idx ON instance (host, port);

-- One row per instance: how its health is checked and what the projection knows of it. The
-- last heartbeat is the one reported by the health engine's transition events; individual
-- heartbeats are never written here (see the store crate's documentation).
CREATE TABLE health_check (
    instance_id        text        PRIMARY KEY REFERENCES instance (id) ON DELETE CASCADE,
    type               text        NOT NULL CHECK (type IN ('heartbeat', 'none')),
    ttl_ms             bigint,     -- NULL when type = 'none'
    last_heartbeat_at  timestamptz,
    last_transition    text,       -- InstanceTurnedHealthy | InstanceTurnedUnhealthy | InstanceExpired
    last_transition_at timestamptz
);

-- Instance metadata, one row per key; replaced as a whole by a registration or status change.
CREATE TABLE instance_metadata (
    instance_id text NOT NULL REFERENCES instance (id) ON DELETE CASCADE,
    key         text NOT NULL,
    value       text NOT NULL,
    PRIMARY KEY (instance_id, key)
);

-- Per service: live instances, healthy and isolated ones among them, and the service revision
-- (the highest instance revision, tombstones included, so that a deletion moves it too).
CREATE VIEW service_summary AS
SELECT namespace,
       service,
       count(*) FILTER (WHERE deleted_at IS NULL)                 AS total,
       count(*) FILTER (WHERE deleted_at IS NULL AND healthy)     AS healthy,
       count(*) FILTER (WHERE deleted_at IS NULL AND isolate)     AS isolated,
       max(revision)                                              AS revision
FROM instance
GROUP BY namespace, service;

-- Where each projection stands in the event stream. Written in the same transaction as the rows
-- it describes, so the tables always equal the fold of the stream up to `last_sequence`.
CREATE TABLE projector_checkpoint (
    projection     text        PRIMARY KEY,
    last_sequence  bigint      NOT NULL,
    last_stored_at timestamptz,            -- when the log stored the last applied event
    updated_at     timestamptz NOT NULL
);

INSERT INTO projector_checkpoint (projection, last_sequence, last_stored_at, updated_at)
VALUES ('instances', 0, NULL, now());
