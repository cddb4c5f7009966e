-- The recovery points each item retains, as the replication service reports them: a point
-- enters with RecoveryPointCreated and leaves with RecoveryPointsPruned, so a failover asking
-- for a point is checked against what is retained, not only against the latest.
-- Points created before this table existed are not listed: an item without rows here is
-- checked against its latest point only.

CREATE TABLE rm_points (
    item_id        uuid NOT NULL,
    vault_id       uuid NOT NULL,
    cycle_seq      bigint NOT NULL,
    app_consistent boolean NOT NULL,
    source_time    timestamptz NOT NULL,
    PRIMARY KEY (item_id, cycle_seq)
);
