"""The replica an item keeps at the recovery site: one image per protected disk at the latest
applied recovery point (HEAD), plus an undo journal of what each retained point overwrote, so
the replica can return to any retained point by rewriting only the blocks changed since.

Layout, formats and the crash-safety argument: docs/replica-store.md ("Replica at the recovery
site"). In short, per item folder:

- `HEAD.json` {"seq", "disks": [{"disk_id", "size_bytes", "block_size", "merkle_root"}]}.
- `disks/<disk_id>.vhdx` (the image) and `disks/<disk_id>.leaves` (32-byte leaf per block).
- `staged/<seq>.blocks`: records b"DRB1", disk id length (u16), disk id, block index (u64),
  length (u32), SHA-256 (32), bytes; an all-zero block as b"DRZ1" and the same without its
  bytes. `staged/<seq>.json`: the point (disks, expected roots).
- `undo/<seq>.undo`: b"DRU1", header length (u32), header JSON {"seq", "sizes": {disk_id:
  size at seq-1, 0 if the disk did not exist}}, then records: disk id length (u16), disk id,
  block index (u64), old leaf (32), length (u32), the block's bytes at seq-1.
- `ROLLBACK.json` {"to": seq}: a rollback in progress (finished by `recover`).
- `views/<view_id>.json` {"seq", "owners"}: a frozen view of point seq; pins the undo records
  above it. `owners` (optional): files (JSON naming the view in "view") that keep it alive; a
  view whose owners all are gone (a kill between freezing and creating them, or between
  deleting them and dropping the view) is dropped by `recover` and `prune`.

Every step that changes what a reader sees is durable before the next (fdatasync/fsync, atomic
renames, folder fsync), with a `crash_point` after it; `recover(item)` finishes what a kill -9
left. One `SiteReplica` per process owns its root; calls on one item are serialised.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import struct
import threading
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from shared.faults import crash_point
from shared.files import fsync_dir, write_atomic
from shared.merkle import HASH_SIZE, MerkleTree, block_count, block_hash, zero_block_hash

STAGED_MAGIC = b"DRB1"
STAGED_ZERO = b"DRZ1"  # an all-zero block: no bytes staged, written only over non-zero data
UNDO_MAGIC = b"DRU1"
_REC = struct.Struct(">QI")  # block index, length (after the disk id, before/after the hash)
_ID = struct.Struct(">H")
_HDR = struct.Struct(">I")
_IO_CHUNK = 1 << 20
_VIEW_ID = re.compile(r"^[0-9a-f]{32}$")


class ReplicaError(Exception):
    """A request the replica cannot carry out (says why)."""


class BlockHashMismatch(ReplicaError, ValueError):
    pass


class RootMismatch(ReplicaError):
    """The images after applying a point do not have the point's roots (the point was undone)."""

    def __init__(self, seq: int, got: dict[str, str], expected: dict[str, str]) -> None:
        super().__init__(f"point {seq}: roots after apply {got} differ from the source's")
        self.seq = seq
        self.got = got
        self.expected = expected


@dataclass(frozen=True)
class DiskState:
    disk_id: str
    size_bytes: int
    block_size: int
    merkle_root: str

    def to_json(self) -> dict[str, Any]:
        return {
            "disk_id": self.disk_id,
            "size_bytes": self.size_bytes,
            "block_size": self.block_size,
            "merkle_root": self.merkle_root,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> DiskState:
        return cls(
            str(doc["disk_id"]),
            int(doc["size_bytes"]),
            int(doc["block_size"]),
            str(doc["merkle_root"]),
        )


@dataclass(frozen=True)
class Point:
    """A recovery point as the replica holds it: its seq and each disk's size and root."""

    seq: int
    disks: tuple[DiskState, ...]

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "disks": [d.to_json() for d in self.disks]}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Point:
        return cls(int(doc["seq"]), tuple(DiskState.from_json(d) for d in doc["disks"]))

    def disk(self, disk_id: str) -> DiskState | None:
        return next((d for d in self.disks if d.disk_id == disk_id), None)

    def roots(self) -> dict[str, str]:
        return {d.disk_id: d.merkle_root for d in self.disks}


EMPTY = Point(0, ())


@dataclass(frozen=True)
class UndoBlock:
    disk_id: str
    index: int
    leaf: bytes
    data: bytes


@dataclass(frozen=True)
class Undo:
    seq: int
    sizes: dict[str, int]  # disk -> size at seq-1 (0: the disk did not exist)
    blocks: tuple[UndoBlock, ...]


def _seq_name(seq: int, suffix: str) -> str:
    return f"{seq:012d}{suffix}"


def _write_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _read_exact(fh: BinaryIO, n: int) -> bytes:
    data = fh.read(n)
    if len(data) != n:
        raise EOFError("truncated record")
    return data


def _block_len(index: int, size: int, block_size: int) -> int:
    return max(0, min(block_size, size - index * block_size))


@dataclass(frozen=True)
class _Held:
    """Where a frozen view reads one block the replica has overwritten since its point."""

    path: Path
    offset: int
    length: int
    leaf: bytes


@dataclass
class _ViewIndex:
    """The undo records above a view's point, indexed (no block bytes in memory): for each
    block the oldest record holding it (its bytes at the view's point), and each disk's size
    at the point. Built under the item's lock from the records up to HEAD; extended as HEAD
    moves on, dropped when a rollback removes records."""

    seq: int
    upto: int
    sizes: dict[str, int]
    blocks: dict[tuple[str, int], _Held]


class _ItemFiles:
    """Paths of one item's folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.head = root / "HEAD.json"
        self.rollback = root / "ROLLBACK.json"
        self.disks = root / "disks"
        self.staged = root / "staged"
        self.undo = root / "undo"
        self.views = root / "views"
        self.tmp = root / "tmp"

    def image(self, disk_id: str) -> Path:
        return self.disks / f"{disk_id}.vhdx"

    def leaves(self, disk_id: str) -> Path:
        return self.disks / f"{disk_id}.leaves"

    def staged_blocks(self, seq: int) -> Path:
        return self.staged / _seq_name(seq, ".blocks")

    def staged_point(self, seq: int) -> Path:
        return self.staged / _seq_name(seq, ".json")

    def undo_of(self, seq: int) -> Path:
        return self.undo / _seq_name(seq, ".undo")

    def undo_seqs(self) -> list[int]:
        if not self.undo.is_dir():
            return []
        return sorted(int(p.name[:12]) for p in self.undo.glob("*.undo"))


class SiteReplica:
    """The replicas of the items a recovery host holds, under `root` (the agent's own)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._locks: dict[str, threading.RLock] = {}
        self._recovered: set[str] = set()
        self._trees: dict[tuple[str, str], MerkleTree] = {}
        self._indexes: dict[tuple[str, str], _ViewIndex] = {}

    # ------------------------------------------------------------------ basics

    def _lock(self, item: str) -> threading.RLock:
        return self._locks.setdefault(item, threading.RLock())

    def item_lock(self, item: str) -> threading.RLock:
        """Held by every call on `item`: a caller that must do more under it (create a view's
        owners right after freezing it) takes it around both."""
        return self._lock(item)

    def _forget_indexes(self, item: str) -> None:
        for key in [k for k in self._indexes if k[0] == item]:
            del self._indexes[key]

    def files(self, item: str) -> _ItemFiles:
        if not item or "/" in item or item.startswith("."):
            raise ReplicaError(f"bad item id {item!r}")
        return _ItemFiles(self.root / "replica" / item)

    def _open(self, item: str) -> _ItemFiles:
        f = self.files(item)
        if item not in self._recovered:
            self._recover(item, f)
            self._recovered.add(item)
        return f

    def head(self, item: str) -> Point:
        """The point the images are at (seq 0, no disks: nothing applied yet)."""
        with self._lock(item):
            return self._head(self._open(item))

    @staticmethod
    def _head(f: _ItemFiles) -> Point:
        try:
            return Point.from_json(json.loads(f.head.read_bytes()))
        except FileNotFoundError:
            return EMPTY

    def image_path(self, item: str, disk_id: str) -> Path:
        return self.files(item).image(disk_id)

    def retained(self, item: str) -> list[int]:
        """Points the replica can return to: HEAD and every point an undo record reaches."""
        with self._lock(item):
            f = self._open(item)
            head = self._head(f).seq
            undos = [s for s in f.undo_seqs() if s <= head]
            older = [s - 1 for s in undos if s - 1 > 0]
            # a point is reachable when every undo record from it up to HEAD is present
            reachable = [s for s in older if all(t in undos for t in range(s + 1, head + 1))]
            return sorted({*reachable, *([head] if head else [])})

    # ------------------------------------------------------------------ staging

    def stage_blocks(
        self, item: str, seq: int, blocks: Iterable[tuple[str, int, bytes, bytes]]
    ) -> int:
        """Append blocks (disk id, index, SHA-256, bytes) of point `seq`, each checked against
        its hash, in one write and one fdatasync (an all-zero block as a record without its
        bytes). Returns how many were staged."""
        records = []
        for disk_id, index, sha, data in blocks:
            if block_hash(data) != sha:
                raise BlockHashMismatch(
                    f"block {index} of disk {disk_id}: SHA-256 {block_hash(data).hex()} is not "
                    f"the shipped {sha.hex()}"
                )
            raw = disk_id.encode()
            head = _ID.pack(len(raw)) + raw + _REC.pack(index, len(data)) + sha
            zero = sha == zero_block_hash(len(data))
            records.append(STAGED_ZERO + head if zero else STAGED_MAGIC + head + data)
        if not records:
            return 0
        with self._lock(item):
            f = self._open(item)
            if seq <= self._head(f).seq:
                return 0  # already applied (a re-delivered record)
            f.staged.mkdir(parents=True, exist_ok=True)
            path = f.staged_blocks(seq)
            created = not path.exists()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, b"".join(records))
                os.fdatasync(fd)
            finally:
                os.close(fd)
            if created:
                fsync_dir(f.staged)
        return len(records)

    def stage_point(self, item: str, point: Point) -> None:
        """The point to apply (each disk's size, block size and the source's root)."""
        with self._lock(item):
            f = self._open(item)
            f.staged.mkdir(parents=True, exist_ok=True)
            write_atomic(f.staged_point(point.seq), json.dumps(point.to_json()).encode())
        crash_point("replica.apply.staged")

    def _staged(self, f: _ItemFiles, seq: int) -> Iterator[tuple[str, int, bytes, bytes | int]]:
        """(disk, index, SHA-256, bytes or, for an all-zero block, its length)."""
        path = f.staged_blocks(seq)
        if not path.exists():
            return
        with path.open("rb") as fh:
            while magic := fh.read(4):
                if magic not in (STAGED_MAGIC, STAGED_ZERO):
                    raise ReplicaError(f"{path}: bad record")
                try:
                    (n,) = _ID.unpack(_read_exact(fh, _ID.size))
                    disk_id = _read_exact(fh, n).decode()
                    index, length = _REC.unpack(_read_exact(fh, _REC.size))
                    sha = _read_exact(fh, HASH_SIZE)
                    data = _read_exact(fh, length) if magic == STAGED_MAGIC else b""
                except EOFError:
                    return  # an append whose fdatasync never returned: never acknowledged
                good = block_hash(data) if magic == STAGED_MAGIC else zero_block_hash(length)
                if good != sha:
                    raise BlockHashMismatch(f"{path}: staged block {index} of {disk_id} damaged")
                yield disk_id, index, sha, data if magic == STAGED_MAGIC else length

    def _latest_staged(
        self, f: _ItemFiles, seq: int
    ) -> dict[tuple[str, int], tuple[bytes, bytes | int]]:
        """The staged blocks of `seq`, the last one of each (disk, index) winning."""
        return {(d, i): (sha, data) for d, i, sha, data in self._staged(f, seq)}

    # ------------------------------------------------------------------ apply

    def apply(self, item: str, seq: int) -> Point:
        """Bring the images from HEAD (seq-1) to the staged point `seq`; returns the new HEAD.
        Idempotent: a point already applied returns HEAD. The roots are checked against the
        point's (RootMismatch: the point is undone, HEAD stays)."""
        with self._lock(item):
            f = self._open(item)
            head = self._head(f)
            if seq <= head.seq:
                return head
            if seq != head.seq + 1:
                raise ReplicaError(f"point {seq} cannot follow point {head.seq}")
            try:
                point = Point.from_json(json.loads(f.staged_point(seq).read_bytes()))
            except FileNotFoundError:
                raise ReplicaError(f"point {seq} is not staged") from None
            missing = [d.disk_id for d in head.disks if point.disk(d.disk_id) is None]
            if missing:
                raise ReplicaError(f"point {seq} drops disk(s) {missing}: not supported")
            blocks = self._latest_staged(f, seq)
            rerun = f.undo_of(seq).exists()  # rolled forward after a kill
            if not rerun:
                self._write_undo(f, head, point, blocks)
            crash_point("replica.apply.undo_written")
            got = self._write_point(item, f, head, point, blocks, trust_leaves=not rerun)
            crash_point("replica.apply.blocks_written")
            if got != point.roots():
                self._restore(item, f, seq)
                os.unlink(f.undo_of(seq))
                fsync_dir(f.undo)
                raise RootMismatch(seq, got, point.roots())
            write_atomic(f.head, json.dumps(point.to_json()).encode())
            crash_point("replica.apply.head_moved")
            self._unstage(f, seq)
            crash_point("replica.apply.unstaged")
            return point

    def _touched(self, old: DiskState | None, new: DiskState, changed: Iterable[int]) -> list[int]:
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

    def _write_undo(
        self,
        f: _ItemFiles,
        head: Point,
        point: Point,
        blocks: dict[tuple[str, int], tuple[bytes, bytes | int]],
    ) -> None:
        f.undo.mkdir(parents=True, exist_ok=True)
        f.tmp.mkdir(parents=True, exist_ok=True)
        sizes = {}
        tmp = f.tmp / f"undo-{point.seq}.{uuid.uuid4().hex[:8]}"
        with tmp.open("wb") as out:
            for new in point.disks:
                old = head.disk(new.disk_id)
                sizes[new.disk_id] = old.size_bytes if old else 0
            header = json.dumps({"seq": point.seq, "sizes": sizes}).encode()
            out.write(UNDO_MAGIC + _HDR.pack(len(header)) + header)
            for new in point.disks:
                old = head.disk(new.disk_id)
                if old is None:
                    continue
                if old.block_size != new.block_size:
                    raise ReplicaError(f"disk {new.disk_id}: block size change not supported")
                changed = [i for (d, i) in blocks if d == new.disk_id]
                raw = new.disk_id.encode()
                leaves = f.leaves(new.disk_id)
                with f.image(new.disk_id).open("rb") as img, leaves.open("rb") as lv:
                    for index in self._touched(old, new, changed):
                        length = _block_len(index, old.size_bytes, old.block_size)
                        img.seek(index * old.block_size)
                        data = img.read(length)
                        data += bytes(length - len(data))
                        lv.seek(index * HASH_SIZE)
                        leaf = lv.read(HASH_SIZE)
                        out.write(_ID.pack(len(raw)) + raw + _REC.pack(index, length) + leaf + data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, f.undo_of(point.seq))
        fsync_dir(f.undo)

    def _write_point(
        self,
        item: str,
        f: _ItemFiles,
        head: Point,
        point: Point,
        blocks: dict[tuple[str, int], tuple[bytes, bytes | int]],
        *,
        trust_leaves: bool,
    ) -> dict[str, str]:
        """Resize and write every disk of `point` (from HEAD's sizes: a re-run after a kill
        does the same); returns the roots now held. An all-zero block is written only where
        the leaves say the image holds data (`trust_leaves`; a re-run after a kill writes
        every block, as the leaves may have reached the disk before the image did)."""
        f.disks.mkdir(parents=True, exist_ok=True)
        for disk in point.disks:
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
            tree = self._trees.get((item, disk.disk_id)) if same and trust_leaves else None
            if tree is None:
                self._trees.pop((item, disk.disk_id), None)
            try:
                self._resize(img_fd, lv_fd, previous.size_bytes if previous else 0, disk)
                for index, (sha, data) in sorted(writes.items()):
                    if isinstance(data, int):  # all zero: only over data that is not
                        if trust_leaves and os.pread(lv_fd, HASH_SIZE, index * HASH_SIZE) == sha:
                            continue
                        data = bytes(data)
                    _write_all(img_fd, data, index * disk.block_size)
                    _write_all(lv_fd, sha, index * HASH_SIZE)
                    if tree is not None:
                        tree.set_leaf(index, sha)
                os.fdatasync(img_fd)
                os.fdatasync(lv_fd)
            except BaseException:
                self._trees.pop((item, disk.disk_id), None)
                raise
            finally:
                os.close(img_fd)
                os.close(lv_fd)
        fsync_dir(f.disks)
        return {d.disk_id: self._tree(item, f, d).root_hex() for d in point.disks}

    @staticmethod
    def _resize(img_fd: int, lv_fd: int, old_size: int, disk: DiskState) -> None:
        """Size the image and its leaves from `old_size` to the disk's: the boundary block's
        leaf is recomputed, blocks past the old end get zero-block leaves. Idempotent."""
        bs, size = disk.block_size, disk.size_bytes
        n = block_count(size, bs)
        os.ftruncate(img_fd, size)
        os.ftruncate(lv_fd, n * HASH_SIZE)
        first = min(old_size, size) // bs if old_size != size else n
        for index in range(first, n):
            length = _block_len(index, size, bs)
            if index * bs < min(old_size, size):
                data = os.pread(img_fd, length, index * bs)
                leaf = block_hash(data + bytes(length - len(data)))
            else:
                leaf = zero_block_hash(length)
            _write_all(lv_fd, leaf, index * HASH_SIZE)

    def _tree(self, item: str, f: _ItemFiles, disk: DiskState) -> MerkleTree:
        key = (item, disk.disk_id)
        if key not in self._trees:
            n = block_count(disk.size_bytes, disk.block_size)
            with f.leaves(disk.disk_id).open("rb") as lv:
                raw = lv.read(n * HASH_SIZE)
            self._trees[key] = MerkleTree.from_leaves(
                (raw[i * HASH_SIZE : (i + 1) * HASH_SIZE] for i in range(n)), n
            )
        return self._trees[key]

    def roots(self, item: str) -> dict[str, str]:
        """The Merkle roots of the images, computed from their leaves."""
        with self._lock(item):
            f = self._open(item)
            return {d.disk_id: self._tree(item, f, d).root_hex() for d in self._head(f).disks}

    def _unstage(self, f: _ItemFiles, up_to: int) -> None:
        if not f.staged.is_dir():
            return
        for path in f.staged.iterdir():
            if path.name[:12].isdigit() and int(path.name[:12]) <= up_to:
                path.unlink(missing_ok=True)
        fsync_dir(f.staged)

    # ------------------------------------------------------------------ undo

    @staticmethod
    def _read_undo(path: Path) -> Undo:
        with path.open("rb") as fh:
            if fh.read(4) != UNDO_MAGIC:
                raise ReplicaError(f"{path}: not an undo record")
            (n,) = _HDR.unpack(_read_exact(fh, _HDR.size))
            header = json.loads(_read_exact(fh, n))
            blocks = []
            while raw := fh.read(_ID.size):
                (k,) = _ID.unpack(raw)
                disk_id = _read_exact(fh, k).decode()
                index, length = _REC.unpack(_read_exact(fh, _REC.size))
                leaf = _read_exact(fh, HASH_SIZE)
                blocks.append(UndoBlock(disk_id, index, leaf, _read_exact(fh, length)))
        sizes = {str(k): int(v) for k, v in header["sizes"].items()}
        return Undo(int(header["seq"]), sizes, tuple(blocks))

    def _restore(self, item: str, f: _ItemFiles, seq: int) -> None:
        """Put the images back to point seq-1 from undo record `seq` (idempotent)."""
        undo = self._read_undo(f.undo_of(seq))
        head = self._head(f)
        for disk_id, old_size in undo.sizes.items():
            # the cached tree follows the leaves restored (rebuilding a whole disk's tree at
            # each point undone made a rollback cost grow with the disk's size); dropped
            # while they are written, rebuilt from them when the size changes
            tree = self._trees.pop((item, disk_id), None)
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
                bs = self._block_size(f, seq - 1, disk_id)
                os.ftruncate(lv_fd, block_count(old_size, bs) * HASH_SIZE)
                for block in undo.blocks:
                    if block.disk_id == disk_id:
                        _write_all(img_fd, block.data, block.index * bs)
                        _write_all(lv_fd, block.leaf, block.index * HASH_SIZE)
                        if tree is not None:
                            tree.set_leaf(block.index, block.leaf)
                os.fdatasync(img_fd)
                os.fdatasync(lv_fd)
            finally:
                os.close(img_fd)
                os.close(lv_fd)
            if tree is not None:
                self._trees[(item, disk_id)] = tree
        fsync_dir(f.disks)

    def _block_size(self, f: _ItemFiles, seq: int, disk_id: str) -> int:
        """A disk's block size (it never changes; a disk that existed at seq-1 is in HEAD,
        whether HEAD is seq-1 or seq)."""
        disk = self._head(f).disk(disk_id)
        if disk is None:
            raise ReplicaError(f"block size of disk {disk_id} unknown (point {seq})")
        return disk.block_size

    def _previous_point(self, f: _ItemFiles, head: Point, undo: Undo) -> Point:
        """HEAD's point seq-1: sizes from the undo record, roots from the restored leaves."""
        disks = []
        for disk in head.disks:
            size = undo.sizes.get(disk.disk_id, disk.size_bytes)
            if size == 0:
                continue
            disks.append(DiskState(disk.disk_id, size, disk.block_size, ""))
        return Point(undo.seq - 1, tuple(disks))

    def rollback(self, item: str, seq: int) -> Point:
        """Return the images to retained point `seq` (dropping every later point), rewriting
        only the blocks changed since. Returns the new HEAD."""
        with self._lock(item):
            f = self._open(item)
            head = self._head(f)
            if seq == head.seq:
                return head
            if seq not in self.retained(item) or seq > head.seq:
                raise ReplicaError(f"point {seq} is not retained here (HEAD {head.seq})")
            pinned = [v for v in self._views(f).values() if v > seq]
            if pinned:
                raise ReplicaError(f"frozen views of points {pinned} need the later points")
            write_atomic(f.rollback, json.dumps({"to": seq}).encode())
            crash_point("replica.undo.started")
            return self._roll_back(item, f, seq)

    def _roll_back(self, item: str, f: _ItemFiles, to: int) -> Point:
        head = self._head(f)
        self._forget_indexes(item)  # their records above `to` go
        while head.seq > to:
            undo = self._read_undo(f.undo_of(head.seq))
            self._restore(item, f, head.seq)
            crash_point("replica.undo.blocks_restored")
            previous = self._previous_point(f, head, undo)
            roots = {d.disk_id: self._tree(item, f, d).root_hex() for d in previous.disks}
            head = Point(
                previous.seq,
                tuple(
                    DiskState(d.disk_id, d.size_bytes, d.block_size, roots[d.disk_id])
                    for d in previous.disks
                ),
            )
            write_atomic(f.head, json.dumps(head.to_json()).encode())
            crash_point("replica.undo.head_moved")
            os.unlink(f.undo_of(undo.seq))
            fsync_dir(f.undo)
            crash_point("replica.undo.dropped")
        f.rollback.unlink(missing_ok=True)
        fsync_dir(f.root)
        return head

    # ------------------------------------------------------------------ views, retention

    def _views(self, f: _ItemFiles) -> dict[str, int]:
        return {view_id: int(doc["seq"]) for view_id, doc in self._view_docs(f).items()}

    @staticmethod
    def _view_docs(f: _ItemFiles) -> dict[str, dict[str, Any]]:
        if not f.views.is_dir():
            return {}
        return {p.stem: json.loads(p.read_bytes()) for p in f.views.glob("*.json")}

    def views(self, item: str) -> dict[str, int]:
        """The item's frozen views (those an owner keeps): view id -> point."""
        with self._lock(item):
            f = self._open(item)
            self._sweep_views(item, f)
            return self._views(f)

    def freeze(
        self, item: str, seq: int, view_id: str | None = None, owners: Iterable[Path] = ()
    ) -> str:
        """A frozen view of retained point `seq` (its undo records pinned); returns its id.
        With `view_id` the call is idempotent (a view of that id and point is kept as is);
        with `owners` the view lives while one of those files names it (see the module)."""
        with self._lock(item):
            f = self._open(item)
            if view_id is not None and not _VIEW_ID.fullmatch(view_id):
                raise ReplicaError(f"bad view id {view_id!r}")
            view_id = view_id or uuid.uuid4().hex
            existing = self._views(f).get(view_id)
            if existing is not None:
                if existing != seq:
                    raise ReplicaError(f"view {view_id} is of point {existing}, not {seq}")
                return view_id
            if seq not in self.retained(item):
                raise ReplicaError(f"point {seq} is not retained here")
            doc: dict[str, Any] = {"seq": seq}
            if owners:
                doc["owners"] = [str(p) for p in owners]
            f.views.mkdir(parents=True, exist_ok=True)
            write_atomic(f.views / f"{view_id}.json", json.dumps(doc).encode())
            crash_point("replica.view.frozen")
            return view_id

    def drop_view(self, item: str, view_id: str) -> None:
        with self._lock(item):
            f = self._open(item)
            (f.views / f"{view_id}.json").unlink(missing_ok=True)
            self._indexes.pop((item, view_id), None)
            if f.views.is_dir():
                fsync_dir(f.views)
            crash_point("replica.view.dropped")

    @staticmethod
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

    def _sweep_views(self, item: str, f: _ItemFiles) -> int:
        """Drop the views no owner keeps (a kill between a view and its owners)."""
        orphans = [v for v, doc in self._view_docs(f).items() if not self._owned(v, doc)]
        for view_id in orphans:
            (f.views / f"{view_id}.json").unlink(missing_ok=True)
            self._indexes.pop((item, view_id), None)
        if orphans:
            fsync_dir(f.views)
        return len(orphans)

    def _index(self, item: str, f: _ItemFiles, view_id: str) -> tuple[_ViewIndex, Point]:
        """The view's index, extended to HEAD's records; with HEAD."""
        head = self._head(f)
        idx = self._indexes.get((item, view_id))
        if idx is None:
            seq = self._views(f).get(view_id)
            if seq is None:
                raise ReplicaError(f"no frozen view {view_id} of item {item}")
            idx = self._indexes[(item, view_id)] = _ViewIndex(seq, seq, {}, {})
        for seq in range(idx.upto + 1, head.seq + 1):  # oldest first: the oldest one wins
            path = f.undo_of(seq)
            sizes, held = self._scan_undo(path)
            for disk_id, size in sizes.items():
                idx.sizes.setdefault(disk_id, size)
            for key, block in held.items():
                idx.blocks.setdefault(key, block)
            idx.upto = seq
        return idx, head

    @staticmethod
    def _scan_undo(path: Path) -> tuple[dict[str, int], dict[tuple[str, int], _Held]]:
        """An undo record's sizes and where each block's bytes are (not read)."""
        held: dict[tuple[str, int], _Held] = {}
        with path.open("rb") as fh:
            if fh.read(4) != UNDO_MAGIC:
                raise ReplicaError(f"{path}: not an undo record")
            (n,) = _HDR.unpack(_read_exact(fh, _HDR.size))
            header = json.loads(_read_exact(fh, n))
            while raw := fh.read(_ID.size):
                (k,) = _ID.unpack(raw)
                disk_id = _read_exact(fh, k).decode()
                index, length = _REC.unpack(_read_exact(fh, _REC.size))
                leaf = _read_exact(fh, HASH_SIZE)
                held[(disk_id, index)] = _Held(path, fh.tell(), length, leaf)
                fh.seek(length, os.SEEK_CUR)
        return {str(k): int(v) for k, v in header["sizes"].items()}, held

    def view_point(self, item: str, view_id: str) -> Point:
        """The view's point: each disk's size and block size there, and the Merkle root of
        what the view reads (computed from HEAD's leaves and the pinned records' old ones)."""
        with self._lock(item):
            f = self._open(item)
            idx, head = self._index(item, f, view_id)
            disks = []
            for disk in head.disks:
                size = idx.sizes.get(disk.disk_id, disk.size_bytes)
                if size == 0:
                    continue  # the disk did not exist at the view's point
                n = block_count(size, disk.block_size)
                if size == disk.size_bytes:  # HEAD's tree with the view's old leaves
                    tree = self._tree(item, f, disk).copy()
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
                        leaves.append(
                            held.leaf if held else raw[i * HASH_SIZE : (i + 1) * HASH_SIZE]
                        )
                    root = MerkleTree.from_leaves(iter(leaves), n).root_hex()
                disks.append(DiskState(disk.disk_id, size, disk.block_size, root))
            return Point(idx.seq, tuple(disks))

    def read_view(self, item: str, view_id: str, disk_id: str, first: int, count: int) -> bytes:
        """Blocks first..first+count-1 of a disk as the view holds them (the pinned records'
        bytes where the replica has overwritten them since, else the image's), the last one
        short at the disk's end; nothing past it."""
        with self._lock(item):
            f = self._open(item)
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
                    length = _block_len(index, size, bs)
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

    def view_sha256(self, item: str, view_id: str, disk_id: str) -> str:
        """SHA-256 of a disk as the frozen view holds it (read through the undo records)."""
        point = self.view_point(item, view_id)
        disk = point.disk(disk_id)
        if disk is None:
            raise ReplicaError(f"disk {disk_id} is not in view {view_id}")
        digest = hashlib.sha256()
        n = block_count(disk.size_bytes, disk.block_size)
        step = max(1, _IO_CHUNK * 16 // disk.block_size)
        for first in range(0, n, step):
            digest.update(self.read_view(item, view_id, disk_id, first, step))
        return digest.hexdigest()

    def prune(self, item: str, oldest: int) -> int:
        """Keep points `oldest`..HEAD: delete the undo records at or below `oldest` that no
        frozen view needs. Returns how many were deleted."""
        with self._lock(item):
            f = self._open(item)
            self._sweep_views(item, f)
            floor = min([oldest, *self._views(f).values()])
            gone = [s for s in f.undo_seqs() if s <= floor]
            for seq in gone:
                f.undo_of(seq).unlink()
                crash_point("replica.prune.dropped")
            if gone:
                fsync_dir(f.undo)
            return len(gone)

    def delete_item(self, item: str) -> None:
        with self._lock(item):
            f = self.files(item)
            if f.root.exists():
                trash = self.root / "trash" / f"{item}.{uuid.uuid4().hex[:8]}"
                trash.parent.mkdir(parents=True, exist_ok=True)
                os.replace(f.root, trash)
                shutil.rmtree(trash, ignore_errors=True)
            self._recovered.discard(item)
            self._forget_indexes(item)
            for key in [k for k in self._trees if k[0] == item]:
                del self._trees[key]

    # ------------------------------------------------------------------ recovery

    def recover(self, item: str) -> None:
        """Finish what a kill left (also run on an item's first use)."""
        with self._lock(item):
            self._recovered.discard(item)
            self._open(item)

    def _recover(self, item: str, f: _ItemFiles) -> None:
        if f.tmp.is_dir():
            shutil.rmtree(f.tmp)
        if not f.root.is_dir():
            return
        for key in [k for k in self._trees if k[0] == item]:
            del self._trees[key]
        self._forget_indexes(item)
        head = self._head(f)
        for seq in f.undo_seqs():
            if seq <= head.seq:
                continue
            # An undo record above HEAD: an apply past its point of no return (rolled forward
            # when its point is staged), or the last record of a rollback step whose HEAD had
            # moved (the images are HEAD's already: restoring it again changes nothing).
            if seq == head.seq + 1 and f.staged_point(seq).exists():
                self._recovered.add(item)  # apply() must not recurse into recovery
                with contextlib.suppress(RootMismatch):  # undone by apply; HEAD stays
                    self.apply(item, seq)
                head = self._head(f)
            else:
                self._restore(item, f, seq)
                os.unlink(f.undo_of(seq))
                fsync_dir(f.undo)
        if f.rollback.exists():
            to = int(json.loads(f.rollback.read_bytes())["to"])
            head = self._roll_back(item, f, to)
        self._unstage(f, head.seq)
        if f.views.is_dir():
            self._sweep_views(item, f)
