-- The recovery hosts' replica feeds (services/replication/feed.py): where each open cycle's
-- verified batches were forwarded on its recovery host's feed (one partition; first and last
-- offset; NULL until a batch is forwarded). They replace the cycle's place on
-- replication.deltas.v1, which recovery hosts no longer read.
ALTER TABLE open_cycles
    DROP COLUMN delta_partition,
    DROP COLUMN first_offset,
    ADD COLUMN feed_partition integer,
    ADD COLUMN feed_first bigint,
    ADD COLUMN feed_last bigint;
