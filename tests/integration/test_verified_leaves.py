"""The replication service's verification state in PostgreSQL (services/replication/leaves.py)
against the real database: point after point, the roots it computes from chunked leaves equal
the Merkle roots of the whole disk (shared/merkle.py), across disks of one chunk or less and of
many, a short last block, zero blocks with no rows, resizes both ways; a wrong root writes
nothing; the leaves served to a resync are the disk's."""

from __future__ import annotations

import hashlib
import random
import uuid

import asyncpg
import pytest

from kit.stack import migrated_pool
from services.replication import leaves
from services.replication.__main__ import MIGRATIONS
from shared.merkle import MerkleTree, block_count, block_length, zero_block_hash

pytestmark = pytest.mark.integration

BS = 4096  # small blocks: many chunks from little data


class Disk:
    """A reference disk: its leaves in a list, its root from a whole MerkleTree."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.hashes = [zero_block_hash(block_length(i, size, BS)) for i in range(self.count)]

    @property
    def count(self) -> int:
        return block_count(self.size, BS)

    def write(self, rng: random.Random, n: int) -> dict[int, str]:
        changed = {}
        for _ in range(n):
            i = rng.randrange(self.count)
            data = rng.randbytes(block_length(i, self.size, BS))
            self.hashes[i] = hashlib.sha256(data).digest()
            changed[i] = self.hashes[i].hex()
        return changed

    def resize(self, size: int) -> dict[int, str]:
        """Zero-extend or cut; the shared boundary block's new hash is shipped (as an agent
        would when its content is not zeros)."""
        old = self.count
        self.size = size
        new = self.count
        del self.hashes[new:]
        self.hashes += [zero_block_hash(block_length(i, size, BS)) for i in range(old, new)]
        b = min(old, new) - 1
        self.hashes[b] = hashlib.sha256(b"boundary" + size.to_bytes(8, "big")).digest()
        return {b: self.hashes[b].hex()}

    def root(self) -> str:
        return MerkleTree.from_leaves(self.hashes, self.count).root_hex()

    def target(self, disk_id: str) -> leaves.DiskTarget:
        return leaves.DiskTarget(disk_id, self.size, BS, self.root())


async def _advance(
    conn: asyncpg.Connection,
    item_id: uuid.UUID,
    prev: int | None,
    seq: int,
    disks: dict[str, Disk],
    changed: dict[str, dict[int, str]],
) -> None:
    async with conn.transaction():
        targets = [d.target(k) for k, d in disks.items()]
        await leaves.advance(conn, item_id, prev, seq, targets, changed)


@pytest.mark.parametrize(
    "size",
    [
        3 * BS + 100,  # one chunk, short last block
        leaves.CHUNK_LEAVES * BS,  # exactly one chunk
        5 * leaves.CHUNK_LEAVES * BS + 777,  # many chunks, a padded top level, short tail
    ],
)
async def test_point_after_point_the_roots_are_the_whole_disks(
    database_url: str, size: int
) -> None:
    rng = random.Random(size)
    async with migrated_pool(database_url, "leaves", MIGRATIONS) as pool, pool.acquire() as conn:
        item_id = uuid.uuid4()
        disks = {"d0": Disk(size), "d1": Disk(BS * 2)}
        # the initial point: a few blocks written, the rest zero blocks (no rows for them)
        changed = {k: d.write(rng, 5) for k, d in disks.items()}
        await _advance(conn, item_id, None, 1, disks, changed)
        rows = await conn.fetchval(
            "SELECT count(*) FROM verified_leaves WHERE item_id = $1", item_id
        )
        assert rows <= 5 + 1
        for seq in range(2, 6):
            changed = {"d0": disks["d0"].write(rng, rng.randrange(1, 40))}
            await _advance(conn, item_id, seq - 1, seq, disks, changed)
        got = await leaves.leaf_hashes(conn, item_id, "d0", 5)
        assert got == disks["d0"].hashes
        # the leaves describe point 5 only: asked for another point, they are not known
        assert await leaves.leaf_hashes(conn, item_id, "d0", 4) is None


async def test_resizes_and_a_dropped_disk(database_url: str) -> None:
    rng = random.Random(7)
    async with migrated_pool(database_url, "leaves", MIGRATIONS) as pool, pool.acquire() as conn:
        item_id = uuid.uuid4()
        disk = Disk(3 * leaves.CHUNK_LEAVES * BS + 10)
        disks = {"d0": disk, "d1": Disk(BS)}
        await _advance(conn, item_id, None, 1, disks, {"d0": disk.write(rng, 50)})
        grown = disk.resize(7 * leaves.CHUNK_LEAVES * BS + 4000)
        await _advance(conn, item_id, 1, 2, disks, {"d0": {**grown, **disk.write(rng, 5)}})
        cut = disk.resize(leaves.CHUNK_LEAVES * BS // 2 + 9)
        del disks["d1"]
        await _advance(conn, item_id, 2, 3, disks, {"d0": cut})
        assert await leaves.leaf_hashes(conn, item_id, "d0", 3) == disk.hashes
        assert await leaves.leaf_hashes(conn, item_id, "d1", 3) is None
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM verified_leaves WHERE item_id = $1 AND disk_id = 'd1'",
                item_id,
            )
            == 0
        )


async def test_a_wrong_root_writes_nothing(database_url: str) -> None:
    rng = random.Random(3)
    async with migrated_pool(database_url, "leaves", MIGRATIONS) as pool, pool.acquire() as conn:
        item_id = uuid.uuid4()
        disk = Disk(4 * leaves.CHUNK_LEAVES * BS)
        await _advance(conn, item_id, None, 1, {"d0": disk}, {"d0": disk.write(rng, 20)})
        before = disk.hashes[:]
        changed = disk.write(rng, 3)
        lost = next(iter(changed))
        del changed[lost]  # a block the cycle did not carry
        with pytest.raises(leaves.LeavesMismatch, match="disk d0"):
            await _advance(conn, item_id, 1, 2, {"d0": disk}, {"d0": changed})
        assert await leaves.leaf_hashes(conn, item_id, "d0", 1) == before
        assert await leaves.leaf_hashes(conn, item_id, "d0", 2) is None


async def test_imported_leaves_seed_the_table(database_url: str) -> None:
    """An item whose earlier points were verified by a replica store: its latest leaves are
    imported at the next commit."""
    rng = random.Random(5)
    async with migrated_pool(database_url, "leaves", MIGRATIONS) as pool, pool.acquire() as conn:
        item_id = uuid.uuid4()
        disk = Disk(2 * leaves.CHUNK_LEAVES * BS + 1)
        disk.write(rng, 30)
        before = (disk.size, b"".join(disk.hashes))
        asked: list[str] = []

        async def imported(target: leaves.DiskTarget) -> tuple[int, bytes] | None:
            asked.append(target.disk_id)
            return before

        changed = {"d0": disk.write(rng, 4)}
        async with conn.transaction():
            await leaves.advance(conn, item_id, 8, 9, [disk.target("d0")], changed, imported)
        assert asked == ["d0"]
        assert await leaves.leaf_hashes(conn, item_id, "d0", 9) == disk.hashes
        # known here now: the next cycle asks for nothing
        changed = {"d0": disk.write(rng, 2)}
        async with conn.transaction():
            await leaves.advance(conn, item_id, 9, 10, [disk.target("d0")], changed, imported)
        assert asked == ["d0"]
