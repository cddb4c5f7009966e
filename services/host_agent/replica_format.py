"""The recovery-site replica's folder and record formats (the replica: replica.py).

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
- `SEED.json` {"request", "seq", "disks": [{"disk_id", "path", "size_bytes", "block_size"}]}:
  the image files the replica was started from (replica_seed.py); `seeding/` holds their
  copies until they move into `disks/`.
- `views/<view_id>.json` {"seq", "owners"}: a frozen view of point seq; pins the undo records
  above it. `owners` (optional): files (JSON naming the view in "view") that keep it alive; a
  view whose owners all are gone (a kill between freezing and creating them, or between
  deleting them and dropping the view) is dropped by `recover` and `prune`.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from shared.merkle import HASH_SIZE, block_hash, zero_block_hash

STAGED_MAGIC = b"DRB1"
STAGED_ZERO = b"DRZ1"  # an all-zero block: no bytes staged, written only over non-zero data
UNDO_MAGIC = b"DRU1"
_REC = struct.Struct(">QI")  # block index, length (after the disk id, before/after the hash)
_ID = struct.Struct(">H")
_HDR = struct.Struct(">I")


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
    sizes: dict[str, int]  # disk -> size at `prev` (0: the disk did not exist)
    blocks: tuple[UndoBlock, ...]
    prev: int  # the point it returns to: seq-1, or older for a point that caught up


@dataclass(frozen=True)
class Held:
    """Where an undo record holds one block's bytes (not read): a frozen view reads it there."""

    path: Path
    offset: int
    length: int
    leaf: bytes


def _seq_name(seq: int, suffix: str) -> str:
    return f"{seq:012d}{suffix}"


def write_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _read_exact(fh: BinaryIO, n: int) -> bytes:
    data = fh.read(n)
    if len(data) != n:
        raise EOFError("truncated record")
    return data


def block_len(index: int, size: int, block_size: int) -> int:
    return max(0, min(block_size, size - index * block_size))


class ItemFiles:
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
        self.seed = root / "SEED.json"
        self.seeding = root / "seeding"

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

    def read_head(self) -> Point:
        """HEAD's point (seq 0, no disks: nothing applied yet)."""
        try:
            return Point.from_json(json.loads(self.head.read_bytes()))
        except FileNotFoundError:
            return EMPTY


# ---------------------------------------------------------------------- staged blocks


def staged_record(disk_id: str, index: int, sha: bytes, data: bytes) -> bytes:
    """One staged block's record (an all-zero block without its bytes)."""
    raw = disk_id.encode()
    head = _ID.pack(len(raw)) + raw + _REC.pack(index, len(data)) + sha
    zero = sha == zero_block_hash(len(data))
    return STAGED_ZERO + head if zero else STAGED_MAGIC + head + data


@dataclass(frozen=True)
class StagedAt:
    """Where a staged block's bytes are in the point's staged file (read when written)."""

    offset: int
    length: int


def latest_staged(path: Path) -> dict[tuple[str, int], tuple[bytes, StagedAt | int]]:
    """The staged blocks of a point, the last one of each (disk, index) winning: each block's
    SHA-256 and where its bytes are in the file (or, for an all-zero block, its length). Every
    block is checked against its hash here, one at a time: memory does not grow with the
    point's size (an initial point holds a whole disk's data)."""
    out: dict[tuple[str, int], tuple[bytes, StagedAt | int]] = {}
    if not path.exists():
        return out
    with path.open("rb") as fh:
        while magic := fh.read(4):
            if magic not in (STAGED_MAGIC, STAGED_ZERO):
                raise ReplicaError(f"{path}: bad record")
            try:
                (n,) = _ID.unpack(_read_exact(fh, _ID.size))
                disk_id = _read_exact(fh, n).decode()
                index, length = _REC.unpack(_read_exact(fh, _REC.size))
                sha = _read_exact(fh, HASH_SIZE)
                at = fh.tell()
                data = _read_exact(fh, length) if magic == STAGED_MAGIC else b""
            except EOFError:
                break  # an append whose fdatasync never returned: never acknowledged
            good = block_hash(data) if magic == STAGED_MAGIC else zero_block_hash(length)
            if good != sha:
                raise BlockHashMismatch(f"{path}: staged block {index} of {disk_id} damaged")
            out[(disk_id, index)] = (sha, StagedAt(at, length) if magic == STAGED_MAGIC else length)
    return out


# ---------------------------------------------------------------------- undo records


def undo_header(seq: int, prev: int, sizes: dict[str, int]) -> bytes:
    header = json.dumps({"seq": seq, "prev": prev, "sizes": sizes}).encode()
    return UNDO_MAGIC + _HDR.pack(len(header)) + header


def undo_block(disk_id: str, index: int, leaf: bytes, data: bytes) -> bytes:
    raw = disk_id.encode()
    return _ID.pack(len(raw)) + raw + _REC.pack(index, len(data)) + leaf + data


def _undo_blocks(
    path: Path, fh: BinaryIO
) -> tuple[dict[str, Any], Iterator[tuple[str, int, int, bytes]]]:
    """An undo record's header, and its blocks (disk, index, length, leaf) with `fh` at each
    block's bytes (the caller reads or skips them before the next)."""
    if fh.read(4) != UNDO_MAGIC:
        raise ReplicaError(f"{path}: not an undo record")
    (n,) = _HDR.unpack(_read_exact(fh, _HDR.size))
    header: dict[str, Any] = json.loads(_read_exact(fh, n))

    def blocks() -> Iterator[tuple[str, int, int, bytes]]:
        while raw := fh.read(_ID.size):
            (k,) = _ID.unpack(raw)
            disk_id = _read_exact(fh, k).decode()
            index, length = _REC.unpack(_read_exact(fh, _REC.size))
            yield disk_id, index, length, _read_exact(fh, HASH_SIZE)

    return header, blocks()


def _sizes(header: dict[str, Any]) -> dict[str, int]:
    return {str(k): int(v) for k, v in header["sizes"].items()}


def _prev(header: dict[str, Any]) -> int:
    """The point an undo record returns to (records written before catch-up existed: seq-1)."""
    return int(header.get("prev", int(header["seq"]) - 1))


def undo_prev(path: Path) -> int:
    """The point undo record `path` returns to, from its header only."""
    with path.open("rb") as fh:
        header, _ = _undo_blocks(path, fh)
    return _prev(header)


def read_undo(path: Path) -> Undo:
    with path.open("rb") as fh:
        header, records = _undo_blocks(path, fh)
        blocks = [
            UndoBlock(disk_id, index, leaf, _read_exact(fh, length))
            for disk_id, index, length, leaf in records
        ]
    return Undo(int(header["seq"]), _sizes(header), tuple(blocks), _prev(header))


def scan_undo(path: Path) -> tuple[dict[str, int], dict[tuple[str, int], Held]]:
    """An undo record's sizes and where each block's bytes are (not read)."""
    held: dict[tuple[str, int], Held] = {}
    with path.open("rb") as fh:
        header, records = _undo_blocks(path, fh)
        for disk_id, index, length, leaf in records:
            held[(disk_id, index)] = Held(path, fh.tell(), length, leaf)
            fh.seek(length, os.SEEK_CUR)
    return _sizes(header), held
