-- The replication service's verification state moves from its replica store to PostgreSQL:
-- for an item whose replica is kept by its recovery host, the service holds no block bytes,
-- only the leaf hashes (SHA-256 of each block) of every disk at the item's latest committed
-- point, in chunks of 1024 leaves with each chunk's Merkle root (services/replication/leaves.py).
-- Any instance can then verify the next cycle's roots and answer a resync with the hashes.
CREATE TABLE verified_disks (
    item_id    uuid NOT NULL,
    disk_id    text NOT NULL,
    cycle_seq  integer NOT NULL,     -- the committed point these leaves describe
    size_bytes bigint NOT NULL,
    block_size integer NOT NULL,
    PRIMARY KEY (item_id, disk_id)
);

CREATE TABLE verified_leaves (
    item_id uuid NOT NULL,
    disk_id text NOT NULL,
    chunk   integer NOT NULL,
    leaves  bytea NOT NULL,          -- 32 bytes per block, in block order
    root    bytea NOT NULL,          -- the chunk's subtree root (padded with zero nodes)
    PRIMARY KEY (item_id, disk_id, chunk)
);
-- hashes do not compress: store them out of line without trying
ALTER TABLE verified_leaves ALTER COLUMN leaves SET STORAGE EXTERNAL;

-- Where a cycle's records begin on the delta topic: a cycle whose batches this instance did
-- not all forward to the recovery host's feed (it took the partition over mid-cycle) is read
-- again from there, not from a local store. NULL: not from Kafka (an imported cycle file).
ALTER TABLE open_cycles
    ADD COLUMN delta_partition integer,
    ADD COLUMN first_offset bigint;

-- A reverse-replicated item's replica is seeded by its recovery host from the old primary's
-- own disks (services/replication/seeding.py): the host reports every leaf hash in chunks
-- before it answers; they are kept here until the answer, then become the item's verified
-- leaves of point 1.
CREATE TABLE seed_leaves (
    request_id  uuid NOT NULL,
    disk_id     text NOT NULL,
    chunk_no    integer NOT NULL,
    item_id     uuid NOT NULL,
    chunks      integer NOT NULL,
    first_index bigint NOT NULL,
    size_bytes  bigint NOT NULL,
    block_size  integer NOT NULL,
    leaves      bytea NOT NULL,
    PRIMARY KEY (request_id, disk_id, chunk_no)
);
ALTER TABLE seed_leaves ALTER COLUMN leaves SET STORAGE EXTERNAL;
