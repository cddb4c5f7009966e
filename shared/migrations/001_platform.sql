-- Tables every service has in its own schema: the transactional outbox, the de-duplication
-- ledger of consumed events, and the read models of vaults, API tokens and edge producers
-- (kept from registration.events.v1).

CREATE TABLE outbox (
    id           bigserial PRIMARY KEY,
    topic        text        NOT NULL,
    key          text        NOT NULL,
    value        bytea       NOT NULL,
    event_id     uuid        NOT NULL,
    event_type   text        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz
);
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;

CREATE TABLE processed_events (
    consumer     text        NOT NULL,
    event_id     uuid        NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);

CREATE TABLE known_vaults (
    vault_id   uuid PRIMARY KEY,
    name       text NOT NULL
);

CREATE TABLE known_tokens (
    token_hash text PRIMARY KEY,
    token_id   text NOT NULL UNIQUE,
    vault_id   uuid NOT NULL,
    role       text NOT NULL,
    revoked    boolean NOT NULL DEFAULT false
);

CREATE TABLE known_producers (
    producer_id      uuid PRIMARY KEY,
    vault_id         uuid NOT NULL,
    kind             text NOT NULL,
    name             text NOT NULL,
    site             text NOT NULL,
    generation       integer NOT NULL,
    verification_key text NOT NULL,
    active           boolean NOT NULL DEFAULT true,
    connection_state text,
    metadata         jsonb NOT NULL DEFAULT '{}'::jsonb
);
