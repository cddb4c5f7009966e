"""The verification state of an item whose replica its recovery host keeps: the leaf hashes
(SHA-256 of each block) of every disk at the item's latest committed point, in PostgreSQL
(`verified_disks`, `verified_leaves`), not in a local store. Any replication instance checks
the next cycle's Merkle roots against them and answers a resync with them; the service holds
no block bytes for the item beyond the batches in flight.

A disk's leaves are kept in chunks of `CHUNK_LEAVES` (1024: 32 KiB, 64 MiB of disk at 64 KiB
blocks), each with the root of its subtree. `CHUNK_LEAVES` is a power of two, so a chunk is an
aligned subtree of the disk's tree (shared/merkle.py: leaves padded with zero nodes to a power
of two, every parent hashed), and the disk's root is the tree over the chunk roots. Committing a
cycle reads and rewrites only the chunks its blocks fall in, plus 32 bytes per other chunk.
A chunk with no row holds only zero blocks (a new or sparse disk costs no rows).

The leaves are written in the transaction that records the point, inside a savepoint: a cycle
whose roots do not match leaves them as they were."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field

import asyncpg

from shared.merkle import HASH_SIZE, MerkleTree, block_count, block_length, zero_block_hash

CHUNK_LEAVES = 1024


class LeavesMismatch(Exception):
    """A cycle's blocks do not turn the verified leaves into the source's roots."""

    def __init__(self, disk_id: str, expected: str, actual: str) -> None:
        super().__init__(
            f"disk {disk_id}: Merkle root of the verified blocks would be {actual}, "
            f"the source's is {expected}"
        )


@dataclass(frozen=True)
class DiskTarget:
    """A disk of the point being committed: its geometry and the source's root."""

    disk_id: str
    size_bytes: int
    block_size: int
    merkle_root: str


# a disk's (size, leaves) at the previous point from elsewhere, asked for a disk with none here
Imported = Callable[[DiskTarget], Awaitable[tuple[int, bytes] | None]]


@dataclass
class _Disk:
    size_bytes: int
    block_size: int
    roots: dict[int, bytes]  # chunk -> subtree root, for the chunks with a row
    chunks: dict[int, bytearray] = field(default_factory=dict)  # loaded (and changed) chunks
    changed: set[int] = field(default_factory=set)
    rewrite: bool = False  # every chunk rewritten (a resize)

    @property
    def count(self) -> int:
        return block_count(self.size_bytes, self.block_size)

    @property
    def chunk_count(self) -> int:
        return (self.count + CHUNK_LEAVES - 1) // CHUNK_LEAVES


def zero_leaves(chunk: int, size_bytes: int, block_size: int) -> bytearray:
    """The leaves of chunk `chunk` of a disk of zero blocks."""
    first = chunk * CHUNK_LEAVES
    last = min(first + CHUNK_LEAVES, block_count(size_bytes, block_size))
    full = zero_block_hash(block_size)
    out = bytearray()
    for index in range(first, last):
        length = block_length(index, size_bytes, block_size)
        out += full if length == block_size else zero_block_hash(length)
    return out


def _split(leaves: bytes | bytearray, n: int) -> Iterator[bytes]:
    """The first `n` 32-byte leaves of concatenated `leaves`."""
    return (bytes(leaves[i * HASH_SIZE : (i + 1) * HASH_SIZE]) for i in range(n))


def chunk_root(leaves: bytes | bytearray) -> bytes:
    """The root of a chunk's subtree: its leaves, padded with zero nodes to `CHUNK_LEAVES`."""
    return MerkleTree.from_leaves(_split(leaves, len(leaves) // HASH_SIZE), CHUNK_LEAVES).root()


@functools.cache
def _empty_root() -> bytes:
    """The root of a chunk of padding only (past a disk's last block)."""
    return MerkleTree.from_leaves([], CHUNK_LEAVES).root()


@functools.cache
def _zero_chunk_root(block_size: int) -> bytes:
    """The root of a full chunk of zero blocks (any chunk but the last has every block full)."""
    return chunk_root(zero_block_hash(block_size) * CHUNK_LEAVES)


def _implicit_root(disk: _Disk, chunk: int) -> bytes:
    """The root of a chunk with no row: zero blocks (or padding only, past the disk's end)."""
    if chunk >= disk.chunk_count:
        return _empty_root()
    end = (chunk + 1) * CHUNK_LEAVES
    if end < disk.count or (end == disk.count and disk.size_bytes % disk.block_size == 0):
        return _zero_chunk_root(disk.block_size)
    return _zero_last_chunk_root(disk.size_bytes, disk.block_size)


@functools.cache
def _zero_last_chunk_root(size_bytes: int, block_size: int) -> bytes:
    """The root of a disk's last chunk of zero blocks, when it is partial or its last block
    short (computed once per disk geometry, not at every cycle)."""
    last = (block_count(size_bytes, block_size) - 1) // CHUNK_LEAVES
    return chunk_root(zero_leaves(last, size_bytes, block_size))


def disk_root(disk: _Disk) -> bytes:
    """The disk's Merkle root from its chunk roots (or its leaves, for a disk of one chunk or
    less: its tree is then smaller than a chunk's)."""
    n = disk.count
    if n <= CHUNK_LEAVES:
        leaves = disk.chunks.get(0) or zero_leaves(0, disk.size_bytes, disk.block_size)
        return MerkleTree.from_leaves(_split(leaves, n), n).root()
    capacity = 1 << (n - 1).bit_length()  # the tree's leaves, padded to a power of two
    level = [
        disk.roots[c] if c in disk.roots else _implicit_root(disk, c)
        for c in range(capacity // CHUNK_LEAVES)
    ]
    while len(level) > 1:
        level = [hashlib.sha256(level[i] + level[i + 1]).digest() for i in range(0, len(level), 2)]
    return level[0]


async def _load_disk(
    conn: asyncpg.Connection, item_id: uuid.UUID, disk_id: str, seq: int | None
) -> _Disk | None:
    """The disk's verified state if it describes point `seq` (None: unknown or stale)."""
    meta = await conn.fetchrow(
        "SELECT cycle_seq, size_bytes, block_size FROM verified_disks"
        " WHERE item_id = $1 AND disk_id = $2",
        item_id,
        disk_id,
    )
    if meta is None or seq is None or meta["cycle_seq"] != seq:
        return None
    rows = await conn.fetch(
        "SELECT chunk, root FROM verified_leaves WHERE item_id = $1 AND disk_id = $2",
        item_id,
        disk_id,
    )
    return _Disk(meta["size_bytes"], meta["block_size"], {r["chunk"]: r["root"] for r in rows})


async def _load_chunks(
    conn: asyncpg.Connection, item_id: uuid.UUID, disk_id: str, disk: _Disk, chunks: set[int]
) -> None:
    """`chunks`' leaves into `disk.chunks` (a chunk with no row: zero blocks). A rewritten
    disk's rows are stale: its chunks not in hand are zero blocks."""
    todo = sorted(c for c in chunks if c not in disk.chunks)
    found: dict[int, bytearray] = {}
    if todo and not disk.rewrite:
        rows = await conn.fetch(
            "SELECT chunk, leaves FROM verified_leaves"
            " WHERE item_id = $1 AND disk_id = $2 AND chunk = ANY($3::int[])",
            item_id,
            disk_id,
            todo,
        )
        found = {r["chunk"]: bytearray(r["leaves"]) for r in rows}
    for c in todo:
        disk.chunks[c] = found.get(c) or zero_leaves(c, disk.size_bytes, disk.block_size)


async def _all_leaves(
    conn: asyncpg.Connection, item_id: uuid.UUID, disk_id: str, disk: _Disk
) -> bytearray:
    await _load_chunks(conn, item_id, disk_id, disk, set(range(disk.chunk_count)))
    out = bytearray()
    for c in range(disk.chunk_count):
        out += disk.chunks[c]
    return out


def _from_leaves(size_bytes: int, block_size: int, leaves: bytes | bytearray) -> _Disk:
    """A disk whose rows are all rewritten from `leaves` (a resize, or hashes imported); its
    chunks of zero blocks get no row."""
    disk = _Disk(size_bytes, block_size, {}, rewrite=True)
    step = CHUNK_LEAVES * HASH_SIZE
    for c in range(disk.chunk_count):
        chunk = bytearray(leaves[c * step : (c + 1) * step])
        if chunk != zero_leaves(c, size_bytes, block_size):
            disk.chunks[c] = chunk
            disk.changed.add(c)
    return disk


def _resized(
    disk: _Disk, leaves: bytearray, target: DiskTarget, changed: Mapping[int, str]
) -> _Disk:
    """The disk at its new size: leaves cut, or extended with zero blocks. The last block the
    two sizes share changes length: a zero block stays one; any other must be in the cycle
    (its new bytes are not here to hash), else the roots will not match and the item resyncs."""
    old_count, bs = disk.count, disk.block_size
    new_count = block_count(target.size_bytes, bs)
    boundary = min(old_count, new_count) - 1
    if new_count < old_count:
        del leaves[new_count * HASH_SIZE :]
    else:
        for index in range(old_count, new_count):
            leaves += zero_block_hash(block_length(index, target.size_bytes, bs))
    if boundary >= 0 and boundary not in changed:
        old_len = block_length(boundary, disk.size_bytes, bs)
        new_len = block_length(boundary, target.size_bytes, bs)
        at = slice(boundary * HASH_SIZE, (boundary + 1) * HASH_SIZE)
        if old_len != new_len and bytes(leaves[at]) == zero_block_hash(old_len):
            leaves[at] = zero_block_hash(new_len)
    return _from_leaves(target.size_bytes, bs, leaves)


def _apply(disk: _Disk, changed: Mapping[int, str]) -> None:
    for index, sha in changed.items():
        c, at = divmod(index, CHUNK_LEAVES)
        disk.chunks[c][at * HASH_SIZE : (at + 1) * HASH_SIZE] = bytes.fromhex(sha)
        disk.changed.add(c)
    for c in disk.changed:
        disk.roots[c] = chunk_root(disk.chunks[c])


async def advance(
    conn: asyncpg.Connection,
    item_id: uuid.UUID,
    prev_seq: int | None,
    seq: int,
    targets: list[DiskTarget],
    changed: Mapping[str, Mapping[int, str]],
    imported: Imported | None = None,
) -> None:
    """Verify point `seq`: the leaves of point `prev_seq` (None: no point, every disk starts
    as zero blocks), with the cycle's `changed` blocks (disk -> index -> sha256 hex), must give
    every target's root. Then they become the leaves of `seq`. LeavesMismatch if a root differs
    (nothing written). `imported`: asked for a disk's (size, leaves) at `prev_seq` where this
    table has none (an item whose replica store held them; None: not there either)."""
    disks: dict[str, _Disk] = {}
    for target in targets:
        delta = changed.get(target.disk_id, {})
        disk = await _load_disk(conn, item_id, target.disk_id, prev_seq)
        found = await imported(target) if disk is None and imported is not None else None
        if found is not None:
            size, hashes = found
            disk = _from_leaves(size, target.block_size, hashes)
        if disk is None or disk.block_size != target.block_size:
            disk = _Disk(target.size_bytes, target.block_size, {}, rewrite=True)  # zero blocks
        elif disk.size_bytes != target.size_bytes:
            leaves = await _all_leaves(conn, item_id, target.disk_id, disk)
            disk = _resized(disk, leaves, target, delta)
        wanted = {i // CHUNK_LEAVES for i in delta}
        if disk.count <= CHUNK_LEAVES:
            wanted.add(0)  # a disk of one chunk or less: its root is computed from its leaves
        await _load_chunks(conn, item_id, target.disk_id, disk, wanted)
        await asyncio.to_thread(_apply, disk, delta)
        actual = (await asyncio.to_thread(disk_root, disk)).hex()
        if actual != target.merkle_root:
            raise LeavesMismatch(target.disk_id, target.merkle_root, actual)
        disks[target.disk_id] = disk
    async with conn.transaction():  # a savepoint in the caller's transaction
        await conn.execute(
            "DELETE FROM verified_disks WHERE item_id = $1 AND NOT disk_id = ANY($2::text[])",
            item_id,
            list(disks),
        )
        await conn.execute(
            "DELETE FROM verified_leaves WHERE item_id = $1 AND NOT disk_id = ANY($2::text[])",
            item_id,
            list(disks),
        )
        for disk_id, disk in disks.items():
            await _save(conn, item_id, disk_id, seq, disk)


async def _save(
    conn: asyncpg.Connection, item_id: uuid.UUID, disk_id: str, seq: int, disk: _Disk
) -> None:
    if disk.rewrite:
        await conn.execute(
            "DELETE FROM verified_leaves WHERE item_id = $1 AND disk_id = $2", item_id, disk_id
        )
    rows = [
        (c, bytes(disk.chunks[c]), disk.roots[c])
        for c in sorted(disk.changed)
        if c < disk.chunk_count
    ]
    if rows:
        await conn.executemany(
            "INSERT INTO verified_leaves (item_id, disk_id, chunk, leaves, root)"
            " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (item_id, disk_id, chunk)"
            " DO UPDATE SET leaves = excluded.leaves, root = excluded.root",
            [(item_id, disk_id, c, leaves, root) for c, leaves, root in rows],
        )
    await conn.execute(
        "INSERT INTO verified_disks (item_id, disk_id, cycle_seq, size_bytes, block_size)"
        " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (item_id, disk_id) DO UPDATE SET"
        " cycle_seq = excluded.cycle_seq, size_bytes = excluded.size_bytes,"
        " block_size = excluded.block_size",
        item_id,
        disk_id,
        seq,
        disk.size_bytes,
        disk.block_size,
    )


async def leaf_hashes(
    conn: asyncpg.Connection, item_id: uuid.UUID, disk_id: str, seq: int
) -> list[bytes] | None:
    """Every leaf of the disk at point `seq`, in block order; None if not known here."""
    disk = await _load_disk(conn, item_id, disk_id, seq)
    if disk is None:
        return None
    return list(_split(await _all_leaves(conn, item_id, disk_id, disk), disk.count))


async def known(conn: asyncpg.Connection, item_id: uuid.UUID) -> bool:
    """Whether the item has verified leaves here."""
    found: bool = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM verified_disks WHERE item_id = $1)", item_id
    )
    return found


async def forget(conn: asyncpg.Connection, item_id: uuid.UUID) -> None:
    """The item's leaves dropped (its replica is gone, or it no longer has the point)."""
    for table in ("verified_disks", "verified_leaves"):
        await conn.execute(f"DELETE FROM {table} WHERE item_id = $1", item_id)
