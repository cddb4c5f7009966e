"""Differencing disks over a frozen view of the recovery-site replica (a test failover): the VM
reads the point byte for byte while later points apply to the replica; its writes stay in the
overlay; nothing is copied; creating is idempotent and checked against the point's roots;
deleting the disks releases the view, and a view whose disks are gone is dropped."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path
from typing import Any

import pytest

from services.host_agent import differencing
from services.host_agent.differencing import DifferencingError
from services.host_agent.replica import SiteReplica
from services.host_agent.replica_feed import ReplicaFeed
from services.host_agent.replica_format import DiskState, Point, ReplicaError
from services.host_agent.wiring import CommandFailed
from shared.schemas.agent import (
    DifferencingDisksRequested,
    ReplicaDisk,
    ReplicaHandoverRequested,
)
from tests.support.site_replica_worker import BS, ITEM, History, sha


class Recorded(History):
    """A History that keeps each point it shipped."""

    def __init__(self, root: Path, points: int = 6) -> None:
        self.points: dict[int, Point] = {}
        super().__init__(root, points)

    def cycle(self, seq: int) -> Point:
        point = super().cycle(seq)
        self.points[seq] = point
        return point


def _point_disks(h: Recorded, seq: int) -> list[DiskState]:
    """The point's disks with the source's roots."""
    return list(h.points[seq].disks)


def _overlays(h: Recorded, seq: int, target: Path, request: uuid.UUID) -> dict[str, Path]:
    view = differencing.view_id_of(request)
    return differencing.create(h.replica, ITEM, seq, view, target, _point_disks(h, seq))


def test_the_vm_reads_the_point_while_later_points_apply(tmp_path: Path) -> None:
    h = Recorded(tmp_path / "state", points=3)
    target = tmp_path / "storage" / "web-test"
    paths = _overlays(h, 2, target, uuid.uuid4())
    assert sorted(p.name for p in paths.values()) == ["d0.avhdx", "d1.avhdx"]
    for seq in range(4, 8):  # replication carries on into the replica
        h.cycle(seq)
    assert h.replica.head(ITEM).seq == 7
    for disk_id, path in paths.items():
        assert differencing.sha256(h.replica, path) == h.sha[2][disk_id]
        assert path.stat().st_size == h.points[2].disk(disk_id).size_bytes  # type: ignore[union-attr]
        assert differencing.space_used(path) < 64 * 1024  # no block copied
    # a fresh process reads the same (the view and its records are on disk)
    again = SiteReplica(tmp_path / "state")
    assert differencing.sha256(again, paths["d1"]) == h.sha[2]["d1"]
    # the view's roots are the point's
    view = differencing.parent_of(paths["d0"]).view
    assert h.replica.view_point(ITEM, view).roots() == h.points[2].roots()


def test_writes_stay_in_the_overlay(tmp_path: Path) -> None:
    h = Recorded(tmp_path / "state", points=2)
    paths = _overlays(h, 2, tmp_path / "storage" / "t", uuid.uuid4())
    images = h.images()
    d1 = paths["d1"]
    size = h.points[2].disk("d1").size_bytes  # type: ignore[union-attr]
    expected = bytearray(differencing.read_blocks(h.replica, d1, 0, size // BS + 1))
    data = bytes([7]) * BS
    differencing.write_block(d1, 3, data, BS)
    expected[3 * BS : 4 * BS] = data
    assert differencing.read_blocks(h.replica, d1, 0, size // BS + 1) == bytes(expected)
    assert differencing.sha256(h.replica, d1) == hashlib.sha256(expected).hexdigest()
    assert differencing.read_blocks(h.replica, d1, 3, 1) == data
    assert h.images() == images  # the replica is untouched
    view = differencing.parent_of(d1).view
    assert h.replica.view_sha256(ITEM, view, "d1") == h.sha[2]["d1"]
    h.cycle(3)
    assert differencing.read_blocks(h.replica, d1, 3, 1) == data  # still the overlay's
    with pytest.raises(DifferencingError, match="past the end"):
        differencing.write_block(d1, 10_000, data, BS)
    with pytest.raises(DifferencingError, match="takes 4096 bytes"):
        differencing.write_block(d1, 0, b"x", BS)
    with pytest.raises(DifferencingError, match="4096-byte blocks"):
        differencing.write_block(d1, 0, data, 2 * BS)


def test_creating_is_idempotent_and_checked_against_the_points_roots(tmp_path: Path) -> None:
    h = Recorded(tmp_path / "state", points=3)
    target = tmp_path / "storage" / "t"
    request = uuid.uuid4()
    first = _overlays(h, 2, target, request)
    differencing.write_block(first["d0"], 1, bytes([9]) * BS, BS)
    assert _overlays(h, 2, target, request) == first  # a repeated command: nothing redone
    assert differencing.read_blocks(h.replica, first["d0"], 1, 1) == bytes([9]) * BS
    assert list(h.replica.views(ITEM).values()) == [2]

    wrong = [DiskState(d.disk_id, d.size_bytes, d.block_size, "0" * 64) for d in _point_disks(h, 1)]
    other = tmp_path / "storage" / "u"
    with pytest.raises(DifferencingError, match="root at point 1 is not the source's"):
        differencing.create(h.replica, ITEM, 1, uuid.uuid4().hex, other, wrong)
    assert list(h.replica.views(ITEM).values()) == [2]  # no view left behind
    assert not other.exists() or not list(other.glob("*.avhdx*"))
    with pytest.raises(ReplicaError, match="not retained"):
        differencing.create(h.replica, ITEM, 9, uuid.uuid4().hex, other, _point_disks(h, 3))


def test_deleting_the_disks_releases_the_view_and_orphans_are_dropped(tmp_path: Path) -> None:
    h = Recorded(tmp_path / "state", points=3)
    kept = _overlays(h, 2, tmp_path / "storage" / "a", uuid.uuid4())
    gone = _overlays(h, 3, tmp_path / "storage" / "b", uuid.uuid4())
    assert sorted(h.replica.views(ITEM).values()) == [2, 3]
    assert h.replica.prune(ITEM, 3) == 2  # records 1-2; the view of point 2 pins the rest
    # the folder of the second VM removed without dropping its view (a kill in between)
    views = differencing.views_in(gone["d0"].parent)
    for path in gone["d0"].parent.iterdir():
        path.unlink()
    h.cycle(4)
    assert h.replica.prune(ITEM, 4) == 0  # the orphan dropped; the view of point 2 still pins
    assert sorted(h.replica.views(ITEM).values()) == [2]
    differencing.drop_views(h.replica, views)  # dropping it again is harmless
    assert differencing.sha256(h.replica, kept["d0"]) == h.sha[2]["d0"]
    differencing.discard_disks(h.replica, list(kept.values()))
    assert h.replica.views(ITEM) == {}
    assert h.replica.prune(ITEM, 4) == 2
    assert h.replica.retained(ITEM) == [4]


def test_a_view_without_owners_is_kept_and_one_whose_owner_names_another_is_not(
    tmp_path: Path,
) -> None:
    h = Recorded(tmp_path / "state", points=2)
    plain = h.replica.freeze(ITEM, 1)
    owner = tmp_path / "owner.json"
    owner.write_text('{"view": "someone-else"}')
    h.replica.freeze(ITEM, 2, uuid.uuid4().hex, owners=[owner])
    assert h.replica.views(ITEM) == {plain: 1}
    with pytest.raises(ReplicaError, match="bad view id"):
        h.replica.freeze(ITEM, 2, "../x")


def test_an_older_view_over_resized_disks_reads_each_retained_point(tmp_path: Path) -> None:
    h = Recorded(tmp_path / "state")  # d0 grows at 3 and shrinks at 5
    overlays = {
        seq: _overlays(h, seq, tmp_path / "storage" / f"v{seq}", uuid.uuid4())
        for seq in h.replica.retained(ITEM)
    }
    h.cycle(7)
    for seq, paths in overlays.items():
        for disk_id, path in paths.items():
            assert differencing.sha256(h.replica, path) == h.sha[seq][disk_id], (seq, disk_id)
    # the replica's images are still its HEAD's
    assert {d: sha(h.replica.image_path(ITEM, d)) for d in ("d0", "d1")} == h.sha[7]


def _command(kind: type[Any], h: Recorded, seq: int, target: Path) -> Any:
    """The agent command for point `seq` (a point past the history: the latest's disks)."""
    disks = h.points[min(seq, max(h.points))].disks
    return kind(
        command_id=uuid.uuid4(),
        agent_id=uuid.uuid4(),
        item_id=uuid.UUID(int=1),
        request_id=uuid.uuid4(),
        cycle_seq=seq,
        target_dir=str(target),
        disks=[
            ReplicaDisk(
                disk_id=d.disk_id,
                size_bytes=d.size_bytes,
                block_size=d.block_size,
                merkle_root=d.merkle_root,
            )
            for d in disks
        ],
    )


async def test_the_agent_command_creates_them_and_a_handover_waits_for_cleanup(
    tmp_path: Path,
) -> None:
    storage = tmp_path / "storage"
    storage.mkdir()
    h = Recorded(tmp_path / "state", points=3)
    item = str(uuid.UUID(int=1))
    (tmp_path / "state" / "replica" / ITEM).rename(tmp_path / "state" / "replica" / item)
    h.replica = SiteReplica(tmp_path / "state")
    feed = ReplicaFeed(h.replica, "127.0.0.1:1", "", storage, agent_id="a")
    with pytest.raises(CommandFailed, match="not a folder in this host's storage"):
        await feed.differencing(_command(DifferencingDisksRequested, h, 2, tmp_path / "x"))
    with pytest.raises(CommandFailed, match="not a folder in this host's storage"):
        await feed.differencing(_command(DifferencingDisksRequested, h, 2, storage / ".."))
    with pytest.raises(CommandFailed, match="not retained"):
        await feed.differencing(_command(DifferencingDisksRequested, h, 9, storage / "t"))
    command = _command(DifferencingDisksRequested, h, 2, storage / "t")
    result = await feed.differencing(command)
    assert [Path(d["path"]).name for d in result["disks"]] == ["d0.avhdx", "d1.avhdx"]
    assert await feed.differencing(command) == result  # a repeated command
    for d in result["disks"]:
        assert differencing.sha256(h.replica, Path(d["path"])) == h.sha[2][d["disk_id"]]
    handover = _command(ReplicaHandoverRequested, h, 3, storage / "web")
    with pytest.raises(CommandFailed, match="not handed over while they exist"):
        await feed.handover(handover)
    differencing.delete_folder(h.replica, storage / "t")
    await feed.handover(handover)  # the test cleaned up: the replica is handed over
    assert (storage / "web" / "d0.avhdx").exists() is False
    assert sha(storage / "web" / "d0.vhdx") == h.sha[3]["d0"]
    with pytest.raises(CommandFailed, match="keeps no replica"):
        await feed.differencing(_command(DifferencingDisksRequested, h, 3, storage / "u"))
