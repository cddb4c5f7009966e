-- The last enable-replication prerequisite verdict published for each VM
-- (PrerequisitesEvaluated): a re-evaluation emits an event only when the checks differ from
-- this row, and `revision` grows with every one published.
CREATE TABLE prerequisite_verdicts (
    vault_id   uuid NOT NULL,
    vm_id      text NOT NULL,
    ok         boolean NOT NULL,
    checks     jsonb NOT NULL,
    revision   integer NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (vault_id, vm_id)
);
