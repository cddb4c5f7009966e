-- Failover service schema: read models (protected items and their points, VMs, networks,
-- network mappings, pairings), answers to what this service asked for, jobs with their tasks
-- (each task is one durable workflow step), per-item failover state, recovery plans.

CREATE TABLE rm_items (
    item_id          uuid PRIMARY KEY,
    vault_id         uuid NOT NULL,
    vm_id            text NOT NULL,
    vm_name          text NOT NULL,
    source_cloud_id  text NOT NULL,
    target_cloud_id  text NOT NULL,
    pairing_id       uuid NOT NULL,
    source_agent_id  uuid NOT NULL,
    state            text NOT NULL DEFAULT 'waiting_for_initial_replication',
    health           text NOT NULL DEFAULT 'Normal',
    active           boolean NOT NULL DEFAULT true,
    latest_seq       integer,
    latest_source_time timestamptz,
    latest_app_seq   integer,
    updated_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE rm_vms (
    vm_id     text PRIMARY KEY,
    vault_id  uuid NOT NULL,
    site      text NOT NULL,
    vm        jsonb NOT NULL,
    removed   boolean NOT NULL DEFAULT false
);

CREATE TABLE rm_networks (
    network_id text PRIMARY KEY,
    vault_id   uuid NOT NULL,
    site       text NOT NULL,
    network    jsonb NOT NULL,
    removed    boolean NOT NULL DEFAULT false
);

CREATE TABLE rm_clouds (
    cloud_id text PRIMARY KEY,
    vault_id uuid NOT NULL,
    site     text NOT NULL
);

CREATE TABLE rm_mappings (
    mapping_id        uuid PRIMARY KEY,
    vault_id          uuid NOT NULL,
    source_network_id text NOT NULL,
    target_network_id text NOT NULL,
    removed           boolean NOT NULL DEFAULT false
);

-- Answers: RecoveryPointMaterialised/Failed (by request id), CommandCompleted (by command id).
CREATE TABLE answers (
    request_id uuid PRIMARY KEY,
    kind       text NOT NULL,
    ok         boolean NOT NULL,
    error      text NOT NULL DEFAULT '',
    result     jsonb NOT NULL DEFAULT '{}'::jsonb,
    at         timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE jobs (
    job_id         uuid PRIMARY KEY,
    vault_id       uuid NOT NULL,
    operation      text NOT NULL,
    target_kind    text NOT NULL,          -- item | plan
    target         text NOT NULL,
    params         jsonb NOT NULL DEFAULT '{}'::jsonb,
    state          text NOT NULL,
    progress       integer NOT NULL DEFAULT 0,
    expected_tasks integer NOT NULL DEFAULT 1,
    error          text,
    cause          text,
    recommendation text,
    run_no         integer NOT NULL DEFAULT 1,  -- operator restarts
    restarts       integer NOT NULL DEFAULT 0,  -- resumes after a service restart + operator restarts
    waiting_for    jsonb,                       -- the manual action awaiting approval
    result         jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_by     text NOT NULL DEFAULT '',
    created_at     timestamptz NOT NULL DEFAULT now(),
    started_at     timestamptz,
    ended_at       timestamptz,
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX jobs_by_vault ON jobs (vault_id, created_at DESC);
CREATE INDEX jobs_unfinished ON jobs (state) WHERE state IN ('not_started', 'in_progress', 'waiting_for_input');

-- One task per workflow step; the row is written before the step's effect, and its
-- `command_id` is the idempotency key every (re-)sent command or request of the step carries.
CREATE TABLE tasks (
    job_id     uuid NOT NULL REFERENCES jobs (job_id),
    task_no    integer NOT NULL,
    step_key   text NOT NULL,
    name       text NOT NULL,
    state      text NOT NULL,
    command_id uuid NOT NULL,
    attempts   integer NOT NULL DEFAULT 1,
    started_at timestamptz NOT NULL DEFAULT now(),
    ended_at   timestamptz,
    error      text,
    cause      text,
    recommendation text,
    detail     jsonb NOT NULL DEFAULT '{}'::jsonb,
    PRIMARY KEY (job_id, task_no),
    UNIQUE (job_id, step_key)
);

CREATE TABLE job_history (
    id      bigserial PRIMARY KEY,
    job_id  uuid NOT NULL REFERENCES jobs (job_id),
    at      timestamptz NOT NULL DEFAULT now(),
    message text NOT NULL
);
CREATE INDEX job_history_by_job ON job_history (job_id, id);

CREATE TABLE approvals (
    job_id      uuid NOT NULL REFERENCES jobs (job_id),
    action_key  text NOT NULL,
    approved_by text NOT NULL,
    comment     text NOT NULL DEFAULT '',
    at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, action_key)
);

-- This service's view of each item: testing / failed_over / committed / reversed ...
CREATE TABLE item_failover (
    item_id    uuid PRIMARY KEY,
    vault_id   uuid NOT NULL,
    state      text NOT NULL,
    info       jsonb NOT NULL DEFAULT '{}'::jsonb,
    test       jsonb,
    notes      jsonb NOT NULL DEFAULT '[]'::jsonb,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Reverse replication: the item that protects the VM in the other direction.
CREATE TABLE item_links (
    old_item_id uuid PRIMARY KEY,
    new_item_id uuid NOT NULL UNIQUE,
    vault_id    uuid NOT NULL,
    vm_id       text NOT NULL,
    vm_name     text NOT NULL,
    source_agent_id uuid NOT NULL,
    source_site text NOT NULL,
    target_site text NOT NULL,
    disks       jsonb NOT NULL,
    nics        jsonb NOT NULL DEFAULT '[]'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE test_networks (
    network_id text PRIMARY KEY,
    vault_id   uuid NOT NULL,
    job_id     uuid NOT NULL,
    site       text NOT NULL,
    name       text NOT NULL,
    deleted_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE recovery_plans (
    plan_id    uuid PRIMARY KEY,
    vault_id   uuid NOT NULL,
    name       text NOT NULL,
    description text NOT NULL DEFAULT '',
    groups     jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (vault_id, name)
);
