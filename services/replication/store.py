"""Replica store: the bytes of every retained recovery point, on the recovery site's disk.

The service keeps recovery-point metadata in PostgreSQL; this store owns the bytes and is the
durable truth of what a point contains. Blocks, leaves and roots are those of `shared.merkle`.

Layout under `root` (one root per recovery site); docs/replica-store.md has the full story:

    items/<item_id>/
      packs/<n:08d>.pack         append-only block records (magic, SHA-256, length, bytes): a
                                 batch of new blocks is one append + fdatasync; content-addressed
                                 through an in-memory index; all-zero blocks are never stored
      points/<seq:012d>.json     one manifest per retained recovery point: seq, kind,
                                 source_time, app_consistent, new_bytes, and per disk size_bytes,
                                 block_size, merkle_root, `changed` ([index, sha256] of that
                                 point only) and, when it differs, `delta` (what to apply on the
                                 previous retained point: `changed` plus a resized boundary
                                 block, or the folded changes of pruned points in between)
      base/<seq:012d>/           compacted full map after point `seq` (every older point was
        base.json                pruned): {"seq", "disks": [{disk_id, size_bytes, block_size,
        <n>.bin                  file}]}; <n>.bin = 32-byte leaf hashes in block order
      BASE                       {"seq": N}: which base/ folder is current (absent: empty base)
      PRUNE.json                 journal of a prune past its point of no return
      tmp/                       every temp file and folder; emptied by `recover`
    trash/                       items being deleted

The full map of a disk at point p = the base, then for each retained point up to p: resize the
leaf array to the point's size (truncate, or extend with zero-block leaves) and apply its delta.
Every other file is written to tmp/, fsynced, renamed into place, and its folder fsynced. A
manifest's mtime is its commit time (prune preserves it); GC spares packs modified after the
latest manifest, i.e. the blocks of the cycle in flight (like git's prune expiry), deletes dead
packs and compacts mostly dead ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shared.faults import crash_point
from shared.files import fsync_dir, replace_synced
from shared.merkle import (
    BLOCK_SIZE,
    HASH_SIZE,
    ZERO_NODE,
    MerkleTree,
    block_count,
    block_length,
    read_blocks,
    zero_block_hash,
)
from shared.schemas.replication import CycleKind

_HEX64 = re.compile(r"[0-9a-f]{64}")
_ITEM_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# Pack files: records of magic, SHA-256, length and the block's bytes, appended per batch.
_PACK_RECORD = struct.Struct(">4s32sI")
_PACK_MAGIC = b"DRP1"
_PACK_FILE = re.compile(r"(\d{8})\.pack")
PACK_BYTES = 64 * 1024 * 1024  # a pack past this size is closed; the next batch begins one
PACK_COMPACT_BELOW = 0.75  # GC rewrites a pack whose live records are below this share of it
_POINT_FILE = re.compile(r"(\d{12})\.json")


# ------------------------------------------------------------------------------------ errors


class StoreError(Exception):
    """The store refused an operation or found itself damaged."""


class BlockHashMismatch(StoreError, ValueError):
    def __init__(self, expected: str, actual: str, index: int | None = None) -> None:
        where = "block" if index is None else f"block {index}"
        super().__init__(f"{where}: SHA-256 is {actual}, expected {expected}")
        self.index, self.expected, self.actual = index, expected, actual


class MissingBlock(StoreError):
    def __init__(self, disk_id: str, index: int, sha256: str) -> None:
        super().__init__(f"disk {disk_id} block {index}: block {sha256} is not stored")
        self.disk_id, self.index, self.sha256 = disk_id, index, sha256


class CorruptBlock(StoreError):
    def __init__(self, disk_id: str, index: int, expected: str, actual: str) -> None:
        super().__init__(
            f"disk {disk_id} block {index}: stored bytes hash to {actual}, not {expected}"
        )
        self.disk_id, self.index, self.expected, self.actual = disk_id, index, expected, actual


class RootMismatch(StoreError):
    def __init__(self, disk_id: str, expected: str, actual: str) -> None:
        super().__init__(f"disk {disk_id}: Merkle root would be {actual}, manifest says {expected}")
        self.disk_id, self.expected, self.actual = disk_id, expected, actual


class PointConflict(StoreError):
    """A commit that contradicts what is stored (other content, or an older sequence)."""


class UnknownPoint(StoreError, LookupError):
    """No such retained point (or disk at that point)."""


# ------------------------------------------------------------------------------- value types


@dataclass(frozen=True)
class DiskPoint:
    disk_id: str
    size_bytes: int
    block_size: int
    merkle_root: str
    changed: Mapping[int, str] = field(default_factory=dict)  # index -> SHA-256 hex


@dataclass(frozen=True)
class PointManifest:
    seq: int
    kind: str  # a CycleKind value
    source_time: datetime  # timezone-aware
    app_consistent: bool
    disks: Sequence[DiskPoint]

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "kind": str(self.kind),
            "source_time": self.source_time.astimezone(UTC).isoformat(),
            "app_consistent": self.app_consistent,
            "disks": [
                {
                    "disk_id": d.disk_id,
                    "size_bytes": d.size_bytes,
                    "block_size": d.block_size,
                    "merkle_root": d.merkle_root,
                    "changed": [[i, d.changed[i]] for i in sorted(d.changed)],
                }
                for d in self.disks
            ],
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> PointManifest:
        return cls(
            seq=int(doc["seq"]),
            kind=str(doc["kind"]),
            source_time=datetime.fromisoformat(doc["source_time"]),
            app_consistent=bool(doc["app_consistent"]),
            disks=[
                DiskPoint(
                    disk_id=d["disk_id"],
                    size_bytes=int(d["size_bytes"]),
                    block_size=int(d["block_size"]),
                    merkle_root=d["merkle_root"],
                    changed={int(i): h for i, h in d["changed"]},
                )
                for d in doc["disks"]
            ],
        )


@dataclass(frozen=True)
class PointInfo:
    seq: int
    source_time: datetime
    kind: str
    app_consistent: bool
    changed_blocks: int
    new_bytes: int  # bytes of blocks newly stored for this point (not shared with earlier ones)


@dataclass(frozen=True)
class BlockRef:
    index: int
    sha256: str


@dataclass(frozen=True)
class DiskVerification:
    disk_id: str
    expected_root: str
    actual_root: str
    missing: tuple[BlockRef, ...]
    corrupt: tuple[BlockRef, ...]

    @property
    def ok(self) -> bool:
        return self.expected_root == self.actual_root and not self.missing and not self.corrupt


@dataclass(frozen=True)
class VerifyResult:
    item_id: str
    seq: int
    disks: tuple[DiskVerification, ...]

    @property
    def ok(self) -> bool:
        return all(d.ok for d in self.disks)

    def as_dict(self) -> dict[str, Any]:
        return {
            "item_id": self.item_id,
            "seq": self.seq,
            "ok": self.ok,
            "disks": [
                {
                    "disk_id": d.disk_id,
                    "expected_root": d.expected_root,
                    "actual_root": d.actual_root,
                    "ok": d.ok,
                    "missing": [asdict(b) for b in d.missing],
                    "corrupt": [asdict(b) for b in d.corrupt],
                }
                for d in self.disks
            ],
        }


# ------------------------------------------------------------------------- leaf arrays, files


class _DiskMap:
    """The leaf hashes of one disk at one point: 32 bytes per block, in block order."""

    __slots__ = ("block_size", "leaves", "size_bytes")

    def __init__(self, size_bytes: int, block_size: int, leaves: bytearray) -> None:
        self.size_bytes, self.block_size, self.leaves = size_bytes, block_size, leaves

    @classmethod
    def of_tree(cls, tree: MerkleTree, size_bytes: int, block_size: int) -> _DiskMap:
        return cls(size_bytes, block_size, bytearray(b"".join(tree.leaf_hashes())))

    @property
    def count(self) -> int:
        return len(self.leaves) // HASH_SIZE

    def leaf(self, index: int) -> bytes:
        return bytes(self.leaves[index * HASH_SIZE : (index + 1) * HASH_SIZE])

    def is_zero(self, index: int, leaf: bytes) -> bool:
        return leaf == zero_block_hash(block_length(index, self.size_bytes, self.block_size))

    def resize(self, size_bytes: int) -> None:
        """Truncate, or extend with zero-block leaves. Hash-only: a boundary block whose length
        changes keeps its old leaf here; the commit that resized the disk put the right one in
        its delta."""
        old, new = self.count, block_count(size_bytes, self.block_size)
        if new < old:
            del self.leaves[new * HASH_SIZE :]
        elif new > old:
            tail = block_length(new - 1, size_bytes, self.block_size)
            self.leaves += zero_block_hash(self.block_size) * (new - old - 1)
            self.leaves += zero_block_hash(tail)
        self.size_bytes = size_bytes

    def apply(self, entries: Iterable[tuple[int, str]]) -> None:
        for index, sha in entries:
            self.leaves[index * HASH_SIZE : (index + 1) * HASH_SIZE] = bytes.fromhex(sha)

    def copy(self) -> _DiskMap:
        return _DiskMap(self.size_bytes, self.block_size, bytearray(self.leaves))

    def tree(self) -> MerkleTree:
        n = self.count
        return MerkleTree.from_leaves((self.leaf(i) for i in range(n)), n)

    def diff(self, previous: _DiskMap | None) -> list[tuple[int, str]]:
        """The delta that turns `previous` (resized to this size) into this map."""
        base = previous.copy() if previous else _DiskMap(0, self.block_size, bytearray())
        base.resize(self.size_bytes)
        return [
            (i, self.leaf(i).hex())
            for i in range(self.count)
            if self.leaves[i * HASH_SIZE : (i + 1) * HASH_SIZE]
            != base.leaves[i * HASH_SIZE : (i + 1) * HASH_SIZE]
        ]


@dataclass
class _DiskState:
    size_bytes: int
    block_size: int
    tree: MerkleTree


@dataclass
class _Latest:
    seq: int | None
    disks: dict[str, _DiskState]


@dataclass
class _Stored:
    """A manifest as stored: the committed PointManifest plus what replay applies."""

    manifest: PointManifest
    deltas: dict[str, list[tuple[int, str]]]
    new_bytes: int

    def to_json(self) -> dict[str, Any]:
        doc = self.manifest.to_json()
        doc["new_bytes"] = self.new_bytes
        for disk in doc["disks"]:
            delta = [[i, h] for i, h in sorted(self.deltas[disk["disk_id"]])]
            if delta != disk["changed"]:
                disk["delta"] = delta
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> _Stored:
        deltas = {
            d["disk_id"]: [(int(i), h) for i, h in d.get("delta", d["changed"])]
            for d in doc["disks"]
        }
        return cls(PointManifest.from_json(doc), deltas, int(doc.get("new_bytes", 0)))


@dataclass(frozen=True)
class _Layout:
    dir: Path

    @property
    def packs(self) -> Path:
        return self.dir / "packs"

    @property
    def points(self) -> Path:
        return self.dir / "points"

    @property
    def base(self) -> Path:
        return self.dir / "base"

    @property
    def tmp(self) -> Path:
        return self.dir / "tmp"

    @property
    def base_pointer(self) -> Path:
        return self.dir / "BASE"

    @property
    def journal(self) -> Path:
        return self.dir / "PRUNE.json"

    def point(self, seq: int) -> Path:
        return self.points / f"{seq:012d}.json"

    def staged_point(self, seq: int) -> Path:
        return self.points / f"{seq:012d}.json.next"

    def base_dir(self, seq: int) -> Path:
        return self.base / f"{seq:012d}"

    def temp(self, name: str) -> Path:
        return self.tmp / f"{name}.{uuid.uuid4().hex[:12]}"


_fsync_dir = fsync_dir


_IOV_MAX = 1024  # the most buffers one writev(2) takes (Linux's IOV_MAX)
_COMPACT_RECORDS = 256  # records read and re-appended at a time when a pack is compacted


def _write_all(fd: int, parts: list[bytes]) -> None:
    """`parts` written in order at the file's position, `_IOV_MAX` buffers per writev(2)."""
    for start in range(0, len(parts), _IOV_MAX):
        chunk = parts[start : start + _IOV_MAX]
        done = os.writev(fd, chunk)
        if done < sum(len(p) for p in chunk):  # a short write: the rest plainly
            view = memoryview(b"".join(chunk))[done:]
            while view:
                view = view[os.write(fd, view) :]


class _Packs:
    """One item's block bytes: append-only pack files `packs/<n:08d>.pack` of records (magic,
    SHA-256, length, bytes), and an in-memory index sha256 hex -> (pack, offset, length) built
    from the record headers when the item is first used. A batch of new blocks is one append
    and one fdatasync; a pack past `PACK_BYTES` is closed and the next batch begins a new one.
    Callers hold the item's lock to append or collect; reads need no lock."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.index: dict[str, tuple[int, int, int]] = {}
        self.sizes: dict[int, int] = {}  # pack -> bytes of whole records
        self._fd = -1
        self._current: int | None = None  # the pack being appended to
        self._last = 0  # the highest pack number used: numbers are never reused
        if folder.is_dir():
            found = (_PACK_FILE.fullmatch(p.name) for p in folder.iterdir())
            numbers = sorted(int(m.group(1)) for m in found if m)
            for n in numbers:
                self._load(n, newest=n == numbers[-1])
            self._last = max(numbers, default=0)

    def path(self, n: int) -> str:
        return f"{self.folder}/{n:08d}.pack"

    def _load(self, n: int, *, newest: bool) -> None:
        """Index pack `n`. The newest pack's records are hash-checked as well and the pack cut
        at its first bad one: only its tail can hold an append that a crash interrupted (one
        whose fdatasync never returned, so its batch was never acknowledged)."""
        path, good = self.path(n), 0
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            while good + _PACK_RECORD.size <= size:
                fh.seek(good)
                magic, digest, length = _PACK_RECORD.unpack(fh.read(_PACK_RECORD.size))
                start = good + _PACK_RECORD.size
                if magic != _PACK_MAGIC or start + length > size:
                    break
                if newest and hashlib.sha256(fh.read(length)).digest() != digest:
                    break
                self.index[digest.hex()] = (n, start, length)
                good = start + length
        if good < size and newest:
            with open(path, "r+b") as fh:
                fh.truncate(good)
                os.fdatasync(fh.fileno())
        self.sizes[n] = good

    def append(self, blocks: Sequence[tuple[str, bytes]]) -> None:
        """New blocks (sha256 hex, bytes), durable when this returns."""
        if self._current is None or self.sizes[self._current] >= PACK_BYTES:
            self._begin()
        assert self._current is not None
        n, start = self._current, self.sizes[self._current]
        parts: list[bytes] = []
        entries: list[tuple[str, tuple[int, int, int]]] = []
        offset = start
        for sha, data in blocks:
            parts.append(_PACK_RECORD.pack(_PACK_MAGIC, bytes.fromhex(sha), len(data)))
            parts.append(data)
            offset += _PACK_RECORD.size
            entries.append((sha, (n, offset, len(data))))
            offset += len(data)
        try:
            _write_all(self._fd, parts)
            os.fdatasync(self._fd)
        except BaseException:
            with suppress(OSError):  # no torn record may stay in front of later appends
                os.ftruncate(self._fd, start)
            raise
        self.sizes[n] = offset
        self.index.update(entries)

    def _begin(self) -> None:
        self.close()
        _mkdir_durable(self.folder)
        n = self._last = self._last + 1
        self._fd = os.open(self.path(n), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        _fsync_dir(self.folder)  # the pack's name
        self._current, self.sizes[n] = n, 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._current = -1, None

    def read(self, sha: str) -> bytes | None:
        """The stored bytes of a block (unverified), or None if it is not stored."""
        loc = self.index.get(sha)
        if loc is None:
            return None
        n, offset, length = loc
        try:
            fd = os.open(self.path(n), os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    def has(self, sha: str) -> bool:
        loc = self.index.get(sha)
        return loc is not None and os.path.exists(self.path(loc[0]))

    def touch(self, n: int) -> None:
        """A block of pack `n` was put again (a cycle in flight uses it): the pack is spared by
        GC until the next commit (packs modified after the latest commit are)."""
        with suppress(FileNotFoundError):
            os.utime(self.path(n))

    def collect(
        self,
        live: set[str],
        cutoff_ns: int,
        first_free: Callable[[], None],
        *,
        compact_below: float = PACK_COMPACT_BELOW,
    ) -> int:
        """Delete the packs with no live record; rewrite those whose live records are below
        `compact_below` of them (the live ones appended anew, verified, then the pack
        deleted). Packs modified at or after `cutoff_ns` (the latest commit) and the one being
        appended to are left alone. Returns bytes freed."""
        records: dict[int, list[tuple[str, int]]] = {}
        for sha, (n, _, length) in self.index.items():
            records.setdefault(n, []).append((sha, length))
        freed = 0
        for n in sorted(self.sizes):
            if n == self._current:
                continue
            try:
                if os.stat(self.path(n)).st_mtime_ns >= cutoff_ns:
                    continue
            except FileNotFoundError:
                pass
            keep = [(sha, length) for sha, length in records.get(n, []) if sha in live]
            kept = sum(_PACK_RECORD.size + length for _, length in keep)
            if keep and kept >= compact_below * self.sizes[n]:
                continue
            for start in range(0, len(keep), _COMPACT_RECORDS):
                moved = [(sha, self.read(sha)) for sha, _ in keep[start : start + _COMPACT_RECORDS]]
                intact = [
                    (sha, data)
                    for sha, data in moved
                    if data is not None and hashlib.sha256(data).hexdigest() == sha
                ]
                if intact:  # (a corrupt one is left out: verify reports it missing)
                    self.append(intact)
            if not freed:
                first_free()
            with suppress(FileNotFoundError):
                os.unlink(self.path(n))
            for sha, _ in records.get(n, []):
                if self.index.get(sha, (0,))[0] == n:
                    del self.index[sha]
            freed += self.sizes.pop(n) - kept
        if freed:
            _fsync_dir(self.folder)
        return freed


def _mkdir_durable(path: Path) -> None:
    if path.is_dir():
        return
    _mkdir_durable(path.parent)
    try:
        path.mkdir()
    except FileExistsError:
        return
    _fsync_dir(path.parent)


def _write_synced(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise StoreError(f"unreadable store file {path}: {exc}") from exc


def _check_manifest(m: PointManifest) -> None:
    def bad(why: str) -> ValueError:
        return ValueError(f"point {m.seq}: {why}")

    if m.seq < 1:
        raise bad("seq must be >= 1")
    if m.kind not in {k.value for k in CycleKind}:
        raise bad(f"unknown kind {m.kind!r}")
    if m.source_time.utcoffset() is None:
        raise bad("source_time must be timezone-aware")
    ids = [d.disk_id for d in m.disks]
    if not ids or len(set(ids)) != len(ids):
        raise bad("needs at least one disk and unique disk ids")
    for d in m.disks:
        if d.size_bytes <= 0 or d.block_size <= 0:
            raise bad(f"disk {d.disk_id}: size and block size must be > 0")
        if not _HEX64.fullmatch(d.merkle_root):
            raise bad(f"disk {d.disk_id}: merkle_root is not lowercase SHA-256 hex")
        leaves = block_count(d.size_bytes, d.block_size)
        for index, sha in d.changed.items():
            if not 0 <= index < leaves:
                raise bad(f"disk {d.disk_id}: block {index} outside a disk of {leaves} blocks")
            if not _HEX64.fullmatch(sha):
                raise bad(f"disk {d.disk_id}: block {index} hash is not lowercase SHA-256 hex")


# ------------------------------------------------------------------------------------ store


class ReplicaStore:
    """Content-addressed blocks + per-point manifests + a compacted base, per protected item.

    Methods are synchronous and thread-safe (one lock per item); call them via
    `asyncio.to_thread`. Each item is recovered (an interrupted prune finished or rolled back,
    temp files removed) on its first use by this instance.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._items = self.root / "items"
        self._trash = self.root / "trash"
        _mkdir_durable(self._items)
        shutil.rmtree(self._trash, ignore_errors=True)  # deletions a crash interrupted
        self._guard = threading.Lock()
        self._locks: dict[str, threading.RLock] = {}
        self._ready: set[str] = set()
        self._pins: dict[str, int] = {}
        self._latest: dict[str, _Latest] = {}
        self._packs: dict[str, _Packs] = {}  # an item's packs, loaded on its first use
        self._fresh: dict[str, dict[str, int]] = {}  # blocks written since the item's last commit

    def close(self) -> None:
        """Close the packs being appended to."""
        for packs in list(self._packs.values()):
            packs.close()

    # ------------------------------------------------------------------ locking and recovery

    @contextmanager
    def _locked(self, item_id: str, *, lazy_recover: bool = True) -> Iterator[_Layout]:
        item = str(item_id)
        if not _ITEM_ID.fullmatch(item):
            raise ValueError(f"item id {item!r} is not a safe folder name")
        with self._guard:
            lock = self._locks.setdefault(item, threading.RLock())
        with lock:
            layout = _Layout(self._items / item)
            if lazy_recover and item not in self._ready:
                self._recover(item, layout)
            yield layout

    def recover(self, item_id: str) -> None:
        """Finish (past its journal) or roll back (before it) an interrupted prune, and remove
        temp files. Idempotent; also runs lazily on an item's first use."""
        with self._locked(item_id, lazy_recover=False) as layout:
            self._recover(layout.dir.name, layout)

    def _recover(self, item: str, layout: _Layout) -> None:
        self._latest.pop(item, None)
        if item in self._packs:
            self._packs.pop(item).close()
        self._packs[item] = _Packs(layout.packs)
        if layout.dir.is_dir():
            if layout.journal.exists():
                self._roll_forward(item, layout, _read_json(layout.journal))
            for staged in layout.points.glob("*.json.next"):
                staged.unlink()
            shutil.rmtree(layout.tmp, ignore_errors=True)
            base_seq = self._base_seq(layout)
            if layout.base.is_dir():
                for folder in layout.base.iterdir():
                    if folder.name != f"{base_seq:012d}":
                        shutil.rmtree(folder)
            for seq in self._seqs(layout, above=-1):
                if seq <= base_seq:  # a pruned point's file that came back after a crash
                    layout.point(seq).unlink()
        self._ready.add(item)

    @contextmanager
    def _reading(
        self, item_id: str, seq: int
    ) -> Iterator[tuple[_Layout, _Stored, dict[str, _DiskMap]]]:
        """The maps of point `seq`, with the item's blocks pinned (GC waits) but not locked."""
        with self._locked(item_id) as layout:
            stored = self._read_point(layout, seq)
            maps = self._maps_at(layout, seq)
            with self._guard:
                self._pins[str(item_id)] = self._pins.get(str(item_id), 0) + 1
        try:
            yield layout, stored, maps
        finally:
            with self._guard:
                self._pins[str(item_id)] -= 1

    # ------------------------------------------------------------------------------ blocks

    def put_block(
        self, item_id: str, sha256_hex: str, data: bytes, *, index: int | None = None
    ) -> bool:
        """Store one block (verified, durable before returning). True if new bytes were
        written; False for a block already stored or an all-zero block."""
        return self.put_blocks(item_id, [(index, sha256_hex, data)]) == 1

    def put_blocks(self, item_id: str, blocks: Sequence[tuple[int | None, str, bytes]]) -> int:
        """Store a batch of (index, sha256 hex, bytes); every hash is checked before anything
        is written. Same guarantees as `put_block`: when it returns, every new block is durable
        (appended to the item's current pack, one fdatasync for the batch). Returns how many
        blocks were newly written."""
        # hashed here, in the caller's thread: a thread hand-off per 64 KiB block costs about
        # what it would save on two CPUs
        actual = [hashlib.sha256(data).hexdigest() for _, _, data in blocks]
        for (index, expected, _), got in zip(blocks, actual, strict=True):
            if got != expected.lower():
                raise BlockHashMismatch(expected, got, index)
        todo = {
            sha: data
            for (_, _, data), sha in zip(blocks, actual, strict=True)
            if sha != zero_block_hash(len(data)).hex()
        }
        if not todo:
            return 0
        with self._locked(item_id) as layout:
            return self._store(layout, todo)

    def _store(self, layout: _Layout, blocks: Mapping[str, bytes]) -> int:
        """Append the blocks not stored yet (verified by the caller); the stored ones are
        touched (GC spares them until the next commit). Returns how many were new."""
        packs = self._packs[layout.dir.name]
        new = []
        touched: set[int] = set()
        for sha, data in blocks.items():
            loc = packs.index.get(sha)
            if loc is not None and loc[2] == len(data) and packs.has(sha):
                touched.add(loc[0])
            else:  # (also when its pack is gone: stored again rather than missing forever)
                new.append((sha, data))
        for n in touched:  # once per pack, not per block
            packs.touch(n)
        if new:
            packs.append(new)
            fresh = self._fresh.setdefault(layout.dir.name, {})
            fresh.update((sha, len(data)) for sha, data in new)
        return len(new)

    def _read_block(self, layout: _Layout, disk_id: str, index: int, leaf: bytes) -> bytes:
        data = self._packs[layout.dir.name].read(leaf.hex())
        if data is None:
            raise MissingBlock(disk_id, index, leaf.hex())
        return data

    # ------------------------------------------------------------------------------ reading

    @staticmethod
    def _base_seq(layout: _Layout) -> int:
        if not layout.base_pointer.exists():
            return 0
        return int(_read_json(layout.base_pointer)["seq"])

    @staticmethod
    def _seqs(layout: _Layout, above: int) -> list[int]:
        if not layout.points.is_dir():
            return []
        seqs = (_POINT_FILE.fullmatch(p.name) for p in layout.points.iterdir())
        return sorted(s for s in (int(m.group(1)) for m in seqs if m) if s > above)

    def _point_seqs(self, layout: _Layout) -> list[int]:
        return self._seqs(layout, above=self._base_seq(layout))

    def _read_point(self, layout: _Layout, seq: int) -> _Stored:
        path = layout.point(seq)
        if seq <= self._base_seq(layout) or not path.exists():
            raise UnknownPoint(f"recovery point {seq} of item {layout.dir.name} is not retained")
        return _Stored.from_json(_read_json(path))

    def _base_maps(self, layout: _Layout) -> dict[str, _DiskMap]:
        seq = self._base_seq(layout)
        if seq == 0:
            return {}
        folder = layout.base_dir(seq)
        maps: dict[str, _DiskMap] = {}
        for disk in _read_json(folder / "base.json")["disks"]:
            leaves = bytearray((folder / disk["file"]).read_bytes())
            maps[disk["disk_id"]] = _DiskMap(disk["size_bytes"], disk["block_size"], leaves)
            if maps[disk["disk_id"]].count != block_count(disk["size_bytes"], disk["block_size"]):
                raise StoreError(f"base {folder} disk {disk['disk_id']}: wrong leaf count")
        return maps

    @staticmethod
    def _advance(maps: dict[str, _DiskMap], point: _Stored) -> dict[str, _DiskMap]:
        """The maps after `point` (mutates the maps it reuses)."""
        after: dict[str, _DiskMap] = {}
        for disk in point.manifest.disks:
            m = maps.get(disk.disk_id) or _DiskMap(0, disk.block_size, bytearray())
            if m.block_size != disk.block_size:
                m = _DiskMap(0, disk.block_size, bytearray())
            m.resize(disk.size_bytes)
            m.apply(point.deltas[disk.disk_id])
            after[disk.disk_id] = m
        return after

    def _maps_at(self, layout: _Layout, seq: int) -> dict[str, _DiskMap]:
        latest = self._latest.get(layout.dir.name)
        if latest is not None and latest.seq == seq:
            return {
                d: _DiskMap.of_tree(s.tree, s.size_bytes, s.block_size)
                for d, s in latest.disks.items()
            }
        self._read_point(layout, seq)  # raises UnknownPoint
        maps = self._base_maps(layout)
        for s in self._point_seqs(layout):
            if s > seq:
                break
            maps = self._advance(maps, self._read_point(layout, s))
        return maps

    def _latest_state(self, layout: _Layout) -> _Latest:
        item = layout.dir.name
        if item not in self._latest:
            seqs = self._point_seqs(layout)
            if not seqs:
                self._latest[item] = _Latest(None, {})
            else:
                maps = self._maps_at(layout, seqs[-1])
                disks = {
                    d: _DiskState(m.size_bytes, m.block_size, m.tree()) for d, m in maps.items()
                }
                self._latest[item] = _Latest(seqs[-1], disks)
        return self._latest[item]

    def latest_seq(self, item_id: str) -> int | None:
        with self._locked(item_id) as layout:
            seqs = self._point_seqs(layout)
            return seqs[-1] if seqs else None

    def points(self, item_id: str) -> list[PointInfo]:
        with self._locked(item_id) as layout:
            infos = []
            for seq in self._point_seqs(layout):
                stored = self._read_point(layout, seq)
                m = stored.manifest
                infos.append(
                    PointInfo(
                        seq=m.seq,
                        source_time=m.source_time,
                        kind=m.kind,
                        app_consistent=m.app_consistent,
                        changed_blocks=sum(len(d.changed) for d in m.disks),
                        new_bytes=stored.new_bytes,
                    )
                )
            return infos

    def disk_tree(self, item_id: str, disk_id: str, seq: int | None = None) -> MerkleTree:
        """The Merkle tree of a disk at a point (default: the latest); a copy the caller owns."""
        with self._locked(item_id) as layout:
            latest = self._latest_state(layout)
            if latest.seq is None:
                raise UnknownPoint(f"item {item_id} has no recovery point")
            if seq is None or seq == latest.seq:
                if disk_id not in latest.disks:
                    raise UnknownPoint(f"disk {disk_id} is not in point {latest.seq}")
                return latest.disks[disk_id].tree.copy()
            maps = self._maps_at(layout, seq)
            if disk_id not in maps:
                raise UnknownPoint(f"disk {disk_id} is not in point {seq}")
            return maps[disk_id].tree()

    def leaf_hashes(self, item_id: str, disk_id: str, seq: int | None = None) -> list[bytes]:
        return list(self.disk_tree(item_id, disk_id, seq).leaf_hashes())

    # ------------------------------------------------------------------------------ commit

    def commit_point(self, item_id: str, manifest: PointManifest) -> None:
        """Commit a recovery point: every referenced block stored, every disk's root equal to
        the manifest's, manifest durable before returning. Same seq + same content: no-op."""
        _check_manifest(manifest)
        with self._locked(item_id) as layout:
            item = layout.dir.name
            if layout.point(manifest.seq).exists():
                stored = self._read_point(layout, manifest.seq)
                if stored.manifest.to_json() == manifest.to_json():
                    return
                raise PointConflict(f"point {manifest.seq} is committed with other content")
            latest = self._latest_state(layout)
            if latest.seq is not None and manifest.seq <= latest.seq:
                raise PointConflict(f"point {manifest.seq} is older than the latest {latest.seq}")
            try:
                disks, deltas = self._next_disks(layout, latest, manifest)
                fresh = self._fresh.get(item, {})
                hashes = {sha for delta in deltas.values() for _, sha in delta}
                stored = _Stored(manifest, deltas, sum(fresh.get(sha, 0) for sha in hashes))
                _mkdir_durable(layout.points)
                _mkdir_durable(layout.tmp)
                tmp = layout.temp("point")
                _write_synced(tmp, _dumps(stored.to_json()))
                crash_point("store.commit.staged")
                os.replace(tmp, layout.point(manifest.seq))
                crash_point("store.commit.renamed")
                _fsync_dir(layout.points)
            except BaseException:
                self._latest.pop(item, None)  # the cached trees may hold half of this point
                raise
            self._latest[item] = _Latest(manifest.seq, disks)
            self._fresh.pop(item, None)

    def _next_disks(
        self, layout: _Layout, latest: _Latest, manifest: PointManifest
    ) -> tuple[dict[str, _DiskState], dict[str, list[tuple[int, str]]]]:
        """The trees after `manifest` (the cached ones updated in place where the size is
        unchanged: O(k log n)) and each disk's delta; raises unless every root matches."""
        disks: dict[str, _DiskState] = {}
        deltas: dict[str, list[tuple[int, str]]] = {}
        packs = self._packs[layout.dir.name]
        for disk in manifest.disks:
            prev = latest.disks.get(disk.disk_id)
            if prev is not None and prev.block_size != disk.block_size:
                raise PointConflict(
                    f"disk {disk.disk_id}: block size changed from {prev.block_size} to "
                    f"{disk.block_size}; resync it as a new disk"
                )
            delta = dict(disk.changed)
            boundary = self._boundary_block(layout, prev, disk)
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
                    _DiskMap.of_tree(prev.tree, prev.size_bytes, prev.block_size)
                    if prev is not None
                    else _DiskMap(0, disk.block_size, bytearray())
                )
                m.resize(disk.size_bytes)
                tree = m.tree()
            for index, sha in delta.items():
                tree.set_leaf(index, bytes.fromhex(sha))
            if tree.root_hex() != disk.merkle_root:
                raise RootMismatch(disk.disk_id, disk.merkle_root, tree.root_hex())
            disks[disk.disk_id] = _DiskState(disk.size_bytes, disk.block_size, tree)
            deltas[disk.disk_id] = sorted(delta.items())
        return disks, deltas

    def _boundary_block(
        self, layout: _Layout, prev: _DiskState | None, disk: DiskPoint
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
        data = self._read_block(layout, disk.disk_id, index, leaf)
        data = data[:new_len] if new_len < old_len else data + bytes(new_len - old_len)
        sha = hashlib.sha256(data).hexdigest()
        if sha != zero_block_hash(new_len).hex():
            self._store(layout, {sha: data})
        return index, sha

    # ------------------------------------------------------------------------------ seeding

    def seed_from_images(
        self,
        item_id: str,
        seq: int,
        images: Mapping[str, Path],
        source_time: datetime,
        *,
        kind: str = CycleKind.INITIAL.value,
        block_size: int = BLOCK_SIZE,
        batch_blocks: int = 256,
    ) -> PointManifest:
        """Commit point `seq` of an item from disk image files already on this machine (reverse
        replication reuses the old primary's disks): every block hashed, non-zero blocks
        stored, roots computed. Re-seeding with the same images and arguments is a no-op; the
        source then only has to send the blocks whose hashes differ (resync)."""
        if not images:
            raise ValueError("seeding needs at least one disk image")
        disks = []
        for disk_id, path in sorted(images.items()):
            size = Path(path).stat().st_size
            if size <= 0:
                raise StoreError(f"disk {disk_id}: seed image {path} is empty")
            tree = MerkleTree(block_count(size, block_size))
            changed: dict[int, str] = {}
            batch: list[tuple[int | None, str, bytes]] = []
            with open(path, "rb") as fh:
                for index, data in read_blocks(fh, size, block_size):
                    digest = hashlib.sha256(data).digest()
                    tree.set_leaf(index, digest, rehash=False)
                    if digest == zero_block_hash(len(data)):
                        continue
                    changed[index] = digest.hex()
                    batch.append((index, digest.hex(), data))
                    if len(batch) >= batch_blocks:
                        self.put_blocks(item_id, batch)
                        batch = []
            if batch:
                self.put_blocks(item_id, batch)
            tree.rebuild()
            disks.append(DiskPoint(disk_id, size, block_size, tree.root_hex(), changed))
        manifest = PointManifest(seq, kind, source_time, False, disks)
        self.commit_point(item_id, manifest)
        return manifest

    # -------------------------------------------------------------------------- materialise

    def materialise(
        self, item_id: str, seq: int, disk_id: str, out_path: Path, *, verify: bool = True
    ) -> str:
        """Write the disk image of point `seq` to `out_path` (exact size, zero blocks as holes,
        fsynced, renamed into place); returns the SHA-256 hex of the whole image. Streams block
        by block (memory: a read-ahead window). With `verify`, each block read is checked
        against its leaf (CorruptBlock otherwise)."""
        out_path = Path(out_path)
        with self._reading(item_id, seq) as (layout, _, maps):
            if disk_id not in maps:
                raise UnknownPoint(f"disk {disk_id} is not in point {seq}")
            m = maps[disk_id]
            zeros = memoryview(bytes(m.block_size))
            whole = hashlib.sha256()
            tmp = out_path.with_name(f"{out_path.name}.{uuid.uuid4().hex[:8]}.partial")
            try:
                with open(tmp, "wb", buffering=0) as out:
                    for length, data in self._image_blocks(layout, disk_id, m, verify):
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
        self, layout: _Layout, disk_id: str, m: _DiskMap, verify: bool
    ) -> Iterator[tuple[int, bytes | None]]:
        """(length, bytes or None for a zero block) of every block, in order. (Reading ahead
        in threads was measured: no faster on 2 cores, where the output's writeback is the
        limit.)"""
        packs = self._packs[layout.dir.name]
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

    def verify_point(self, item_id: str, seq: int) -> VerifyResult:
        """Re-read and re-hash every block the point references and recompute each
        disk's Merkle root from what is actually on disk."""
        results = []
        with self._reading(item_id, seq) as (layout, stored, maps):
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
                            data = self._packs[layout.dir.name].read(leaf.hex())
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
        return VerifyResult(str(item_id), seq, tuple(results))

    # ------------------------------------------------------------------------------- prune

    def prune(self, item_id: str, keep: Iterable[int], *, truncate: bool = False) -> list[int]:
        """Remove every point not in `keep` (which must hold the latest), folding the ones
        older than the oldest kept point into the base and the others into the next kept
        point, then free unreferenced blocks. Returns the removed seqs.

        `truncate` (a committed failover: no cycle is in flight and none will come) also
        removes the points after the latest kept one, and frees every unreferenced block
        however recent.

        Steps, each atomic and durable before the next (crash points between them): new base
        written under a new name; rewritten manifests staged as `.next`; the journal
        PRUNE.json written (point of no return: before it `recover` rolls back, after it rolls
        forward); BASE switched; `.next` renamed over; removed manifests deleted; old base
        deleted; unreferenced blocks swept; journal removed."""
        keep = set(keep)
        with self._locked(item_id) as layout:
            seqs = self._point_seqs(layout)
            if not seqs:
                return []
            if not keep & set(seqs):
                raise ValueError("prune must keep at least one retained point")
            if seqs[-1] not in keep and not truncate:
                raise ValueError(f"prune must keep the latest point {seqs[-1]}")
            removed = [s for s in seqs if s not in keep]
            if not removed:
                return []
            try:
                journal = self._stage_prune(layout, seqs, keep)
                journal["truncate"] = seqs[-1] not in keep
                crash_point("store.prune.staged")
                tmp = layout.temp("journal")
                _write_synced(tmp, _dumps(journal))
                os.replace(tmp, layout.journal)
                _fsync_dir(layout.dir)
                crash_point("store.prune.journaled")
                self._roll_forward(layout.dir.name, layout, journal)
            except BaseException:
                self._ready.discard(layout.dir.name)  # next use recovers
                self._latest.pop(layout.dir.name, None)
                raise
            if journal["truncate"]:
                self._latest.pop(layout.dir.name, None)
                self._fresh.pop(layout.dir.name, None)
            return removed

    def _stage_prune(self, layout: _Layout, seqs: list[int], keep: set[int]) -> dict[str, Any]:
        old_base = self._base_seq(layout)
        oldest_kept = min(s for s in seqs if s in keep)
        folded = [s for s in seqs if s < oldest_kept]
        new_base = folded[-1] if folded else old_base
        maps = self._base_maps(layout)
        prev_kept: dict[str, _DiskMap] = {}
        skipped = False  # removed points since the previous kept one
        rewrite: list[int] = []
        _mkdir_durable(layout.tmp)
        for seq in seqs:
            stored = self._read_point(layout, seq)
            maps = self._advance(maps, stored)
            if seq == new_base and folded:
                self._write_base(layout, seq, maps)
                crash_point("store.prune.base_written")
                prev_kept = {d: m.copy() for d, m in maps.items()}
            elif seq in keep:
                if skipped:
                    stored.deltas = {d: m.diff(prev_kept.get(d)) for d, m in maps.items()}
                    mtime = layout.point(seq).stat().st_mtime_ns  # keep the commit time
                    tmp = layout.temp("point")
                    _write_synced(tmp, _dumps(stored.to_json()))
                    os.utime(tmp, ns=(mtime, mtime))
                    os.replace(tmp, layout.staged_point(seq))
                    crash_point("store.prune.point_staged")
                    rewrite.append(seq)
                prev_kept = {d: m.copy() for d, m in maps.items()}
                skipped = False
            elif seq not in folded:
                skipped = True
        _fsync_dir(layout.points)
        return {
            "base": new_base,
            "old_base": old_base,
            "remove": [s for s in seqs if s not in keep],
            "rewrite": rewrite,
        }

    def _write_base(self, layout: _Layout, seq: int, maps: dict[str, _DiskMap]) -> None:
        folder = layout.temp(f"base-{seq:012d}")
        folder.mkdir()
        disks = []
        for n, (disk_id, m) in enumerate(sorted(maps.items())):
            _write_synced(folder / f"{n}.bin", bytes(m.leaves))
            disks.append(
                {
                    "disk_id": disk_id,
                    "size_bytes": m.size_bytes,
                    "block_size": m.block_size,
                    "file": f"{n}.bin",
                }
            )
        _write_synced(folder / "base.json", _dumps({"seq": seq, "disks": disks}))
        _fsync_dir(folder)
        _mkdir_durable(layout.base)
        os.replace(folder, layout.base_dir(seq))
        _fsync_dir(layout.base)

    def _roll_forward(self, item: str, layout: _Layout, journal: Mapping[str, Any]) -> None:
        """Everything after the journal; each step idempotent, so a re-run after a crash at
        any instant ends in the same state."""
        if journal["base"] != journal["old_base"]:
            _mkdir_durable(layout.tmp)
            tmp = layout.temp("BASE")
            _write_synced(tmp, _dumps({"seq": journal["base"]}))
            os.replace(tmp, layout.base_pointer)
            _fsync_dir(layout.dir)
            crash_point("store.prune.base_switched")
        for seq in journal["rewrite"]:
            if layout.staged_point(seq).exists():
                os.replace(layout.staged_point(seq), layout.point(seq))
        _fsync_dir(layout.points)
        crash_point("store.prune.manifests_replaced")
        for seq in journal["remove"]:
            layout.point(seq).unlink(missing_ok=True)
        _fsync_dir(layout.points)
        crash_point("store.prune.points_deleted")
        if journal["base"] != journal["old_base"] and journal["old_base"]:
            shutil.rmtree(layout.base_dir(journal["old_base"]), ignore_errors=True)
            _fsync_dir(layout.base)
            crash_point("store.prune.old_base_deleted")
        self._collect_garbage(item, layout, spare_recent=not journal.get("truncate", False))
        crash_point("store.prune.swept")
        layout.journal.unlink()
        _fsync_dir(layout.dir)

    def _collect_garbage(self, item: str, layout: _Layout, *, spare_recent: bool = True) -> int:
        """Mark (base + retained deltas) and sweep (`_Packs.collect`); unreferenced blocks
        stored or touched after the latest commit belong to the cycle in flight and stay
        (unless not `spare_recent`). Returns bytes freed."""
        with self._guard:
            if self._pins.get(item):
                return 0  # a materialise/verify is reading; the next prune frees them
        seqs = self._point_seqs(layout)
        packs = self._packs[item]
        if not seqs or not packs.sizes:
            return 0
        cutoff = layout.point(seqs[-1]).stat().st_mtime_ns if spare_recent else 2**63
        packs.close()  # the pack being appended to is swept too (unless it is recent)
        live: set[str] = set()
        for m in self._base_maps(layout).values():
            live.update(m.leaf(i).hex() for i in range(m.count))
        for seq in seqs:
            live.update(
                sha for delta in self._read_point(layout, seq).deltas.values() for _, sha in delta
            )
        return packs.collect(
            live,
            cutoff,
            lambda: crash_point("store.prune.sweeping"),
            compact_below=PACK_COMPACT_BELOW if spare_recent else 1.0,
        )

    # ------------------------------------------------------------------------------ sizes

    def delete_item(self, item_id: str) -> None:
        """Remove an item and all its points and blocks (moved to trash/ first: atomic)."""
        with self._locked(item_id) as layout:
            self._packs[layout.dir.name].close()
            if layout.dir.exists():
                _mkdir_durable(self._trash)
                doomed = self._trash / f"{layout.dir.name}.{uuid.uuid4().hex[:8]}"
                os.replace(layout.dir, doomed)
                _fsync_dir(self._items)
                shutil.rmtree(doomed, ignore_errors=True)
            self._latest.pop(layout.dir.name, None)
            self._fresh.pop(layout.dir.name, None)
            self._packs[layout.dir.name] = _Packs(layout.packs)

    def item_bytes(self, item_id: str) -> int:
        """Bytes of the item's pack files (blocks; garbage until GC frees it)."""
        with self._locked(item_id) as layout:
            return self._block_bytes(layout)

    @staticmethod
    def _block_bytes(layout: _Layout) -> int:
        total = 0
        for root, _, files in os.walk(layout.packs):  # tolerates files swept meanwhile
            for name in files:
                with suppress(FileNotFoundError):
                    total += os.stat(os.path.join(root, name)).st_size
        return total

    def total_bytes(self) -> int:
        """Bytes of the pack files of every item (not locked: a moment's approximation)."""
        return sum(self._block_bytes(_Layout(d)) for d in self._items.iterdir() if d.is_dir())
