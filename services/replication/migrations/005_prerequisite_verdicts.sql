-- Read model of the policy service's enable-replication prerequisite verdicts
-- (PrerequisitesEvaluated on policy.events.v1): the highest revision per (vault, VM). Enabling
-- a VM answers from it instead of asking the policy service.
CREATE TABLE rm_prerequisites (
    vault_id   uuid NOT NULL,
    vm_id      text NOT NULL,
    ok         boolean NOT NULL,
    checks     jsonb NOT NULL,
    revision   integer NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (vault_id, vm_id)
);
