"""kill -9 at every crash point of the recovery-site replica's apply, rollback (undo), prune and
seed, and of a recovery that is itself interrupted: after recovery the images equal the point HEAD
names byte for byte, every retained point is still reachable and byte-identical, no staged or
temp file of an applied point stays, and the replica goes on working.

Runs the operation in a child process with DR_CRASH_AT (shared.faults); needs no Kafka or
PostgreSQL."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from services.host_agent.replica import SiteReplica
from shared.merkle import MerkleTree
from tests.support.site_replica_worker import (
    ITEM,
    SEED_REQUEST,
    History,
    seed_bytes,
    seed_disks,
    seed_leaves,
    seeded_sources,
    sha,
    ship,
    write_seed_images,
)

REPO = Path(__file__).resolve().parents[2]
APPLY_POINTS = [
    "replica.apply.undo_written",
    "replica.apply.blocks_written",
    "replica.apply.head_moved",
    "replica.apply.unstaged",
]
SEED_POINTS = [
    "replica.seed.started",
    "replica.seed.disk_copied",
    "replica.seed.disk_copied@2",
    "replica.seed.images_moved",
    "replica.seed.head_moved",
]
UNDO_POINTS = [
    "replica.undo.started",
    "replica.undo.blocks_restored@2",
    "replica.undo.head_moved@2",
    "replica.undo.dropped@2",
]


def run(root: Path, op: str, arg: str, crash_at: str) -> None:
    child = subprocess.run(
        [sys.executable, "-m", "tests.support.site_replica_worker", str(root), op, ITEM, arg],
        cwd=REPO,
        env={**os.environ, "DR_CRASH_AT": crash_at},
        capture_output=True,
        timeout=60,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]


def check(h: History, root: Path) -> SiteReplica:
    """A new process's replica: HEAD's images byte-identical, every retained point reachable
    (read through a frozen view) and byte-identical, nothing left over."""
    replica = SiteReplica(root)
    head = replica.head(ITEM)
    h.replica = replica
    assert h.images() == h.sha[head.seq]
    assert replica.roots(ITEM) == head.roots()
    for seq in replica.retained(ITEM):
        view = replica.freeze(ITEM, seq)
        for disk_id, expected in h.sha[seq].items():
            assert replica.view_sha256(ITEM, view, disk_id) == expected, (seq, disk_id)
        replica.drop_view(ITEM, view)
    item = root / "replica" / ITEM
    assert not (item / "ROLLBACK.json").exists()
    assert not (item / "tmp").exists() or not list((item / "tmp").iterdir())
    staged = [p.name for p in (item / "staged").iterdir()] if (item / "staged").exists() else []
    assert all(int(name[:12]) > head.seq for name in staged), staged
    return replica


@pytest.mark.parametrize("crash_at", APPLY_POINTS)
def test_kill_9_mid_apply(tmp_path: Path, crash_at: str) -> None:
    h = History(tmp_path)
    for d in h.disks:
        d.write_random(0.2)
    h.disks[0].resize(70 * 4096 + 5)
    ship(h.replica, ITEM, 7, h.disks)
    h.sha[7] = {d.disk_id: d.sha256() for d in h.disks}
    run(tmp_path, "apply", "7", crash_at)
    replica = check(h, tmp_path)
    # past the undo record the apply is rolled forward; it never stays half-done
    assert replica.head(ITEM).seq == 7
    assert replica.retained(ITEM) == [1, 2, 3, 4, 5, 6, 7]
    h.cycle(8)  # goes on
    assert replica.rollback(ITEM, 4).seq == 4 and h.images() == h.sha[4]


@pytest.mark.parametrize("crash_at", APPLY_POINTS)
def test_kill_9_mid_catch_up(tmp_path: Path, crash_at: str) -> None:
    """A point that follows an older one (the replica missed those between)."""
    h = History(tmp_path)
    h.missed(range(7, 10))
    h.catch_up(10)
    run(tmp_path, "catch_up", "10:6", crash_at)
    replica = check(h, tmp_path)
    assert replica.head(ITEM).seq == 10
    assert replica.retained(ITEM) == [1, 2, 3, 4, 5, 6, 10]
    h.cycle(11)
    assert replica.rollback(ITEM, 5).seq == 5 and h.images() == h.sha[5]


@pytest.mark.parametrize("crash_at", UNDO_POINTS)
def test_kill_9_mid_rollback(tmp_path: Path, crash_at: str) -> None:
    h = History(tmp_path)
    run(tmp_path, "rollback", "3", crash_at)
    replica = check(h, tmp_path)
    # a rollback once started (its intent durable) is finished by recovery
    assert replica.head(ITEM).seq == 3 and replica.retained(ITEM) == [1, 2, 3]
    assert replica.rollback(ITEM, 2).seq == 2 and h.images() == h.sha[2]


def test_kill_9_mid_prune(tmp_path: Path) -> None:
    h = History(tmp_path)
    run(tmp_path, "prune", "4", "replica.prune.dropped@2")
    replica = check(h, tmp_path)
    assert replica.retained(ITEM) == [2, 3, 4, 5, 6]  # records 1-2 gone, 3-4 not yet
    assert replica.prune(ITEM, 4) == 2
    assert replica.retained(ITEM) == [4, 5, 6]
    h.cycle(7)


def test_kill_9_during_recovery_of_a_killed_apply(tmp_path: Path) -> None:
    h = History(tmp_path)
    for d in h.disks:
        d.write_random(0.3)
    ship(h.replica, ITEM, 7, h.disks)
    h.sha[7] = {d.disk_id: d.sha256() for d in h.disks}
    run(tmp_path, "apply", "7", "replica.apply.blocks_written")
    run(tmp_path, "recover", "-", "replica.apply.blocks_written")  # the roll-forward killed
    replica = check(h, tmp_path)
    assert replica.head(ITEM).seq == 7
    h.cycle(8)


@pytest.mark.parametrize("crash_at", SEED_POINTS)
def test_kill_9_mid_seed(tmp_path: Path, crash_at: str) -> None:
    images = write_seed_images(tmp_path / "src")
    expected = {d.disk_id: seed_bytes(d) for d in images}
    leaves = {d.disk_id: seed_leaves(d) for d in images}
    roots = {
        d.disk_id: MerkleTree.from_leaves(
            (leaves[d.disk_id][i : i + 32] for i in range(0, len(leaves[d.disk_id]), 32)),
            len(leaves[d.disk_id]) // 32,
        ).root_hex()
        for d in images
    }
    run(tmp_path, "seed", str(tmp_path / "src"), crash_at)
    replica = SiteReplica(tmp_path)
    # the replica exists once HEAD names it, complete; before, it is not there at all
    assert replica.head(ITEM).seq == (1 if crash_at == "replica.seed.head_moved" else 0)
    if crash_at == "replica.seed.disk_copied":
        images[0].path.unlink()  # copied completely: the re-run does not read it again
    point = replica.seed(ITEM, 1, SEED_REQUEST, seed_disks(tmp_path / "src"))
    assert point.roots() == roots == SiteReplica(tmp_path).roots(ITEM)
    for disk_id, data in expected.items():
        assert replica.image_path(ITEM, disk_id).read_bytes() == data, disk_id
        assert replica.leaves(ITEM, disk_id, 0, 1 << 30) == leaves[disk_id]
    item = tmp_path / "replica" / ITEM
    assert not (item / "seeding").exists()
    assert not (item / "tmp").exists() or not list((item / "tmp").iterdir())
    # goes on: a point applies on top, and rolls back to the seed
    disks = seeded_sources(images, expected, random.Random(3))
    for d in disks:
        d.write_random(0.1)
    ship(replica, ITEM, 2, disks)
    assert replica.apply(ITEM, 2).seq == 2
    assert {d.disk_id: sha(replica.image_path(ITEM, d.disk_id)) for d in disks} == {
        d.disk_id: d.sha256() for d in disks
    }
    assert replica.rollback(ITEM, 1) == point


def test_kill_9_during_the_rerun_of_a_killed_seed(tmp_path: Path) -> None:
    images = write_seed_images(tmp_path / "src")
    run(tmp_path, "seed", str(tmp_path / "src"), "replica.seed.disk_copied")
    run(tmp_path, "seed", str(tmp_path / "src"), "replica.seed.images_moved")
    replica = SiteReplica(tmp_path)
    assert replica.head(ITEM).seq == 0
    replica.seed(ITEM, 1, SEED_REQUEST, images)
    for image in images:
        assert replica.image_path(ITEM, image.disk_id).read_bytes() == seed_bytes(image)
