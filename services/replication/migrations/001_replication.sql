-- Replication service schema: read models it needs (VMs, hosts, pairings, policies from
-- inventory and policy events), protected items, cycles being staged, recovery points.

CREATE TABLE rm_hosts (
    host_id   text PRIMARY KEY,
    vault_id  uuid NOT NULL,
    name      text NOT NULL,
    site      text NOT NULL,
    cloud_id  text NOT NULL,
    removed   boolean NOT NULL DEFAULT false
);

CREATE TABLE rm_vms (
    vm_id     text PRIMARY KEY,
    vault_id  uuid NOT NULL,
    name      text NOT NULL,
    site      text NOT NULL,
    cloud_id  text NOT NULL,
    host_id   text NOT NULL,
    vm        jsonb NOT NULL,
    removed   boolean NOT NULL DEFAULT false
);

CREATE TABLE rm_policies (
    policy_id uuid PRIMARY KEY,
    vault_id  uuid NOT NULL,
    name      text NOT NULL,
    version   integer NOT NULL,
    settings  jsonb NOT NULL,
    deleted   boolean NOT NULL DEFAULT false
);

CREATE TABLE rm_pairings (
    pairing_id      uuid PRIMARY KEY,
    vault_id        uuid NOT NULL,
    source_cloud_id text NOT NULL,
    source_site     text NOT NULL,
    target_cloud_id text NOT NULL,
    target_site     text NOT NULL,
    policy_id       uuid NOT NULL,
    removed         boolean NOT NULL DEFAULT false
);

CREATE TABLE protected_items (
    item_id               uuid PRIMARY KEY,
    vault_id              uuid NOT NULL,
    vm_id                 text NOT NULL,
    vm_name               text NOT NULL,
    pairing_id            uuid NOT NULL,
    policy_id             uuid NOT NULL,
    source_agent_id       uuid NOT NULL,
    source_site           text NOT NULL,
    target_site           text NOT NULL,
    target_cloud_id       text NOT NULL,
    disks                 jsonb NOT NULL,
    copy_interval_seconds integer NOT NULL,
    state                 text NOT NULL,
    health                text NOT NULL DEFAULT 'Normal',
    health_reasons        jsonb NOT NULL DEFAULT '[]'::jsonb,
    error                 text,
    paused                boolean NOT NULL DEFAULT false,
    last_committed_seq    integer,
    resync_seq            integer,
    resync_id             uuid,
    last_point_source_time timestamptz,
    last_cycle_at         timestamptz,
    initial_done_at       timestamptz,
    initial_progress      jsonb NOT NULL DEFAULT '{}'::jsonb,
    protected_since       timestamptz NOT NULL DEFAULT now(),
    active                boolean NOT NULL DEFAULT true,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX protected_items_one_per_vm ON protected_items (vm_id) WHERE active;

CREATE TABLE open_cycles (
    item_id     uuid NOT NULL,
    cycle_seq   integer NOT NULL,
    kind        text NOT NULL,
    disks       jsonb NOT NULL,
    source_time timestamptz NOT NULL,
    app_consistent boolean NOT NULL,
    poisoned    text,
    started_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (item_id, cycle_seq)
);

CREATE TABLE staged_batches (
    item_id   uuid NOT NULL,
    cycle_seq integer NOT NULL,
    batch_no  integer NOT NULL,
    blocks    integer NOT NULL,
    bytes     bigint NOT NULL,
    PRIMARY KEY (item_id, cycle_seq, batch_no)
);

CREATE TABLE staged_blocks (
    item_id     uuid NOT NULL,
    cycle_seq   integer NOT NULL,
    disk_id     text NOT NULL,
    block_index integer NOT NULL,
    sha256      text NOT NULL,
    PRIMARY KEY (item_id, cycle_seq, disk_id, block_index)
);

CREATE TABLE recovery_points (
    item_id        uuid NOT NULL,
    cycle_seq      integer NOT NULL,
    kind           text NOT NULL,
    point_type     text NOT NULL,
    source_time    timestamptz NOT NULL,
    committed_at   timestamptz NOT NULL DEFAULT now(),
    disks          jsonb NOT NULL,
    changed_blocks integer NOT NULL,
    bytes          bigint NOT NULL,
    pruned_at      timestamptz,
    PRIMARY KEY (item_id, cycle_seq)
);
CREATE INDEX recovery_points_live ON recovery_points (item_id, cycle_seq) WHERE pruned_at IS NULL;

CREATE TABLE item_stats (
    item_id              uuid PRIMARY KEY,
    cycles_ok            bigint NOT NULL DEFAULT 0,
    cycles_failed        bigint NOT NULL DEFAULT 0,
    latency_sum_seconds  double precision NOT NULL DEFAULT 0,
    latency_max_seconds  double precision NOT NULL DEFAULT 0,
    bytes_sum            bigint NOT NULL DEFAULT 0,
    bytes_max            bigint NOT NULL DEFAULT 0,
    network_failures     bigint NOT NULL DEFAULT 0,
    app_consistency_failures bigint NOT NULL DEFAULT 0
);
