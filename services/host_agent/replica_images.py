"""A replica's images moved between points: before a point's blocks are written, the blocks
they overwrite go to the point's undo record (durable first); then the point's blocks and
leaves are written, the images resized to the point's sizes; an undo record's blocks put
them back to the point before. Each write is fdatasync'ed, each new file's folder fsync'ed
(the order and the crash points: replica.py)."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from services.host_agent.replica_format import (
    DiskState,
    ItemFiles,
    Point,
    ReplicaError,
    StagedAt,
    Undo,
    block_len,
    read_undo,
    undo_block,
    undo_header,
    write_all,
)
from services.host_agent.replica_trees import LeafTrees
from shared.files import fsync_dir
from shared.merkle import HASH_SIZE, block_count, block_hash, zero_block_hash

# (disk id, block index) -> (SHA-256, where the bytes are in the staged file, or the length of
# an all-zero block)
StagedBlocks = dict[tuple[str, int], tuple[bytes, StagedAt | int]]


def _touched(old: DiskState | None, new: DiskState, changed: Iterable[int]) -> list[int]:
    """Blocks of the old image an apply may change: the changed ones, and the boundary
    block and everything cut when the size changes."""
    touched = set(changed)
    old_size = old.size_bytes if old else 0
    if old is not None and old_size != new.size_bytes:
        bs = new.block_size
        first = min(old_size, new.size_bytes) // bs
        touched.update(range(first, block_count(old_size, bs)))
    if old is None:
        return []
    return sorted(i for i in touched if i < block_count(old_size, new.block_size))


def write_undo(f: ItemFiles, head: Point, point: Point, blocks: StagedBlocks) -> None:
    """Undo record `point.seq`: what HEAD's images hold where `point` will write."""
    f.undo.mkdir(parents=True, exist_ok=True)
    f.tmp.mkdir(parents=True, exist_ok=True)
    sizes = {}
    tmp = f.tmp / f"undo-{point.seq}.{uuid.uuid4().hex[:8]}"
    with tmp.open("wb") as out:
        for new in point.disks:
            old = head.disk(new.disk_id)
            sizes[new.disk_id] = old.size_bytes if old else 0
        out.write(undo_header(point.seq, head.seq, sizes))
        for new in point.disks:
            old = head.disk(new.disk_id)
            if old is None:
                continue
            if old.block_size != new.block_size:
                raise ReplicaError(f"disk {new.disk_id}: block size change not supported")
            changed = [i for (d, i) in blocks if d == new.disk_id]
            leaves = f.leaves(new.disk_id)
            with f.image(new.disk_id).open("rb") as img, leaves.open("rb") as lv:
                for index in _touched(old, new, changed):
                    length = block_len(index, old.size_bytes, old.block_size)
                    img.seek(index * old.block_size)
                    data = img.read(length)
                    data += bytes(length - len(data))
                    lv.seek(index * HASH_SIZE)
                    leaf = lv.read(HASH_SIZE)
                    out.write(undo_block(new.disk_id, index, leaf, data))
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, f.undo_of(point.seq))
    fsync_dir(f.undo)


def write_point(
    trees: LeafTrees,
    item: str,
    f: ItemFiles,
    head: Point,
    point: Point,
    blocks: StagedBlocks,
    staged: Path,
    *,
    trust_leaves: bool,
) -> dict[str, str]:
    """Resize and write every disk of `point` (from HEAD's sizes: a re-run after a kill
    does the same); returns the roots now held. An all-zero block is written only where
    the leaves say the image holds data (`trust_leaves`; a re-run after a kill writes
    every block, as the leaves may have reached the disk before the image did)."""
    f.disks.mkdir(parents=True, exist_ok=True)
    with staged.open("rb") if staged.exists() else contextlib.nullcontext() as source:
        for disk in point.disks:
            _write_disk(trees, item, f, head, disk, blocks, source, trust_leaves)
    fsync_dir(f.disks)
    return trees.roots(item, f, point.disks)


def _write_disk(
    trees: LeafTrees,
    item: str,
    f: ItemFiles,
    head: Point,
    disk: DiskState,
    blocks: StagedBlocks,
    source: BinaryIO | None,
    trust_leaves: bool,
) -> None:
    """One disk of `write_point`: its blocks read from the staged file one at a time."""
    writes = {i: v for (d, i), v in blocks.items() if d == disk.disk_id}
    n = block_count(disk.size_bytes, disk.block_size)
    bad = [i for i in writes if i >= n]
    if bad:
        raise ReplicaError(f"disk {disk.disk_id}: blocks {bad[:5]} beyond its end")
    img_fd = os.open(f.image(disk.disk_id), os.O_RDWR | os.O_CREAT, 0o644)
    lv_fd = os.open(f.leaves(disk.disk_id), os.O_RDWR | os.O_CREAT, 0o644)
    previous = head.disk(disk.disk_id)
    # the cached tree follows the leaves written (an 8 GiB disk's 131,072 leaves are
    # not re-read and re-hashed at each point); rebuilt when the size changes or on a
    # re-run after a kill
    same = previous is not None and previous.size_bytes == disk.size_bytes
    tree = trees.cached(item, disk.disk_id) if same and trust_leaves else None
    if tree is None:
        trees.take(item, disk.disk_id)
    try:
        _resize(img_fd, lv_fd, previous.size_bytes if previous else 0, disk)
        for index, (sha, where) in sorted(writes.items()):
            if isinstance(where, int):  # all zero: only over data that is not
                if trust_leaves and os.pread(lv_fd, HASH_SIZE, index * HASH_SIZE) == sha:
                    continue
                data = bytes(where)
            else:
                assert source is not None
                data = os.pread(source.fileno(), where.length, where.offset)
                if block_hash(data) != sha:
                    raise ReplicaError(f"disk {disk.disk_id}: staged block {index} changed")
            write_all(img_fd, data, index * disk.block_size)
            write_all(lv_fd, sha, index * HASH_SIZE)
            if tree is not None:
                tree.set_leaf(index, sha)
        os.fdatasync(img_fd)
        os.fdatasync(lv_fd)
    except BaseException:
        trees.take(item, disk.disk_id)
        raise
    finally:
        os.close(img_fd)
        os.close(lv_fd)


def _resize(img_fd: int, lv_fd: int, old_size: int, disk: DiskState) -> None:
    """Size the image and its leaves from `old_size` to the disk's: the boundary block's
    leaf is recomputed, blocks past the old end get zero-block leaves. Idempotent."""
    bs, size = disk.block_size, disk.size_bytes
    n = block_count(size, bs)
    os.ftruncate(img_fd, size)
    os.ftruncate(lv_fd, n * HASH_SIZE)
    first = min(old_size, size) // bs if old_size != size else n
    for index in range(first, n):
        length = block_len(index, size, bs)
        if index * bs < min(old_size, size):
            data = os.pread(img_fd, length, index * bs)
            leaf = block_hash(data + bytes(length - len(data)))
        else:
            leaf = zero_block_hash(length)
        write_all(lv_fd, leaf, index * HASH_SIZE)


def restore(trees: LeafTrees, item: str, f: ItemFiles, seq: int) -> None:
    """Put the images back to the point undo record `seq` returns to (idempotent)."""
    undo = read_undo(f.undo_of(seq))
    head = f.read_head()
    for disk_id, old_size in undo.sizes.items():
        # the cached tree follows the leaves restored (rebuilding a whole disk's tree at
        # each point undone made a rollback cost grow with the disk's size); dropped
        # while they are written, rebuilt from them when the size changes
        tree = trees.take(item, disk_id)
        now = head.disk(disk_id)
        if now is None or now.size_bytes != old_size:
            tree = None
        if old_size == 0:
            f.image(disk_id).unlink(missing_ok=True)
            f.leaves(disk_id).unlink(missing_ok=True)
            continue
        img_fd = os.open(f.image(disk_id), os.O_RDWR)
        lv_fd = os.open(f.leaves(disk_id), os.O_RDWR)
        try:
            os.ftruncate(img_fd, old_size)
            bs = _block_size(f, seq - 1, disk_id)
            os.ftruncate(lv_fd, block_count(old_size, bs) * HASH_SIZE)
            for block in undo.blocks:
                if block.disk_id == disk_id:
                    write_all(img_fd, block.data, block.index * bs)
                    write_all(lv_fd, block.leaf, block.index * HASH_SIZE)
                    if tree is not None:
                        tree.set_leaf(block.index, block.leaf)
            os.fdatasync(img_fd)
            os.fdatasync(lv_fd)
        finally:
            os.close(img_fd)
            os.close(lv_fd)
        if tree is not None:
            trees.keep(item, disk_id, tree)
    fsync_dir(f.disks)


def _block_size(f: ItemFiles, seq: int, disk_id: str) -> int:
    """A disk's block size (it never changes; a disk that existed at seq-1 is in HEAD,
    whether HEAD is seq-1 or seq)."""
    disk = f.read_head().disk(disk_id)
    if disk is None:
        raise ReplicaError(f"block size of disk {disk_id} unknown (point {seq})")
    return disk.block_size


def previous_point(head: Point, undo: Undo) -> Point:
    """The point before HEAD (the undo record's `prev`): sizes from the undo record, roots left
    empty (the caller computes them from the restored leaves)."""
    disks = []
    for disk in head.disks:
        size = undo.sizes.get(disk.disk_id, disk.size_bytes)
        if size == 0:
            continue
        disks.append(DiskState(disk.disk_id, size, disk.block_size, ""))
    return Point(undo.prev, tuple(disks))
