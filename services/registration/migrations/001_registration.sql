-- Registration service's own tables. API tokens live in the shared `known_tokens` table,
-- which this service owns the truth of (other services keep a copy from events).

CREATE TABLE vaults (
    vault_id   uuid PRIMARY KEY,
    name       text NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_tokens (
    token_id   text PRIMARY KEY,
    vault_id   uuid NOT NULL REFERENCES vaults (vault_id),
    name       text NOT NULL,
    role       text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);

CREATE TABLE registration_keys (
    key_id     text PRIMARY KEY,
    vault_id   uuid NOT NULL REFERENCES vaults (vault_id),
    key_hash   text NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    revoked_at timestamptz
);

CREATE TABLE producers (
    producer_id        uuid PRIMARY KEY,
    vault_id           uuid NOT NULL REFERENCES vaults (vault_id),
    kind               text NOT NULL CHECK (kind IN ('provider', 'agent')),
    name               text NOT NULL,
    site               text NOT NULL,
    generation         integer NOT NULL DEFAULT 1,
    credential_hash    text NOT NULL,
    verification_key   text NOT NULL,
    registered_key_id  text NOT NULL,
    registered_at      timestamptz NOT NULL DEFAULT now(),
    heartbeat_seconds  double precision NOT NULL,
    connection_state   text NOT NULL DEFAULT 'Disconnected',
    state_changed_at   timestamptz NOT NULL DEFAULT now(),
    last_heartbeat_at  timestamptz,
    last_sequence      bigint,
    status             jsonb NOT NULL DEFAULT '{}'::jsonb,
    metadata           jsonb NOT NULL DEFAULT '{}'::jsonb,
    active             boolean NOT NULL DEFAULT true,
    UNIQUE (vault_id, kind, name)
);
CREATE INDEX producers_connected ON producers (last_heartbeat_at)
    WHERE connection_state = 'Connected' AND active;
