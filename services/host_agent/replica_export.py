"""Verifying or exporting a retained point of an item's replica (`ReplicaPointExportRequested`):
where the replication service keeps no copy of the blocks, a recovery point exists only in the
recovery host's replica, so the host proves it: every disk read back through a frozen view of
the point, its Merkle root recomputed from the bytes read (leaves and tree as shared/merkle.py
defines them) and compared with the source's, the SHA-256 of its bytes taken; given a folder,
each disk is written there as `<disk_id>.vhdx` while it is read.

- The view's id comes from the request (`view_id_of`): a repeated command freezes the same
  view. It is dropped at the end, also on failure; a kill in between leaves it until the
  command is delivered again (the agent records a result only once it has one), which runs
  again and drops it.
- Reads go `CHUNK_BLOCKS` blocks at a time (16 MiB of 64 KiB blocks), each under the item's
  lock only for that read: points are applied between chunks, and no disk is ever held in
  memory whatever its size.
- A file is written to `.<disk_id>.vhdx.partial` in the folder (all-zero blocks left as holes),
  fsynced, then renamed into place and the folder fsynced: a reader sees a whole disk or none.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.host_agent.replica import SiteReplica
from services.host_agent.replica_format import DiskState, ReplicaError
from shared.files import replace_synced, unusable_file_names
from shared.merkle import MerkleTree, block_count, block_hash, block_length, zero_block_hash

CHUNK_BLOCKS = 256


@dataclass(frozen=True)
class DiskCheck:
    """One disk of the point as the replica holds it."""

    disk_id: str
    size_bytes: int
    merkle_root: str  # recomputed from the bytes read
    expected_root: str  # the source's
    sha256: str
    path: Path | None  # the file written, if any

    @property
    def ok(self) -> bool:
        return self.merkle_root == self.expected_root

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "disk_id": self.disk_id,
            "size_bytes": self.size_bytes,
            "merkle_root": self.merkle_root,
            "expected_root": self.expected_root,
            "ok": self.ok,
            "sha256": self.sha256,
        }
        if self.path is not None:
            doc["path"] = str(self.path)
        return doc


def view_id_of(request_id: uuid.UUID) -> str:
    """The view an export request reads through (a repeated request finds the same one)."""
    return uuid.uuid5(request_id, "point-export-view").hex


def unusable_disk_ids(disk_ids: list[str]) -> list[str]:
    """The disk ids that cannot name a file `<disk_id>.vhdx` in a folder."""
    return unusable_file_names(disk_ids)


def check_point(
    replica: SiteReplica,
    item: str,
    seq: int,
    view_id: str,
    expected: dict[str, str],
    target: Path | None = None,
) -> list[DiskCheck]:
    """Each disk of `expected` (disk id -> the source's root) at retained point `seq`, read
    through view `view_id` (frozen here, dropped before returning), written to `target` if
    given (created if missing). ReplicaError: no replica, the point not retained, a disk not
    in it."""
    if not replica.files(item).head.exists():
        raise ReplicaError(f"this host keeps no replica of item {item}")
    held = replica.retained(item)
    if seq not in held:
        holds = f"{held[0]}..{held[-1]}" if held else "none"
        raise ReplicaError(f"point {seq} is not retained by this host's replica (it holds {holds})")
    replica.freeze(item, seq, view_id)
    try:
        point = replica.view_point(item, view_id)
        disks = []
        for disk_id in expected:
            disk = point.disk(disk_id)
            if disk is None:
                raise ReplicaError(f"disk {disk_id} is not in point {seq} of the replica")
            disks.append(disk)
        if target is not None:
            target.mkdir(parents=True, exist_ok=True)
        return [
            _check_disk(replica, item, view_id, disk, expected[disk.disk_id], target)
            for disk in disks
        ]
    finally:
        replica.drop_view(item, view_id)


def _check_disk(
    replica: SiteReplica,
    item: str,
    view_id: str,
    disk: DiskState,
    expected_root: str,
    target: Path | None,
) -> DiskCheck:
    if target is None:
        root, sha = _read_disk(replica, item, view_id, disk, None)
        return DiskCheck(disk.disk_id, disk.size_bytes, root, expected_root, sha, None)
    out = target / f"{disk.disk_id}.vhdx"
    partial = target / f".{disk.disk_id}.vhdx.partial"
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        root, sha = _read_disk(replica, item, view_id, disk, fd)
        os.ftruncate(fd, disk.size_bytes)
        os.fsync(fd)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    replace_synced(partial, out)
    return DiskCheck(disk.disk_id, disk.size_bytes, root, expected_root, sha, out)


def _read_disk(
    replica: SiteReplica, item: str, view_id: str, disk: DiskState, fd: int | None
) -> tuple[str, str]:
    """The disk's Merkle root and SHA-256 as the view holds it, read a chunk at a time; each
    block that is not all zeros written at its offset into `fd` if given."""
    size, bs = disk.size_bytes, disk.block_size
    n = block_count(size, bs)
    tree = MerkleTree(n)
    digest = hashlib.sha256()
    for first in range(0, n, CHUNK_BLOCKS):
        data = replica.read_view(item, view_id, disk.disk_id, first, CHUNK_BLOCKS)
        digest.update(data)
        view = memoryview(data)
        offset = 0
        for index in range(first, min(first + CHUNK_BLOCKS, n)):
            length = block_length(index, size, bs)
            block = view[offset : offset + length]
            leaf = block_hash(block)
            tree.set_leaf(index, leaf, rehash=False)
            if fd is not None and leaf != zero_block_hash(length):
                os.pwrite(fd, block, index * bs)  # an all-zero block stays a hole
            offset += length
    return tree.root_hex(), digest.hexdigest()
