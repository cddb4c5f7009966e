-- The recovery hosts' replica feeds (services/replication/feed.py) replace the recovery hosts'
-- reads of replication.deltas.v1: a cycle no longer notes where its records began there.
ALTER TABLE open_cycles
    DROP COLUMN delta_partition,
    DROP COLUMN first_offset;
