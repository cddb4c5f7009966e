"""The recovery-site replica: images at the latest point, byte-identical to the source at each
cycle; the undo journal returns them to any retained point; frozen views hold a point while
later points are applied; retention prunes the journal; a wrong root is undone."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.host_agent.replica import SiteReplica
from services.host_agent.replica_format import (
    BlockHashMismatch,
    DiskState,
    Point,
    ReplicaError,
    RootMismatch,
)
from shared.merkle import block_hash
from tests.support.site_replica_worker import BS, ITEM, History, ship


def test_every_point_applied_is_byte_identical_with_the_sources_roots(tmp_path: Path) -> None:
    h = History(tmp_path, points=1)
    assert h.images() == h.sha[1]
    for seq in range(2, 7):
        point = h.cycle(seq)
        assert h.images() == h.sha[seq], seq
        assert h.replica.roots(ITEM) == point.roots() == {d.disk_id: d.root() for d in h.disks}
    assert h.replica.head(ITEM).seq == 6
    assert h.replica.retained(ITEM) == [1, 2, 3, 4, 5, 6]
    # a fresh process reads the same (no cache)
    assert SiteReplica(tmp_path).roots(ITEM) == h.replica.roots(ITEM)
    assert not list((tmp_path / "replica" / ITEM / "staged").iterdir())


def test_rollback_returns_to_each_older_point(tmp_path: Path) -> None:
    h = History(tmp_path)
    for seq in (5, 4, 2):
        head = h.replica.rollback(ITEM, seq)
        assert head.seq == seq and h.images() == h.sha[seq], seq
        # the roots the source had, from the trees kept along and from the leaves alone
        assert head.roots() == h.replica.roots(ITEM) == h.roots[seq], seq
        assert SiteReplica(tmp_path).roots(ITEM) == h.roots[seq], seq
    assert h.replica.retained(ITEM) == [1, 2]
    with pytest.raises(ReplicaError, match="not retained"):
        h.replica.rollback(ITEM, 4)


def test_a_frozen_view_holds_its_point_while_later_points_apply(tmp_path: Path) -> None:
    h = History(tmp_path, points=2)
    view = h.replica.freeze(ITEM, 2)
    for seq in range(3, 7):
        h.cycle(seq)
    for disk_id, expected in h.sha[2].items():
        assert h.replica.view_sha256(ITEM, view, disk_id) == expected
    with pytest.raises(ReplicaError, match="frozen views"):
        h.replica.rollback(ITEM, 1)
    assert h.replica.prune(ITEM, 5) == 2  # records 1-2; the view pins those above point 2
    assert h.replica.retained(ITEM) == [2, 3, 4, 5, 6]
    h.replica.drop_view(ITEM, view)
    assert h.replica.prune(ITEM, 5) == 3
    assert h.replica.retained(ITEM) == [5, 6]
    assert h.images() == h.sha[6]


def test_a_point_whose_roots_differ_is_undone(tmp_path: Path) -> None:
    h = History(tmp_path, points=2)
    h.disks[0].write_random(0.1)
    good = ship(h.replica, ITEM, 3, h.disks)
    wrong = Point(3, (DiskState("d0", good.disks[0].size_bytes, BS, "00" * 32), good.disks[1]))
    h.replica.stage_point(ITEM, wrong)
    with pytest.raises(RootMismatch):
        h.replica.apply(ITEM, 3)
    assert h.replica.head(ITEM).seq == 2 and h.images() == h.sha[2]
    assert h.replica.retained(ITEM) == [1, 2]
    h.replica.stage_point(ITEM, good)  # the right point then applies
    assert h.replica.apply(ITEM, 3) == good


def test_staging_checks_hashes_and_ignores_applied_points(tmp_path: Path) -> None:
    h = History(tmp_path, points=2)
    data = bytes(BS)
    with pytest.raises(BlockHashMismatch, match="block 3 of disk d0"):
        h.replica.stage_blocks(ITEM, 3, [("d0", 3, block_hash(b"x"), data)])
    assert h.replica.stage_blocks(ITEM, 2, [("d0", 3, block_hash(data), data)]) == 0
    with pytest.raises(ReplicaError, match="cannot follow"):
        h.replica.apply(ITEM, 5)
    with pytest.raises(ReplicaError, match="not staged"):
        h.replica.apply(ITEM, 3)
    assert h.replica.apply(ITEM, 2).seq == 2  # applied already: a no-op
