"""A recovery point's manifest as committed (`PointManifest`, one `DiskPoint` per disk), as
stored in `points/<seq>.json` (`StoredPoint`: plus the delta replay applies), and what reading
or verifying a point answers. docs/replica-store.md describes the manifest file."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from shared.merkle import block_count
from shared.schemas.replication import CycleKind

_HEX64 = re.compile(r"[0-9a-f]{64}")


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


@dataclass
class StoredPoint:
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
    def from_json(cls, doc: Mapping[str, Any]) -> StoredPoint:
        deltas = {
            d["disk_id"]: [(int(i), h) for i, h in d.get("delta", d["changed"])]
            for d in doc["disks"]
        }
        return cls(PointManifest.from_json(doc), deltas, int(doc.get("new_bytes", 0)))


def check_manifest(m: PointManifest) -> None:
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
