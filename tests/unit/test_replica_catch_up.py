"""A catch-up's resync runs against a merge of the replica's leaves and the latest point's:
every block where they differ is sent, so both turn into the source's disks."""

from __future__ import annotations

import random

from services.replication.catch_up import UNMATCHABLE, merged_hashes
from shared.merkle import HASH_SIZE, block_hash


def test_blocks_where_the_replica_and_the_latest_point_differ_are_never_matched() -> None:
    rng = random.Random(3)
    latest_blocks = [rng.randbytes(64) for _ in range(10)]
    replica_blocks = list(latest_blocks[:8])  # the disk grew by 2 blocks since
    replica_blocks[2] = rng.randbytes(64)  # changed at a point the replica missed
    latest = [block_hash(b) for b in latest_blocks]
    merged = merged_hashes(latest, b"".join(block_hash(b) for b in replica_blocks))
    assert len(merged) == 10 and all(len(h) == HASH_SIZE for h in merged)
    assert [i for i, h in enumerate(merged) if h == UNMATCHABLE] == [2, 8, 9]
    assert [merged[i] for i in (0, 1, 3, 7)] == [latest[i] for i in (0, 1, 3, 7)]
    # the source sends block i when its hash is not merged[i]: whatever it now holds, the
    # blocks sent turn both the latest point and the replica into the source
    source = list(latest_blocks)
    source[5] = rng.randbytes(64)
    sent = {i for i, b in enumerate(source) if block_hash(b) != merged[i]}
    assert sent == {2, 5, 8, 9}
    for start in (latest_blocks, replica_blocks + [b""] * 2):
        after = [source[i] if i in sent else start[i] for i in range(10)]
        assert after == source
    assert UNMATCHABLE not in {block_hash(b) for b in source}
