"""kill -9 while a test failover's differencing disks are created over a frozen view of the
recovery-site replica, and while they are deleted: no view stays pinned once no disk names it
(the next process drops it when it recovers or prunes), a repeated creation finishes the
disks, the replica's images and every retained point stay byte-identical, and replication
goes on.

Runs the operation in a child process with DR_CRASH_AT (shared.faults); needs no Kafka or
PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.host_agent import differencing
from services.host_agent.replica import SiteReplica
from tests.integration.test_site_replica_crash import check, run
from tests.support.site_replica_worker import ITEM, History, differencing_disks


def fresh(h: History, root: Path) -> SiteReplica:
    """A new process's replica, checked (HEAD byte-identical, retained points readable)."""
    replica = check(h, root)
    h.replica = replica
    return replica


# the worker reads the point's disks through a short-lived view first: the view the disks sit
# on is the second one frozen
@pytest.mark.parametrize("crash_at", ["replica.view.frozen@2", "differencing.created@1"])
def test_kill_9_while_creating(tmp_path: Path, crash_at: str) -> None:
    state, target = tmp_path / "state", tmp_path / "storage" / "t1"
    h = History(state)
    run(state, "differencing", f"4:{target}", crash_at)
    replica = fresh(h, state)
    if crash_at.startswith("replica.view.frozen"):
        # no disk names the view: dropped by recovery, the undo records no longer pinned
        assert replica.views(ITEM) == {}
        assert replica.prune(ITEM, 6) == 6
        assert replica.retained(ITEM) == [6]
        return
    # one disk made: the view is kept for it, and the repeated command finishes the rest
    assert list(replica.views(ITEM).values()) == [4]
    paths = differencing_disks(replica, 4, target)
    h.cycle(7)  # replication goes on into the replica
    for disk_id, path in paths.items():
        assert differencing.sha256(replica, path) == h.sha[4][disk_id]
    assert replica.prune(ITEM, 7) == 4  # records 1-4; the view pins 5-7
    assert replica.retained(ITEM) == [4, 5, 6, 7]


def test_kill_9_while_deleting(tmp_path: Path) -> None:
    state, target = tmp_path / "state", tmp_path / "storage" / "t2"
    h = History(state)
    paths = differencing_disks(h.replica, 3, target)
    assert differencing.sha256(h.replica, paths["d0"]) == h.sha[3]["d0"]
    run(state, "delete_folder", str(target), "differencing.folder_removed")
    assert not target.exists()
    replica = fresh(h, state)
    assert replica.views(ITEM) == {}  # the view its disks held is not pinned forever
    h.cycle(7)
    assert replica.prune(ITEM, 7) == 7
    assert replica.retained(ITEM) == [7]


def test_a_view_left_by_a_kill_is_dropped_by_pruning_a_running_replica(tmp_path: Path) -> None:
    state, target = tmp_path / "state", tmp_path / "storage" / "t3"
    h = History(state)
    replica = h.replica
    assert replica.views(ITEM) == {}  # recovered once in this process
    paths = differencing_disks(replica, 5, target)
    for path in paths.values():  # the disks deleted behind the replica's back
        for file in target.glob(f"{path.name}*"):
            file.unlink()
    h.cycle(7)
    assert replica.prune(ITEM, 7) == 7  # the orphaned view pins nothing
    assert replica.views(ITEM) == {}
