"""Ships a source disk's cycles into a recovery-site replica (tests), and, run as
`python -m tests.support.site_replica_worker <root> <op> <item> <arg>`, performs one replica
operation in a child process that a test kills at a crash point (DR_CRASH_AT)."""

from __future__ import annotations

import hashlib
import random
import sys
import uuid
from pathlib import Path

from services.host_agent import differencing
from services.host_agent.replica import SiteReplica
from services.host_agent.replica_format import DiskState, Point
from services.host_agent.replica_seed import SeedDisk
from shared.merkle import block_count, block_hash
from shared.schemas.agent import LEAVES_PER_REPORT
from tests.support.store_worker import SourceDisk

BS = 4096
ITEM = "item-1"
SEED_REQUEST = "5eed0000-0000-4000-8000-000000000001"
SEED_BLOCKS = 2 * LEAVES_PER_REPORT + 5  # d0's blocks: three reports of leaves


def ship(replica: SiteReplica, item: str, seq: int, disks: list[SourceDisk]) -> Point:
    """Stage the changed blocks of every disk and the point (not applied); the disks then
    count as shipped."""
    states = []
    for disk in disks:
        changed = disk.changed()
        replica.stage_blocks(
            item, seq, [(disk.disk_id, i, block_hash(b), b) for i, b in changed.items()]
        )
        states.append(DiskState(disk.disk_id, len(disk.image), disk.block_size, disk.root()))
        disk.shipped = bytearray(disk.image)
    point = Point(seq, tuple(states))
    replica.stage_point(item, point)
    return point


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class History:
    """Two source disks shipped for `points` cycles (a grow at 3, a shrink at 5, zeroed
    blocks); the SHA-256 of each disk at each point."""

    def __init__(self, root: Path, points: int = 6) -> None:
        rng = random.Random(7)
        self.disks = [SourceDisk("d0", 64 * BS + 100, BS, rng), SourceDisk("d1", 16 * BS, BS, rng)]
        self.replica = SiteReplica(root)
        self.sha: dict[int, dict[str, str]] = {}
        self.roots: dict[int, dict[str, str]] = {}  # the source's Merkle roots at each point
        for d in self.disks:
            d.write_random(0.5)
        for seq in range(1, points + 1):
            self.cycle(seq)

    def cycle(self, seq: int) -> Point:
        d0, d1 = self.disks
        if seq > 1:
            d0.write_random(0.1)
            d1.write_random(0.2)
            d0.zero(d0.rng.sample(range(d0.blocks), 2))
        if seq == 3:
            d0.resize(80 * BS + 7)
        if seq == 5:
            d0.resize(50 * BS + 3000)
        point = ship(self.replica, ITEM, seq, self.disks)
        assert self.replica.apply(ITEM, seq) == point
        self.sha[seq] = {d.disk_id: d.sha256() for d in self.disks}
        self.roots[seq] = {d.disk_id: d.root() for d in self.disks}
        return point

    def missed(self, seqs: range) -> None:
        """The source changes through points `seqs` that the replica never gets (its host
        was down past its feed's retention): only their SHA-256s are noted."""
        for seq in seqs:
            for d in self.disks:
                d.write_random(0.1)
            self.sha[seq] = {d.disk_id: d.sha256() for d in self.disks}

    def catch_up(self, seq: int) -> Point:
        """Stage point `seq` over what the replica holds (every block that differs from the
        last point shipped), not applied."""
        point = ship(self.replica, ITEM, seq, self.disks)
        self.sha[seq] = {d.disk_id: d.sha256() for d in self.disks}
        self.roots[seq] = {d.disk_id: d.root() for d in self.disks}
        return point

    def images(self) -> dict[str, str]:
        return {d.disk_id: sha(self.replica.image_path(ITEM, d.disk_id)) for d in self.disks}


def seed_disks(folder: Path, d0_blocks: int = SEED_BLOCKS) -> list[SeedDisk]:
    """Two images to seed a replica from (`write_seed_images` writes them): d0 of 64-byte
    blocks, its last one short; d1 of 4 KiB blocks, its file shorter than the disk."""
    return [
        SeedDisk("d0", folder / "d0.vhdx", d0_blocks * 64 - 20, 64),
        SeedDisk("d1", folder / "d1.vhdx", 40 * BS + 100, BS),
    ]


def write_seed_images(folder: Path, d0_blocks: int = SEED_BLOCKS) -> list[SeedDisk]:
    """The images of `seed_disks`: d0 random with 50 all-zero blocks; d1 a sparse file (a hole
    over blocks 2-5) that ends inside block 10 of its 41 (reads as zeros past its end)."""
    rng = random.Random(11)
    disks = seed_disks(folder, d0_blocks)
    folder.mkdir(parents=True, exist_ok=True)
    d0 = bytearray(rng.randbytes(disks[0].size_bytes))
    for i in rng.sample(range(d0_blocks - 1), min(50, d0_blocks // 2)):
        d0[i * 64 : (i + 1) * 64] = bytes(64)
    disks[0].path.write_bytes(d0)
    with disks[1].path.open("wb") as fh:
        fh.write(rng.randbytes(2 * BS))
        fh.seek(6 * BS)
        fh.write(rng.randbytes(4 * BS + 33))
    return disks


def seed_bytes(disk: SeedDisk) -> bytes:
    """The disk an image file stands for (zeros past the file's end)."""
    data = disk.path.read_bytes()
    return data + bytes(disk.size_bytes - len(data))


def seed_leaves(disk: SeedDisk) -> bytes:
    data, bs = seed_bytes(disk), disk.block_size
    n = block_count(disk.size_bytes, bs)
    return b"".join(block_hash(data[i * bs : (i + 1) * bs]) for i in range(n))


def seeded_sources(
    images: list[SeedDisk], contents: dict[str, bytes], rng: random.Random
) -> list[SourceDisk]:
    """Source disks holding what the images seeded (`contents`: disk id -> `seed_bytes`),
    counted as shipped: later points ship what changes."""
    disks = []
    for image in images:
        disk = SourceDisk(image.disk_id, image.size_bytes, image.block_size, rng)
        disk.image[:] = disk.shipped[:] = contents[image.disk_id]
        disks.append(disk)
    return disks


def differencing_disks(replica: SiteReplica, seq: int, target: Path) -> dict[str, Path]:
    """Differencing disks (a test failover) over point `seq` of the item in `target`, the
    view named after the folder (a repeated call finds it); the point's disks as HEAD or the
    view holds them."""
    view = uuid.uuid5(uuid.NAMESPACE_URL, str(target)).hex
    if seq == replica.head(ITEM).seq:
        disks = list(replica.head(ITEM).disks)
    else:
        probe = replica.freeze(ITEM, seq)
        disks = list(replica.view_point(ITEM, probe).disks)
        replica.drop_view(ITEM, probe)
    return differencing.create(replica, ITEM, seq, view, target, disks)


def main(argv: list[str]) -> None:
    root, op, item, arg = argv
    replica = SiteReplica(Path(root))
    if op == "differencing":  # arg: <seq>:<target folder>
        seq, _, target = arg.partition(":")
        differencing_disks(replica, int(seq), Path(target))
    elif op == "delete_folder":
        differencing.delete_folder(replica, Path(arg))
    elif op == "apply":
        replica.apply(item, int(arg))
    elif op == "catch_up":  # arg: <seq>:<the point it follows>
        seq, _, base = arg.partition(":")
        replica.apply(item, int(seq), int(base))
    elif op == "rollback":
        replica.rollback(item, int(arg))
    elif op == "prune":
        replica.prune(item, int(arg))
    elif op == "recover":
        replica.recover(item)
    elif op == "seed":  # arg: the folder of `write_seed_images`
        replica.seed(item, 1, SEED_REQUEST, seed_disks(Path(arg)))
    else:
        raise SystemExit(f"unknown op {op}")


if __name__ == "__main__":
    main(sys.argv[1:])
