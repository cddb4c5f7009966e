"""Whole disk images and a point's blocks: the manifest of images seeded into the store, a
point's image written out (materialise), and every block of a point re-read and re-hashed
(verify). `ReplicaStore` calls these with the item's maps at the point and its packs."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from services.replication.store.errors import CorruptBlock, MissingBlock, StoreError
from services.replication.store.manifest import (
    BlockRef,
    DiskPoint,
    DiskVerification,
    StoredPoint,
)
from services.replication.store.maps import DiskMap
from services.replication.store.packs import Packs
from shared.files import replace_synced
from shared.merkle import (
    ZERO_NODE,
    MerkleTree,
    block_count,
    block_length,
    read_blocks,
    zero_block_hash,
)

Block = tuple[int | None, str, bytes]  # (index, sha256 hex, bytes), as `put_blocks` takes them


def seed_disks(
    images: Mapping[str, Path],
    block_size: int,
    batch_blocks: int,
    put_blocks: Callable[[list[Block]], object],
) -> list[DiskPoint]:
    """Each image's disk: every block hashed, the non-zero ones handed to `put_blocks` in
    batches of `batch_blocks`, the root computed."""
    disks = []
    for disk_id, path in sorted(images.items()):
        size = Path(path).stat().st_size
        if size <= 0:
            raise StoreError(f"disk {disk_id}: seed image {path} is empty")
        tree = MerkleTree(block_count(size, block_size))
        changed: dict[int, str] = {}
        batch: list[Block] = []
        with open(path, "rb") as fh:
            for index, data in read_blocks(fh, size, block_size):
                digest = hashlib.sha256(data).digest()
                tree.set_leaf(index, digest, rehash=False)
                if digest == zero_block_hash(len(data)):
                    continue
                changed[index] = digest.hex()
                batch.append((index, digest.hex(), data))
                if len(batch) >= batch_blocks:
                    put_blocks(batch)
                    batch = []
        if batch:
            put_blocks(batch)
        tree.rebuild()
        disks.append(DiskPoint(disk_id, size, block_size, tree.root_hex(), changed))
    return disks


def write_image(packs: Packs, disk_id: str, m: DiskMap, out_path: Path, verify: bool) -> str:
    """Write the disk image of map `m` to `out_path` (exact size, zero blocks as holes,
    fsynced, renamed into place); returns the SHA-256 hex of the whole image."""
    zeros = memoryview(bytes(m.block_size))
    whole = hashlib.sha256()
    tmp = out_path.with_name(f"{out_path.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        with open(tmp, "wb", buffering=0) as out:
            for length, data in _image_blocks(packs, disk_id, m, verify):
                if data is None:
                    whole.update(zeros[:length])
                    out.seek(length, os.SEEK_CUR)
                else:
                    out.write(data)
                    whole.update(data)
            out.truncate(m.size_bytes)
            os.fsync(out.fileno())
        replace_synced(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return whole.hexdigest()


def _image_blocks(
    packs: Packs, disk_id: str, m: DiskMap, verify: bool
) -> Iterator[tuple[int, bytes | None]]:
    """(length, bytes or None for a zero block) of every block, in order. (Reading ahead
    in threads was measured: no faster on 2 cores, where the output's writeback is the
    limit.)"""
    for index in range(m.count):
        leaf = m.leaf(index)
        length = block_length(index, m.size_bytes, m.block_size)
        if m.is_zero(index, leaf):
            yield length, None
            continue
        sha = leaf.hex()
        data = packs.read(sha)
        if data is None:
            raise MissingBlock(disk_id, index, sha)
        if verify and (actual := hashlib.sha256(data).digest()) != leaf:
            raise CorruptBlock(disk_id, index, sha, actual.hex())
        yield length, data


def verify_disks(
    packs: Packs, stored: StoredPoint, maps: Mapping[str, DiskMap]
) -> tuple[DiskVerification, ...]:
    """Every block the point references re-read and re-hashed, and each disk's Merkle root
    recomputed from what is actually on disk."""
    results = []
    for disk in stored.manifest.disks:
        m = maps[disk.disk_id]
        tree = MerkleTree(m.count)
        seen: dict[bytes, bytes | None] = {}
        missing: list[BlockRef] = []
        corrupt: list[BlockRef] = []
        for index in range(m.count):
            leaf = m.leaf(index)
            actual: bytes | None = leaf
            if not m.is_zero(index, leaf):
                if leaf not in seen:
                    data = packs.read(leaf.hex())
                    seen[leaf] = None if data is None else hashlib.sha256(data).digest()
                actual = seen[leaf]
                if actual is None:
                    missing.append(BlockRef(index, leaf.hex()))
                elif actual != leaf:
                    corrupt.append(BlockRef(index, leaf.hex()))
            tree.set_leaf(index, actual or ZERO_NODE, rehash=False)
        results.append(
            DiskVerification(
                disk.disk_id,
                disk.merkle_root,
                tree.root_hex(),
                tuple(missing),
                tuple(corrupt),
            )
        )
    return tuple(results)
