"""kill -9 at every crash point of the recovery-site replica's apply, rollback (undo) and prune,
and of a recovery that is itself interrupted: after recovery the images equal the point HEAD
names byte for byte, every retained point is still reachable and byte-identical, no staged or
temp file of an applied point stays, and the replica goes on working.

Runs the operation in a child process with DR_CRASH_AT (shared.faults); needs no Kafka or
PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from services.host_agent.replica import SiteReplica
from tests.support.site_replica_worker import ITEM, History, ship

REPO = Path(__file__).resolve().parents[2]
APPLY_POINTS = [
    "replica.apply.undo_written",
    "replica.apply.blocks_written",
    "replica.apply.head_moved",
    "replica.apply.unstaged",
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
