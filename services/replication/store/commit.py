"""What committing a point computes before its manifest is written: each disk's tree and
delta after the manifest, the boundary block of a resized disk, every referenced block
present and every root equal to the source's (docs/replica-store.md)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping

from services.replication.store.errors import MissingBlock, PointConflict, RootMismatch
from services.replication.store.manifest import DiskPoint, PointManifest
from services.replication.store.maps import DiskMap, DiskState, Latest
from services.replication.store.packs import Packs
from shared.merkle import block_count, block_length, zero_block_hash

StoreBlocks = Callable[[Mapping[str, bytes]], int]  # stores blocks (sha256 hex -> bytes)


def next_disks(
    packs: Packs, latest: Latest, manifest: PointManifest, store: StoreBlocks
) -> tuple[dict[str, DiskState], dict[str, list[tuple[int, str]]]]:
    """The trees after `manifest` (the cached ones updated in place where the size is
    unchanged: O(k log n)) and each disk's delta; raises unless every root matches."""
    disks: dict[str, DiskState] = {}
    deltas: dict[str, list[tuple[int, str]]] = {}
    for disk in manifest.disks:
        prev = latest.disks.get(disk.disk_id)
        if prev is not None and prev.block_size != disk.block_size:
            raise PointConflict(
                f"disk {disk.disk_id}: block size changed from {prev.block_size} to "
                f"{disk.block_size}; resync it as a new disk"
            )
        delta = dict(disk.changed)
        boundary = _boundary_block(packs, prev, disk, store)
        if boundary is not None and boundary[0] not in delta:
            delta[boundary[0]] = boundary[1]
        for index, sha in delta.items():
            length = block_length(index, disk.size_bytes, disk.block_size)
            if sha != zero_block_hash(length).hex() and not packs.has(sha):
                raise MissingBlock(disk.disk_id, index, sha)
        if prev is not None and prev.size_bytes == disk.size_bytes:
            tree = prev.tree
        else:
            m = (
                DiskMap.of_tree(prev.tree, prev.size_bytes, prev.block_size)
                if prev is not None
                else DiskMap(0, disk.block_size, bytearray())
            )
            m.resize(disk.size_bytes)
            tree = m.tree()
        for index, sha in delta.items():
            tree.set_leaf(index, bytes.fromhex(sha))
        if tree.root_hex() != disk.merkle_root:
            raise RootMismatch(disk.disk_id, disk.merkle_root, tree.root_hex())
        disks[disk.disk_id] = DiskState(disk.size_bytes, disk.block_size, tree)
        deltas[disk.disk_id] = sorted(delta.items())
    return disks, deltas


def _boundary_block(
    packs: Packs, prev: DiskState | None, disk: DiskPoint, store: StoreBlocks
) -> tuple[int, str] | None:
    """On a resize, the last block both sizes share may change length: its new content is
    the old one cut or zero-padded (the disk was truncated or extended with zeros)."""
    if prev is None or prev.size_bytes == disk.size_bytes:
        return None
    bs = disk.block_size
    index = min(block_count(prev.size_bytes, bs), block_count(disk.size_bytes, bs)) - 1
    if index < 0 or index in disk.changed:
        return None
    old_len = block_length(index, prev.size_bytes, bs)
    new_len = block_length(index, disk.size_bytes, bs)
    if old_len == new_len:
        return None
    leaf = prev.tree.leaf(index)
    if leaf == zero_block_hash(old_len):
        return index, zero_block_hash(new_len).hex()
    data = packs.read(leaf.hex())
    if data is None:
        raise MissingBlock(disk.disk_id, index, leaf.hex())
    data = data[:new_len] if new_len < old_len else data + bytes(new_len - old_len)
    sha = hashlib.sha256(data).hexdigest()
    if sha != zero_block_hash(new_len).hex():
        store({sha: data})
    return index, sha
