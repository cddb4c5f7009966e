-- The recovery-site replica (docs/replica-store.md): the recovery host agent that keeps each
-- item's replica (chosen when protection is enabled: an agent of the target site; NULL when
-- none was registered), the latest point it reported holding with the source's roots, and the
-- last problem it reported; where each open cycle's records begin on replication.deltas.v1
-- (the recovery host reads exactly that range; NULL for cycles imported from files); and the
-- roots the recovery host reported for each point.
ALTER TABLE protected_items
    ADD COLUMN recovery_agent_id uuid,
    ADD COLUMN replica_seq integer,
    ADD COLUMN replica_error text;
ALTER TABLE open_cycles
    ADD COLUMN delta_partition integer,
    ADD COLUMN first_offset bigint;
ALTER TABLE recovery_points ADD COLUMN replica_roots jsonb;
