"""Frozen views of a replica: a view holds a retained point while later points are applied
(its undo records pinned), and reads the disks as they were at that point: a block the replica
has overwritten since comes from the oldest undo record above the point that holds it, any
other from the image. A view file may name owners that keep it alive (replica_format.py)."""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from services.host_agent.replica_format import (
    DiskState,
    Held,
    ItemFiles,
    Point,
    ReplicaError,
    block_len,
    scan_undo,
)
from services.host_agent.replica_trees import LeafTrees
from shared.files import fsync_dir
from shared.merkle import HASH_SIZE, MerkleTree, block_count

VIEW_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class _ViewIndex:
    """The undo records above a view's point, indexed (no block bytes in memory): for each
    block the oldest record holding it (its bytes at the view's point), and each disk's size
    at the point. Built under the item's lock from the records up to HEAD; extended as HEAD
    moves on, dropped when a rollback removes records."""

    seq: int
    upto: int
    sizes: dict[str, int]
    blocks: dict[tuple[str, int], Held]


def view_docs(f: ItemFiles) -> dict[str, dict[str, Any]]:
    if not f.views.is_dir():
        return {}
    return {p.stem: json.loads(p.read_bytes()) for p in f.views.glob("*.json")}


def view_seqs(f: ItemFiles) -> dict[str, int]:
    """Every view file of the item: view id -> point."""
    return {view_id: int(doc["seq"]) for view_id, doc in view_docs(f).items()}


def _owned(view_id: str, doc: dict[str, Any]) -> bool:
    """A view without owners, or one of its owner files names it."""
    owners = doc.get("owners")
    if not owners:
        return True
    for owner in owners:
        try:
            if json.loads(Path(owner).read_bytes()).get("view") == view_id:
                return True
        except (OSError, ValueError, AttributeError):
            continue
    return False


class FrozenViews:
    """The views' indexes of undo records, per (item, view); the callers hold the item's
    lock (replica.py)."""

    def __init__(self, trees: LeafTrees) -> None:
        self._trees = trees
        self._indexes: dict[tuple[str, str], _ViewIndex] = {}

    def forget(self, item: str) -> None:
        """Drop the item's indexes (a rollback removes the records they point into)."""
        for key in [k for k in self._indexes if k[0] == item]:
            del self._indexes[key]

    def forget_view(self, item: str, view_id: str) -> None:
        self._indexes.pop((item, view_id), None)

    def sweep(self, item: str, f: ItemFiles) -> int:
        """Drop the views no owner keeps (a kill between a view and its owners)."""
        orphans = [v for v, doc in view_docs(f).items() if not _owned(v, doc)]
        for view_id in orphans:
            (f.views / f"{view_id}.json").unlink(missing_ok=True)
            self.forget_view(item, view_id)
        if orphans:
            fsync_dir(f.views)
        return len(orphans)

    def _index(self, item: str, f: ItemFiles, view_id: str) -> tuple[_ViewIndex, Point]:
        """The view's index, extended to HEAD's records; with HEAD."""
        head = f.read_head()
        idx = self._indexes.get((item, view_id))
        if idx is None:
            seq = view_seqs(f).get(view_id)
            if seq is None:
                raise ReplicaError(f"no frozen view {view_id} of item {item}")
            idx = self._indexes[(item, view_id)] = _ViewIndex(seq, seq, {}, {})
        later = (
            [s for s in f.undo_seqs() if idx.upto < s <= head.seq] if idx.upto < head.seq else []
        )
        for seq in later:  # oldest first: the oldest one wins
            path = f.undo_of(seq)
            sizes, held = scan_undo(path)
            for disk_id, size in sizes.items():
                idx.sizes.setdefault(disk_id, size)
            for key, block in held.items():
                idx.blocks.setdefault(key, block)
            idx.upto = seq
        return idx, head

    def point(self, item: str, f: ItemFiles, view_id: str) -> Point:
        """The view's point: each disk's size and block size there, and the Merkle root of
        what the view reads (computed from HEAD's leaves and the pinned records' old ones)."""
        idx, head = self._index(item, f, view_id)
        disks = []
        for disk in head.disks:
            size = idx.sizes.get(disk.disk_id, disk.size_bytes)
            if size == 0:
                continue  # the disk did not exist at the view's point
            n = block_count(size, disk.block_size)
            if size == disk.size_bytes:  # HEAD's tree with the view's old leaves
                tree = self._trees.of(item, f, disk).copy()
                for (disk_id, i), block in idx.blocks.items():
                    if disk_id == disk.disk_id and i < n:
                        tree.set_leaf(i, block.leaf)
                root = tree.root_hex()
            else:
                with f.leaves(disk.disk_id).open("rb") as lv:
                    raw = lv.read(n * HASH_SIZE)
                leaves = []
                for i in range(n):
                    held = idx.blocks.get((disk.disk_id, i))
                    leaves.append(held.leaf if held else raw[i * HASH_SIZE : (i + 1) * HASH_SIZE])
                root = MerkleTree.from_leaves(iter(leaves), n).root_hex()
            disks.append(DiskState(disk.disk_id, size, disk.block_size, root))
        return Point(idx.seq, tuple(disks))

    def read(
        self, item: str, f: ItemFiles, view_id: str, disk_id: str, first: int, count: int
    ) -> bytes:
        """Blocks first..first+count-1 of a disk as the view holds them (the pinned records'
        bytes where the replica has overwritten them since, else the image's), the last one
        short at the disk's end; nothing past it."""
        idx, head = self._index(item, f, view_id)
        disk = head.disk(disk_id)
        size = idx.sizes.get(disk_id, disk.size_bytes if disk else 0)
        if disk is None or size == 0:
            raise ReplicaError(f"disk {disk_id} is not in view {view_id}")
        bs = disk.block_size
        last = min(first + count, block_count(size, bs))
        out = []
        with contextlib.ExitStack() as files:
            img = files.enter_context(f.image(disk_id).open("rb"))
            records: dict[Path, BinaryIO] = {}
            for index in range(first, last):
                length = block_len(index, size, bs)
                held = idx.blocks.get((disk_id, index))
                if held is not None:
                    if held.path not in records:
                        records[held.path] = files.enter_context(held.path.open("rb"))
                    rec = records[held.path]
                    rec.seek(held.offset)
                    data = rec.read(min(held.length, length))
                else:
                    img.seek(index * bs)
                    data = img.read(length)
                out.append(data + bytes(length - len(data)))
        return b"".join(out)
