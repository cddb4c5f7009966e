-- Policy service's own tables (policies, cloud pairings, network mappings) and its read models
-- of the inventory (from inventory.events.v1) and of protected items (from
-- replication.events.v1, filled by the replication service's events once they exist).

CREATE TABLE policies (
    policy_id  uuid PRIMARY KEY,
    vault_id   uuid NOT NULL,
    name       text NOT NULL,
    settings   jsonb NOT NULL,
    version    integer NOT NULL DEFAULT 1,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (vault_id, name)
);

CREATE TABLE pairings (
    pairing_id      uuid PRIMARY KEY,
    vault_id        uuid NOT NULL,
    source_cloud_id text NOT NULL,
    source_site     text NOT NULL,
    target_cloud_id text NOT NULL,
    target_site     text NOT NULL,
    policy_id       uuid NOT NULL REFERENCES policies (policy_id) ON DELETE RESTRICT,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (vault_id, source_cloud_id),
    UNIQUE (vault_id, target_cloud_id),
    CHECK (source_cloud_id <> target_cloud_id)
);
CREATE INDEX pairings_policy ON pairings (policy_id);

CREATE TABLE network_mappings (
    mapping_id        uuid PRIMARY KEY,
    vault_id          uuid NOT NULL,
    source_network_id text NOT NULL,
    source_site       text NOT NULL,
    target_network_id text NOT NULL,
    target_site       text NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    UNIQUE (vault_id, source_network_id)
);

-- Read models of the inventory: one row per object, the full object in `data`.
CREATE TABLE inv_clouds (
    vault_id     uuid NOT NULL,
    cloud_id     text NOT NULL,
    provider_id  uuid NOT NULL,
    site         text NOT NULL,
    name         text NOT NULL,
    host_groups  jsonb NOT NULL DEFAULT '[]'::jsonb,
    capacity_vms integer NOT NULL,
    data         jsonb NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (vault_id, cloud_id)
);

CREATE TABLE inv_hosts (
    vault_id    uuid NOT NULL,
    host_id     text NOT NULL,
    provider_id uuid NOT NULL,
    site        text NOT NULL,
    cloud_id    text NOT NULL,
    os_version  text NOT NULL,
    data        jsonb NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (vault_id, host_id)
);
CREATE INDEX inv_hosts_cloud ON inv_hosts (vault_id, cloud_id);

CREATE TABLE inv_vms (
    vault_id    uuid NOT NULL,
    vm_id       text NOT NULL,
    provider_id uuid NOT NULL,
    site        text NOT NULL,
    cloud_id    text NOT NULL,
    data        jsonb NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (vault_id, vm_id)
);
CREATE INDEX inv_vms_cloud ON inv_vms (vault_id, cloud_id);

CREATE TABLE inv_networks (
    vault_id    uuid NOT NULL,
    network_id  text NOT NULL,
    provider_id uuid NOT NULL,
    site        text NOT NULL,
    name        text NOT NULL,
    data        jsonb NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (vault_id, network_id)
);

-- Protected items (VMs with replication enabled), kept from replication.events.v1 by the
-- replication issue; the unpair and prerequisite rules read it.
CREATE TABLE protected_items (
    vault_id        uuid NOT NULL,
    vm_id           text NOT NULL,
    source_cloud_id text NOT NULL,
    target_cloud_id text NOT NULL,
    pairing_id      uuid,
    state           text NOT NULL DEFAULT 'protected',
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (vault_id, vm_id)
);
CREATE INDEX protected_items_source ON protected_items (vault_id, source_cloud_id);
CREATE INDEX protected_items_target ON protected_items (vault_id, target_cloud_id);
