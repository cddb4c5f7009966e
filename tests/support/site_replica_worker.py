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
from shared.merkle import block_hash
from tests.support.store_worker import SourceDisk

BS = 4096
ITEM = "item-1"


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

    def images(self) -> dict[str, str]:
        return {d.disk_id: sha(self.replica.image_path(ITEM, d.disk_id)) for d in self.disks}


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
    elif op == "rollback":
        replica.rollback(item, int(arg))
    elif op == "prune":
        replica.prune(item, int(arg))
    elif op == "recover":
        replica.recover(item)
    else:
        raise SystemExit(f"unknown op {op}")


if __name__ == "__main__":
    main(sys.argv[1:])
