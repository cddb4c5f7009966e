"""The recovery-site replica: images at the latest point, byte-identical to the source at each
cycle; the undo journal returns them to any retained point; frozen views hold a point while
later points are applied; retention prunes the journal; a wrong root is undone."""

from __future__ import annotations

import random
from dataclasses import replace
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
from shared.merkle import block_hash, disk_root
from tests.support.site_replica_worker import (
    BS,
    ITEM,
    SEED_REQUEST,
    History,
    seed_bytes,
    seed_leaves,
    seeded_sources,
    ship,
    write_seed_images,
)
from tests.support.site_replica_worker import sha as sha256


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


def test_a_replica_that_missed_points_catches_up_over_the_point_it_holds(tmp_path: Path) -> None:
    h = History(tmp_path, points=4)
    view = h.replica.freeze(ITEM, 3)
    h.missed(range(5, 9))
    point = h.catch_up(9)
    with pytest.raises(ReplicaError, match="cannot follow"):
        h.replica.apply(ITEM, 9)  # not over point 8, which it never had
    with pytest.raises(ReplicaError, match="cannot follow"):
        h.replica.apply(ITEM, 9, 3)  # nor over another point than HEAD
    assert h.replica.apply(ITEM, 9, 4) == point
    assert h.images() == h.sha[9] and h.replica.roots(ITEM) == h.roots[9]
    assert h.replica.apply(ITEM, 9, 4) == point  # idempotent
    assert h.replica.retained(ITEM) == [1, 2, 3, 4, 9]
    assert SiteReplica(tmp_path).retained(ITEM) == [1, 2, 3, 4, 9]  # from the records alone
    for disk_id, expected in h.sha[3].items():  # a view from before reads across it
        assert h.replica.view_sha256(ITEM, view, disk_id) == expected
    h.replica.drop_view(ITEM, view)
    h.cycle(10)  # the next point follows as usual
    assert h.replica.retained(ITEM) == [1, 2, 3, 4, 9, 10]
    assert h.replica.prune(ITEM, 9) == 5  # records 1-4, and 9 (it returns to point 4)
    assert h.replica.retained(ITEM) == [9, 10]
    h.missed(range(11, 13))
    h.catch_up(13)
    h.replica.apply(ITEM, 13, 10)
    for seq in (10, 9):
        assert h.replica.rollback(ITEM, seq).seq == seq
        assert h.images() == h.sha[seq] and h.replica.roots(ITEM) == h.roots[seq], seq
    with pytest.raises(ReplicaError, match="not retained"):
        h.replica.rollback(ITEM, 4)


def test_an_empty_replica_catches_up_from_nothing(tmp_path: Path) -> None:
    h = History(tmp_path, points=2)
    h.replica.delete_item(ITEM)  # its host lost it
    for d in h.disks:
        d.shipped = bytearray(len(d.image))  # every block differs from nothing
    h.missed(range(3, 5))
    h.catch_up(5)
    assert h.replica.apply(ITEM, 5, 0).seq == 5
    assert h.images() == h.sha[5] and h.replica.retained(ITEM) == [5]


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


def test_a_seeded_replica_is_a_byte_copy_of_its_images(tmp_path: Path) -> None:
    disks = write_seed_images(tmp_path / "src")
    replica = SiteReplica(tmp_path)
    point = replica.seed(ITEM, 1, SEED_REQUEST, disks)
    assert point.seq == replica.head(ITEM).seq == 1
    for disk in disks:
        assert replica.image_path(ITEM, disk.disk_id).read_bytes() == seed_bytes(disk)
        root = disk_root(disk.path, disk.size_bytes, disk.block_size)
        assert point.disk(disk.disk_id) == DiskState(
            disk.disk_id, disk.size_bytes, disk.block_size, root
        )
        leaves = seed_leaves(disk)
        assert replica.leaves(ITEM, disk.disk_id, 0, 1 << 30) == leaves
        assert replica.leaves(ITEM, disk.disk_id, 3, 5) == leaves[3 * 32 : 8 * 32]
    assert replica.roots(ITEM) == SiteReplica(tmp_path).roots(ITEM) == point.roots()
    assert replica.retained(ITEM) == [1]
    assert not (tmp_path / "replica" / ITEM / "seeding").exists()


def test_a_seed_is_idempotent_and_never_replaces_a_replica(tmp_path: Path) -> None:
    disks = write_seed_images(tmp_path / "src", d0_blocks=100)
    replica = SiteReplica(tmp_path)
    point = replica.seed(ITEM, 1, SEED_REQUEST, disks)
    for disk in disks:
        disk.path.unlink()  # the same seed again reads nothing
    assert replica.seed(ITEM, 1, SEED_REQUEST, disks) == point
    assert replica.seeded(ITEM, 1, SEED_REQUEST, disks) == point
    others = {
        "another request": (1, "5eed0000-0000-4000-8000-000000000002", disks),
        "another point": (2, SEED_REQUEST, disks),
        "other images": (1, SEED_REQUEST, write_seed_images(tmp_path / "other", 100)),
    }
    for what, (seq, request, images) in others.items():
        assert replica.seeded(ITEM, seq, request, images) is None, what
        with pytest.raises(ReplicaError, match="is at point 1, not seeded"):
            replica.seed(ITEM, seq, request, images)
    assert replica.head(ITEM) == point


def test_a_seed_from_a_missing_or_longer_image_is_refused(tmp_path: Path) -> None:
    disks = write_seed_images(tmp_path / "src", d0_blocks=100)
    replica = SiteReplica(tmp_path)
    gone = [disks[0], replace(disks[1], path=tmp_path / "src" / "gone.vhdx")]
    with pytest.raises(ReplicaError, match=r"disk d1: image .*gone\.vhdx does not exist"):
        replica.seed(ITEM, 1, SEED_REQUEST, gone)
    longer = [replace(disks[0], size_bytes=disks[0].size_bytes - 1), disks[1]]
    with pytest.raises(ReplicaError, match=r"disk d0: image .* longer than the disk's"):
        replica.seed(ITEM, 1, SEED_REQUEST, longer)
    with pytest.raises(ReplicaError, match="is not a file"):
        replica.seed(ITEM, 1, SEED_REQUEST, [replace(disks[0], path=tmp_path / "src")])
    assert replica.head(ITEM).seq == 0
    assert replica.seed(ITEM, 1, SEED_REQUEST, disks).seq == 1  # the right images then seed


def test_points_apply_roll_back_and_freeze_on_a_seeded_replica(tmp_path: Path) -> None:
    images = write_seed_images(tmp_path / "src", d0_blocks=100)
    replica = SiteReplica(tmp_path)
    replica.seed(ITEM, 1, SEED_REQUEST, images)
    contents = {image.disk_id: seed_bytes(image) for image in images}
    disks = seeded_sources(images, contents, random.Random(5))
    sha = {1: {d.disk_id: d.sha256() for d in disks}}
    for seq in (2, 3):
        for disk in disks:
            disk.write_random(0.2)
        disks[0].zero([1, 2])
        point = ship(replica, ITEM, seq, disks)
        assert replica.apply(ITEM, seq) == point
        sha[seq] = {d.disk_id: d.sha256() for d in disks}
        assert {d.disk_id: sha256(replica.image_path(ITEM, d.disk_id)) for d in disks} == sha[seq]
    assert replica.retained(ITEM) == [1, 2, 3]
    view = replica.freeze(ITEM, 1)
    for disk_id, expected in sha[1].items():
        assert replica.view_sha256(ITEM, view, disk_id) == expected
    replica.drop_view(ITEM, view)
    assert replica.rollback(ITEM, 1) == replica.seeded(ITEM, 1, SEED_REQUEST, images)
    for image in images:
        assert replica.image_path(ITEM, image.disk_id).read_bytes() == seed_bytes(image)
