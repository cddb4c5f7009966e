"""Replica-store test support: a simulated source disk that ships delta cycles into a
`ReplicaStore`, and a worker entry point that runs one store operation in its own process so a
test can kill it with `DR_CRASH_AT` (shared.faults) and inspect what survives.

    python -m tests.support.store_worker <root> prune <item_id> <seq,seq,...>
    python -m tests.support.store_worker <root> commit <item_id> <manifest.json>
    python -m tests.support.store_worker <root> recover <item_id> -
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from services.replication.store import DiskPoint, PointManifest, ReplicaStore
from services.replication.store import packs as store_packs
from shared.merkle import MerkleTree, block_count, block_hash, block_length

T0 = datetime(2025, 1, 1, tzinfo=UTC)


class SourceDisk:
    """An in-memory source disk image, tracking what changed since the last shipped cycle."""

    def __init__(self, disk_id: str, size: int, block_size: int, rng: random.Random) -> None:
        self.disk_id, self.block_size, self.rng = disk_id, block_size, rng
        self.image = bytearray(size)
        self.shipped = bytearray()  # the image as of the last cycle (nothing yet)

    @property
    def blocks(self) -> int:
        return block_count(len(self.image), self.block_size)

    def block(self, image: bytes | bytearray, index: int) -> bytes:
        start = index * self.block_size
        return bytes(image[start : start + block_length(index, len(image), self.block_size)])

    def write_random(self, fraction: float) -> list[int]:
        picked = self.rng.sample(range(self.blocks), max(1, int(self.blocks * fraction)))
        for i in picked:
            data = self.rng.randbytes(block_length(i, len(self.image), self.block_size))
            self.image[i * self.block_size : i * self.block_size + len(data)] = data
        return picked

    def zero(self, indexes: list[int]) -> None:
        for i in indexes:
            n = block_length(i, len(self.image), self.block_size)
            self.image[i * self.block_size : i * self.block_size + n] = bytes(n)

    def resize(self, size: int) -> None:
        """Truncate, or extend with zeros (as a VHDX resize does)."""
        del self.image[size:]
        self.image += bytes(size - len(self.image))

    def changed(self, *, by_hash: bool = True) -> dict[int, bytes]:
        """Blocks to ship: by_hash compares block hashes (so a boundary block whose length
        changed on a resize is shipped); otherwise by content against the old image resized
        (the store must derive such a boundary block itself)."""
        old = self.shipped[: len(self.image)] + bytes(max(0, len(self.image) - len(self.shipped)))
        out = {}
        for i in range(self.blocks):
            new = self.block(self.image, i)
            if by_hash:
                start = i * self.block_size
                before = bytes(self.shipped[start : start + self.block_size])
                if i >= block_count(len(self.shipped), self.block_size) or before != new:
                    out[i] = new
            elif self.block(old, i) != new:
                out[i] = new
        return out

    def root(self) -> str:
        leaves = [block_hash(self.block(self.image, i)) for i in range(self.blocks)]
        return MerkleTree.from_leaves(leaves, self.blocks).root_hex()

    def sha256(self) -> str:
        return hashlib.sha256(self.image).hexdigest()


def stage_cycle(
    store: ReplicaStore,
    item_id: str,
    seq: int,
    disks: list[SourceDisk],
    *,
    by_hash: bool = True,
    app_consistent: bool = False,
    source_time: datetime | None = None,
) -> PointManifest:
    """Put the changed blocks of every disk and return the cycle's manifest (not committed);
    the disks then count as shipped."""
    points = []
    for disk in disks:
        changed = disk.changed(by_hash=by_hash)
        store.put_blocks(item_id, [(i, block_hash(b).hex(), b) for i, b in changed.items()])
        points.append(
            DiskPoint(
                disk_id=disk.disk_id,
                size_bytes=len(disk.image),
                block_size=disk.block_size,
                merkle_root=disk.root(),
                changed={i: block_hash(b).hex() for i, b in changed.items()},
            )
        )
        disk.shipped = bytearray(disk.image)
    return PointManifest(
        seq=seq,
        kind="initial" if seq == 1 else "delta",
        source_time=source_time or T0 + timedelta(minutes=5 * seq),
        app_consistent=app_consistent,
        disks=points,
    )


def main(argv: list[str]) -> None:
    root, op, item_id, arg = argv
    # every pack with garbage is compacted: crash tests reach the sweep's crash points
    store_packs.PACK_COMPACT_BELOW = 1.0
    store = ReplicaStore(Path(root))
    if op == "prune":
        store.prune(item_id, {int(s) for s in arg.split(",")})
    elif op == "recover":
        store.recover(item_id)
    elif op == "commit":
        store.commit_point(item_id, PointManifest.from_json(json.loads(Path(arg).read_text())))
    else:
        raise SystemExit(f"unknown op {op}")


if __name__ == "__main__":
    main(sys.argv[1:])
