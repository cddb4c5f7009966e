-- Inventory service's own tables: one row per site provider (its last applied sequence) and
-- one row per discovered object (cloud, host, VM, VM network) with its content hash, so a
-- snapshot writes only what changed. Snapshots split into parts wait in snapshot_parts until
-- every part is here.

CREATE TABLE providers (
    provider_id            uuid PRIMARY KEY,
    vault_id               uuid        NOT NULL,
    name                   text        NOT NULL,
    site                   text        NOT NULL,
    last_sequence          bigint      NOT NULL DEFAULT -1,
    last_snapshot_sequence bigint,
    last_snapshot_at       timestamptz,
    last_change_at         timestamptz,
    stale_ignored          bigint      NOT NULL DEFAULT 0,
    updated_at             timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX providers_vault ON providers (vault_id, site);

CREATE TABLE objects (
    provider_id  uuid        NOT NULL REFERENCES providers (provider_id) ON DELETE CASCADE,
    kind         text        NOT NULL CHECK (kind IN ('network', 'cloud', 'host', 'vm')),
    object_id    text        NOT NULL,
    vault_id     uuid        NOT NULL,
    site         text        NOT NULL,
    name         text        NOT NULL,
    cloud_id     text,
    host_id      text,
    content_hash text        NOT NULL,
    body         jsonb       NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider_id, kind, object_id)
);
CREATE INDEX objects_vault_kind ON objects (vault_id, kind, name);
CREATE INDEX objects_vault_id ON objects (vault_id, kind, object_id);
CREATE INDEX objects_cloud ON objects (vault_id, kind, cloud_id);
CREATE INDEX objects_host ON objects (vault_id, kind, host_id);

CREATE TABLE snapshot_parts (
    provider_id uuid        NOT NULL,
    sequence    bigint      NOT NULL,
    part        integer     NOT NULL,
    parts       integer     NOT NULL,
    inventory   text        NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider_id, sequence, part)
);
