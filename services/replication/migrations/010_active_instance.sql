-- One active replication instance per deployment (services/replication/standby.py): the
-- replica store the deployment's recovery points live in (the identity file at the store's
-- root) and the instance that holds the active role: its heartbeat (every heartbeat_seconds)
-- and, after a graceful stop, when it released the role. Keyed by the topic prefix (one
-- deployment per schema and prefix).
CREATE TABLE active_instance (
    deployment        text PRIMARY KEY,
    store_id          uuid NOT NULL,
    host              text NOT NULL,
    pid               integer NOT NULL,
    store_dir         text NOT NULL,
    started_at        timestamptz NOT NULL,
    heartbeat_at      timestamptz NOT NULL,
    heartbeat_seconds double precision NOT NULL,
    released_at       timestamptz
);
