-- A recovery host's replica that missed points (its host down past its replica feed's
-- retention) catches up: the host reports the leaf hashes of the point it holds
-- (ReplicaLeavesRequested, answered into seed_leaves under the request id), the source resyncs
-- the blocks that differ from them or from the latest point, and that resync's point is
-- applied over the replica's (ReplicaPointApplyRequested.follows).
ALTER TABLE protected_items
    ADD COLUMN replica_follows integer,      -- the point the replica is at, during a catch-up
    ADD COLUMN replica_catchup_id uuid;      -- the leaves asked of the host, until answered
