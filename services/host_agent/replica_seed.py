"""A replica started from image files on the recovery host itself (reverse replication: the old
primary host keeps the images of the VM that ran on it): each image copied block by block into
the item's `seeding/` folder, its leaves computed while copying, then moved into `disks/`
(the steps, their order and the crash points: replica.py `SiteReplica.seed`).

Memory does not grow with the disk: one read of about 1 MiB at a time, and the disk's Merkle
tree (64 bytes per block, as the replica keeps for every disk anyway).
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.host_agent.replica_format import ItemFiles, ReplicaError, block_len, write_all
from shared.files import fsync_dir
from shared.merkle import HASH_SIZE, MerkleTree, block_count, block_hash, zero_block_hash

_IO_CHUNK = 1 << 20


@dataclass(frozen=True)
class SeedDisk:
    """A disk of the replica and the image file it starts from."""

    disk_id: str
    path: Path
    size_bytes: int
    block_size: int

    def to_json(self) -> dict[str, Any]:
        return {
            "disk_id": self.disk_id,
            "path": str(self.path),
            "size_bytes": self.size_bytes,
            "block_size": self.block_size,
        }


def seed_record(request: str, seq: int, disks: list[SeedDisk]) -> dict[str, Any]:
    """`SEED.json`: what the replica was (or is being) seeded from."""
    return {"request": request, "seq": seq, "disks": [d.to_json() for d in disks]}


def read_seed_record(f: ItemFiles) -> dict[str, Any] | None:
    try:
        doc: dict[str, Any] = json.loads(f.seed.read_bytes())
    except FileNotFoundError:
        return None
    return doc


def check_source(disk: SeedDisk) -> None:
    """The image is a file no longer than the disk (a shorter one reads as zeros past its
    end, as a sparse image's tail does)."""
    try:
        st = os.stat(disk.path)
    except FileNotFoundError:
        raise ReplicaError(f"disk {disk.disk_id}: image {disk.path} does not exist") from None
    if not stat.S_ISREG(st.st_mode):
        raise ReplicaError(f"disk {disk.disk_id}: {disk.path} is not a file")
    if st.st_size > disk.size_bytes:
        raise ReplicaError(
            f"disk {disk.disk_id}: image {disk.path} is {st.st_size} bytes, longer than the "
            f"disk's {disk.size_bytes}"
        )


def copied(f: ItemFiles, disk_id: str) -> bool:
    """The disk's copy is complete (its leaves are in place only once the image is durable),
    in `seeding/` or already moved into `disks/`."""
    return seeding_leaves(f, disk_id).exists() or f.leaves(disk_id).exists()


def seeding_image(f: ItemFiles, disk_id: str) -> Path:
    return f.seeding / f"{disk_id}.vhdx"


def seeding_leaves(f: ItemFiles, disk_id: str) -> Path:
    return f.seeding / f"{disk_id}.leaves"


def copy_image(f: ItemFiles, disk: SeedDisk) -> MerkleTree:
    """Copy the image into `seeding/<disk>.vhdx` (all-zero blocks left as holes) and write its
    leaves, both fdatasync'ed, then rename the leaves into place (the copy is then complete).
    Returns the disk's tree. The caller checked the source (`check_source`)."""
    bs, size = disk.block_size, disk.size_bytes
    n = block_count(size, bs)
    tree = MerkleTree(n)
    step = max(1, _IO_CHUNK // bs)
    tmp_leaves = f.seeding / f"{disk.disk_id}.leaves.tmp"
    src = os.open(disk.path, os.O_RDONLY)
    img = os.open(seeding_image(f, disk.disk_id), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    lv = os.open(tmp_leaves, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(img, size)  # sparse: blocks never written read as zeros
        for first in range(0, n, step):
            count = min(step, n - first)
            data = os.pread(src, count * bs, first * bs)
            leaves = bytearray()
            for index in range(first, first + count):
                length = block_len(index, size, bs)
                block = data[(index - first) * bs : (index - first) * bs + length]
                if len(block) < length:  # past the file's end: zeros
                    block += bytes(length - len(block))
                leaf = block_hash(block)
                if leaf != zero_block_hash(length):
                    write_all(img, block, index * bs)
                tree.set_leaf(index, leaf, rehash=False)
                leaves += leaf
            write_all(lv, memoryview(leaves), first * HASH_SIZE)
        os.fdatasync(img)
        os.fdatasync(lv)
    finally:
        os.close(src)
        os.close(img)
        os.close(lv)
    os.replace(tmp_leaves, seeding_leaves(f, disk.disk_id))
    fsync_dir(f.seeding)
    tree.rebuild()
    return tree


def move_into_place(f: ItemFiles, disk_id: str) -> None:
    """The copied image, then its leaves, into `disks/` (idempotent: what moved stays)."""
    for src, dst in (
        (seeding_image(f, disk_id), f.image(disk_id)),
        (seeding_leaves(f, disk_id), f.leaves(disk_id)),
    ):
        if src.exists():
            os.replace(src, dst)
