"""Assembling the leaf hashes a recovery host reports when it seeds a replica
(services/replication/seeding.py): chunks in order make a disk's leaves; a missing, repeated
or misplaced chunk, or a count that is not the disk's blocks, is named; zero blocks are not
counted as seeded blocks."""

from __future__ import annotations

import hashlib
from typing import Any

from services.replication.reported_leaves import assembled
from services.replication.seeding import _non_zero
from shared.merkle import zero_block_hash

BS = 4096


def leaf(i: int) -> bytes:
    return hashlib.sha256(i.to_bytes(4, "big")).digest()


def chunk(disk: str, no: int, of: int, first: int, n: int, size: int) -> dict[str, Any]:
    return {
        "disk_id": disk,
        "chunk_no": no,
        "chunks": of,
        "first_index": first,
        "size_bytes": size,
        "block_size": BS,
        "leaves": b"".join(leaf(i) for i in range(first, first + n)),
    }


def test_chunks_in_any_order_make_each_disks_leaves() -> None:
    size = 10 * BS
    rows = [chunk("d0", 1, 2, 6, 4, size), chunk("d0", 0, 2, 0, 6, size)]
    rows.append(chunk("d1", 0, 1, 0, 1, 100))
    disks, why = assembled(rows, ["d0", "d1"])
    assert why is None
    assert disks["d0"] == (size, BS, b"".join(leaf(i) for i in range(10)))
    assert disks["d1"] == (100, BS, leaf(0))


def test_what_is_missing_is_named() -> None:
    size = 10 * BS
    whole = [chunk("d0", 0, 2, 0, 6, size), chunk("d0", 1, 2, 6, 4, size)]
    assert "disk d0: not every chunk" in str(assembled(whole[:1], ["d0"])[1])
    assert "disk d1: not every chunk" in str(assembled(whole, ["d0", "d1"])[1])
    gap = [chunk("d0", 0, 2, 0, 6, size), chunk("d0", 1, 2, 7, 3, size)]
    assert "do not follow on" in str(assembled(gap, ["d0"])[1])
    short = [chunk("d0", 0, 2, 0, 6, size), chunk("d0", 1, 2, 6, 3, size)]
    assert "9 leaf hashes for 10 blocks" in str(assembled(short, ["d0"])[1])


def test_zero_blocks_are_not_seeded_blocks() -> None:
    size = 3 * BS + 10  # a short last block
    hashes = zero_block_hash(BS) + leaf(1) + zero_block_hash(BS) + zero_block_hash(10)
    assert _non_zero(size, BS, hashes) == 1
    assert _non_zero(size, BS, hashes[:-32] + leaf(3)) == 2
