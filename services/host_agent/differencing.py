"""Differencing (copy-on-write) disks: a test failover's VM runs over one per protected disk,
each over a frozen view of the chosen point of the item's replica (services/host_agent/
replica.py). Nothing is copied: creating one writes two small files and a sparse one, whatever
the disk's size; replication carries on into the replica meanwhile.

Files, in the test VM's folder, per disk:

- `<disk_id>.avhdx`: the blocks the VM wrote, at their offset (block i at i * block size) in a
  sparse file whose size is the disk's; blocks never written take no space.
- `<disk_id>.avhdx.map`: one byte per block, 1 when the `.avhdx` holds the block.
- `<disk_id>.avhdx.json` {"item", "view", "disk_id", "seq", "size_bytes", "block_size"}: the
  parent. Written last (atomically): a disk without it is incomplete and unused. It is what
  keeps the frozen view alive (the view's owner).

Reads go overlay -> frozen view (the undo records newer than the point, else the replica's
image); writes go to the overlay only: the block's bytes, then its map byte (a kill between
leaves the block unwritten as far as any reader sees). Like every VM disk write here (our
stand-in for guest I/O) no write is fsynced: a guest flush is not modelled.

Creating: the view is frozen naming the `.json` files as its owners, then the overlays are
written, all under the item's lock. Discarding: the folder goes, then the view. A kill between
leaves a view no owner names: the replica drops it when it next recovers or prunes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.host_agent.replica import SiteReplica
from services.host_agent.replica_format import DiskState, ReplicaError
from shared.faults import crash_point
from shared.files import fsync_dir, write_atomic
from shared.merkle import block_count

SUFFIX = ".avhdx"
_CHUNK_BLOCKS = 64  # blocks read per call into the replica (4 MiB of 64 KiB blocks)


class DifferencingError(ReplicaError):
    """A differencing disk that cannot be created, read or written (says why)."""


@dataclass(frozen=True)
class Parent:
    """What a differencing disk reads where it holds no block of its own."""

    item: str
    view: str
    disk_id: str
    seq: int
    size_bytes: int
    block_size: int

    def to_json(self) -> dict[str, Any]:
        return {
            "item": self.item,
            "view": self.view,
            "disk_id": self.disk_id,
            "seq": self.seq,
            "size_bytes": self.size_bytes,
            "block_size": self.block_size,
        }


def is_differencing(path: Path) -> bool:
    return path.suffix == SUFFIX


def _meta(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _map(path: Path) -> Path:
    return path.with_name(path.name + ".map")


def parent_of(path: Path) -> Parent:
    try:
        doc = json.loads(_meta(path).read_bytes())
        return Parent(
            str(doc["item"]),
            str(doc["view"]),
            str(doc["disk_id"]),
            int(doc["seq"]),
            int(doc["size_bytes"]),
            int(doc["block_size"]),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DifferencingError(f"{path} is not a complete differencing disk ({exc})") from None


def view_id_of(request_id: uuid.UUID) -> str:
    """The view a materialise request's differencing disks sit on (a repeated request finds
    the view it froze)."""
    return uuid.uuid5(request_id, "test-failover-view").hex


def create(
    replica: SiteReplica, item: str, seq: int, view_id: str, target: Path, disks: list[DiskState]
) -> dict[str, Path]:
    """A differencing disk per disk in `target` over a frozen view of point `seq` (frozen
    here; both idempotent). The view's disks must be the ones given, with their roots (the
    proof that the VM reads the source's point). Returns disk id -> `.avhdx` path."""
    paths = {d.disk_id: target / f"{d.disk_id}{SUFFIX}" for d in disks}
    with replica.item_lock(item):
        replica.freeze(item, seq, view_id, owners=[_meta(p) for p in paths.values()])
        try:
            held = replica.view_point(item, view_id)
            for disk in disks:
                have = held.disk(disk.disk_id)
                if have is None or have.size_bytes != disk.size_bytes:
                    raise DifferencingError(
                        f"disk {disk.disk_id} of point {seq}: the replica holds "
                        f"{have.size_bytes if have else 'no'} bytes, the point {disk.size_bytes}"
                    )
                if have.merkle_root != disk.merkle_root:
                    raise DifferencingError(
                        f"disk {disk.disk_id}: the replica's root at point {seq} is not the "
                        "source's"
                    )
            target.mkdir(parents=True, exist_ok=True)
            for disk in disks:
                parent = Parent(item, view_id, disk.disk_id, seq, disk.size_bytes, disk.block_size)
                _create_one(paths[disk.disk_id], parent)
                crash_point("differencing.created")
        except (ReplicaError, OSError):
            discard_disks(replica, list(paths.values()))
            replica.drop_view(item, view_id)
            raise
        fsync_dir(target)
    return paths


def _create_one(path: Path, parent: Parent) -> None:
    meta = _meta(path)
    if meta.exists() and parent_of(path) == parent:
        return  # created by an earlier run
    for file, size in ((path, parent.size_bytes), (_map(path), _blocks(parent))):
        fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, size)  # sparse: no block written yet
            os.fsync(fd)
        finally:
            os.close(fd)
    write_atomic(meta, json.dumps(parent.to_json()).encode())


def _blocks(parent: Parent) -> int:
    return block_count(parent.size_bytes, parent.block_size)


def write_block(path: Path, index: int, data: bytes, block_size: int) -> None:
    """Block `index` of `block_size` bytes (the whole block, shorter at the disk's end) into
    the overlay: its bytes, then its map byte."""
    parent = parent_of(path)
    if block_size != parent.block_size:
        raise DifferencingError(f"{path} has {parent.block_size}-byte blocks, not {block_size}")
    if not 0 <= index < _blocks(parent):
        raise DifferencingError(f"block {index} is past the end of {path}")
    expected = min(parent.block_size, parent.size_bytes - index * parent.block_size)
    if len(data) != expected:
        raise DifferencingError(f"block {index} of {path} takes {expected} bytes, not {len(data)}")
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, index * parent.block_size)
    finally:
        os.close(fd)
    fd = os.open(_map(path), os.O_WRONLY)
    try:
        os.pwrite(fd, b"\x01", index)
    finally:
        os.close(fd)


def read_blocks(replica: SiteReplica, path: Path, first: int, count: int) -> bytes:
    """Blocks first..first+count-1 as the VM sees them: the overlay's own, else the view's."""
    parent = parent_of(path)
    last = min(first + count, _blocks(parent))
    if first >= last:
        return b""
    with _map(path).open("rb") as fh:
        fh.seek(first)
        own = fh.read(last - first)
    base = replica.read_view(parent.item, parent.view, parent.disk_id, first, last - first)
    if not any(own):
        return base
    out = bytearray(base)
    bs = parent.block_size
    with path.open("rb") as data:
        for offset, flag in enumerate(own):
            if flag:
                index = first + offset
                data.seek(index * bs)
                block = data.read(min(bs, parent.size_bytes - index * bs))
                out[offset * bs : offset * bs + len(block)] = block
    return bytes(out)


def sha256(replica: SiteReplica, path: Path) -> str:
    """SHA-256 of the disk the VM sees (read through the overlay and the view)."""
    parent = parent_of(path)
    digest = hashlib.sha256()
    for first in range(0, _blocks(parent), _CHUNK_BLOCKS):
        digest.update(read_blocks(replica, path, first, _CHUNK_BLOCKS))
    return digest.hexdigest()


def space_used(path: Path) -> int:
    """Bytes the overlay takes on disk (its written blocks, map and parent file)."""
    return sum(p.stat().st_blocks * 512 for p in (path, _map(path), _meta(path)) if p.exists())


def views_in(folder: Path) -> set[tuple[str, str]]:
    """(item, view) of every complete differencing disk in a VM's folder."""
    found = set()
    for meta in folder.glob(f"*{SUFFIX}.json"):
        try:
            parent = parent_of(meta.with_name(meta.name[: -len(".json")]))
        except DifferencingError:
            continue
        found.add((parent.item, parent.view))
    return found


def drop_views(replica: SiteReplica, views: Iterable[tuple[str, str]]) -> None:
    """Drop the frozen views once their differencing disks are gone."""
    for item, view in views:
        replica.drop_view(item, view)


def delete_folder(replica: SiteReplica, folder: Path) -> None:
    """Delete a VM's folder, then the frozen views its differencing disks held (a kill in
    between leaves views no disk names: the replica drops them)."""
    views = views_in(folder)
    shutil.rmtree(folder)
    crash_point("differencing.folder_removed")
    drop_views(replica, views)


def discard_disks(replica: SiteReplica, paths: list[Path]) -> None:
    """Remove differencing disks (a failed creation) and the view they held."""
    views = set()
    for path in paths:
        try:
            parent = parent_of(path)
            views.add((parent.item, parent.view))
        except DifferencingError:
            pass
        for file in (_meta(path), _map(path), path):
            file.unlink(missing_ok=True)
    drop_views(replica, views)
