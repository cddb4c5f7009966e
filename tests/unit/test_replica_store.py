"""Replica store: every point materialises byte-identical to the source at that cycle, a point
costs only its changed blocks, wrong data never becomes a point, prune frees what nothing
references."""

from __future__ import annotations

import hashlib
import os
import random
import threading
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.replication.store import (
    BlockHashMismatch,
    CorruptBlock,
    MissingBlock,
    PointConflict,
    ReplicaStore,
    RootMismatch,
    UnknownPoint,
)
from services.replication.store import packs as store_packs
from shared.merkle import MerkleTree, block_hash, zero_block_hash
from tests.support.store_worker import SourceDisk, stage_cycle

RECORD = store_packs.PACK_RECORD

BS = 4096
SIZE = 2 * 2**20 + 1000  # a short last block


def new_item(tmp_path: Path, seed: int = 1, size: int = SIZE) -> tuple[ReplicaStore, SourceDisk]:
    return ReplicaStore(tmp_path / "site"), SourceDisk("d0", size, BS, random.Random(seed))


def ship(store: ReplicaStore, disks: list[SourceDisk], seq: int, by_hash: bool = True) -> None:
    store.commit_point("item", stage_cycle(store, "item", seq, disks, by_hash=by_hash))


def materialised_sha(store: ReplicaStore, tmp_path: Path, seq: int, disk: str = "d0") -> str:
    out = tmp_path / f"out-{seq}-{disk}.img"
    sha = store.materialise("item", seq, disk, out)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == sha
    return sha


def evolve(store: ReplicaStore, disk: SourceDisk, cycles: int) -> dict[int, str]:
    """Initial copy (half the disk written) then `cycles - 1` deltas; seq -> source SHA-256."""
    history = {}
    disk.write_random(0.5)
    for seq in range(1, cycles + 1):
        if seq > 1:
            disk.write_random(0.04)
            disk.zero(disk.rng.sample(range(disk.blocks), 3))
        ship(store, [disk], seq)
        history[seq] = disk.sha256()
    return history


def test_every_point_materialises_byte_identical(tmp_path: Path) -> None:
    store, disk = new_item(tmp_path)
    history = evolve(store, disk, 6)
    assert [p.seq for p in store.points("item")] == [1, 2, 3, 4, 5, 6]
    for seq, sha in history.items():
        assert materialised_sha(store, tmp_path, seq) == sha
        assert store.verify_point("item", seq).ok
        assert (tmp_path / f"out-{seq}-d0.img").stat().st_size == SIZE
    assert store.disk_tree("item", "d0").root_hex() == disk.root()
    assert store.leaf_hashes("item", "d0") == list(
        MerkleTree.from_leaves(
            [block_hash(disk.block(disk.image, i)) for i in range(disk.blocks)], disk.blocks
        ).leaf_hashes()
    )


def test_a_point_costs_only_its_changed_blocks(tmp_path: Path) -> None:
    store, disk = new_item(tmp_path)
    evolve(store, disk, 1)
    before = store.item_bytes("item")
    changed = disk.write_random(0.03)
    ship(store, [disk], 2)
    expected = sum(len(disk.block(disk.image, i)) for i in changed)
    headers = len(changed) * RECORD.size  # one pack record each
    assert store.item_bytes("item") - before == expected + headers
    info = store.points("item")[-1]
    assert (info.changed_blocks, info.new_bytes) == (len(changed), expected)
    manifest = (tmp_path / "site/items/item/points/000000000002.json").stat().st_size
    assert manifest < 100 * len(changed) + 500


def test_identical_blocks_are_stored_once(tmp_path: Path) -> None:
    store, disk = new_item(tmp_path)
    data = random.Random(7).randbytes(BS)
    for i in range(0, 64, 2):
        disk.image[i * BS : (i + 1) * BS] = data
    ship(store, [disk], 1)
    assert store.item_bytes("item") == BS + RECORD.size
    assert store.put_block("item", block_hash(data).hex(), data) is False
    assert materialised_sha(store, tmp_path, 1) == disk.sha256()


def test_zero_blocks_are_never_stored(tmp_path: Path) -> None:
    store, disk = new_item(tmp_path)
    assert store.put_block("item", zero_block_hash(BS).hex(), bytes(BS)) is False
    ship(store, [disk], 1)  # a blank disk: every block shipped, all zero
    assert store.item_bytes("item") == 0
    disk.write_random(0.1)
    ship(store, [disk], 2)
    disk.zero(list(range(disk.blocks)))
    ship(store, [disk], 3)
    out = tmp_path / "blank.img"
    assert store.materialise("item", 3, "d0", out) == hashlib.sha256(bytes(SIZE)).hexdigest()
    assert out.stat().st_blocks * 512 < SIZE // 4  # written as holes


def test_a_block_with_the_wrong_hash_is_refused(tmp_path: Path) -> None:
    store, _ = new_item(tmp_path)
    good = block_hash(b"a" * BS).hex()
    with pytest.raises(BlockHashMismatch) as err:
        store.put_block("item", good, b"b" * BS, index=5)
    assert (err.value.index, err.value.expected) == (5, good)
    assert err.value.actual == block_hash(b"b" * BS).hex()
    assert isinstance(err.value, ValueError)
    assert store.item_bytes("item") == 0


def test_a_wrong_root_commits_nothing(tmp_path: Path) -> None:
    store, disk = new_item(tmp_path)
    history = evolve(store, disk, 2)
    disk.write_random(0.05)
    manifest = stage_cycle(store, "item", 3, [disk])
    bad = replace(manifest, disks=[replace(manifest.disks[0], merkle_root="ab" * 32)])
    with pytest.raises(RootMismatch):
        store.commit_point("item", bad)
    assert store.latest_seq("item") == 2
    assert store.disk_tree("item", "d0").root_hex() != disk.root()  # cache not left half-applied
    assert materialised_sha(store, tmp_path, 2) == history[2]
    store.commit_point("item", manifest)
    assert materialised_sha(store, tmp_path, 3) == disk.sha256()


def pack_records(tmp_path: Path, item: str = "item") -> list[tuple[Path, int, str, int]]:
    """(pack file, offset of the bytes, sha256 hex, length) of every record, in order."""
    out = []
    for pack in sorted((tmp_path / "site/items" / item / "packs").glob("*.pack")):
        raw, pos = pack.read_bytes(), 0
        while pos + RECORD.size <= len(raw):
            magic, digest, length = RECORD.unpack(raw[pos : pos + RECORD.size])
            assert magic == b"DRP1"
            out.append((pack, pos + RECORD.size, digest.hex(), length))
            pos += RECORD.size + length
    return out


def test_a_missing_block_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_packs, "PACK_BYTES", 1)  # a pack per batch
    store, disk = new_item(tmp_path)
    evolve(store, disk, 1)
    disk.write_random(0.02)
    manifest = stage_cycle(store, "item", 2, [disk])
    cycle_pack = pack_records(tmp_path)[-1][0]
    cycle_pack.unlink()  # lost under the store
    with pytest.raises(MissingBlock) as err:
        store.commit_point("item", manifest)
    assert err.value.sha256 in manifest.disks[0].changed.values()
    assert store.latest_seq("item") == 1
    # the resync sends them again: stored again (not taken as present), then the point commits
    again = [(i, sha, disk.block(disk.image, i)) for i, sha in manifest.disks[0].changed.items()]
    assert store.put_blocks("item", again) == len(again)
    store.commit_point("item", manifest)
    assert materialised_sha(store, tmp_path, 2) == disk.sha256()


def test_recommitting_is_idempotent_and_a_different_point_conflicts(tmp_path: Path) -> None:
    store, disk = new_item(tmp_path)
    evolve(store, disk, 2)
    disk.write_random(0.02)
    real = stage_cycle(store, "item", 3, [disk])
    store.commit_point("item", real)
    store.commit_point("item", real)
    ReplicaStore(tmp_path / "site").commit_point("item", real)  # after a restart too
    with pytest.raises(PointConflict):
        store.commit_point("item", replace(real, app_consistent=True))
    with pytest.raises(PointConflict):
        store.commit_point("item", replace(real, seq=2, app_consistent=True))
    assert [p.seq for p in store.points("item")] == [1, 2, 3]


def test_a_commit_updates_the_cached_tree_incrementally(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, disk = new_item(tmp_path)
    evolve(store, disk, 2)
    disk.write_random(0.01)
    manifest = stage_cycle(store, "item", 3, [disk])  # the source side builds its tree here
    rebuilds: list[int] = []
    original = MerkleTree.rebuild
    monkeypatch.setattr(MerkleTree, "rebuild", lambda t: (rebuilds.append(1), original(t))[1])
    store.commit_point("item", manifest)
    assert rebuilds == []


def test_prune_keeps_kept_points_and_frees_unreferenced_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_packs, "PACK_BYTES", 1)  # a pack per batch
    monkeypatch.setattr(store_packs, "PACK_COMPACT_BELOW", 1.0)  # any garbage is freed
    store, disk = new_item(tmp_path)
    history = evolve(store, disk, 8)
    before = store.item_bytes("item")
    assert store.prune("item", {3, 5, 8}) == [1, 2, 4, 6, 7]
    assert [p.seq for p in store.points("item")] == [3, 5, 8]
    assert store.item_bytes("item") < before
    for seq in (3, 5, 8):
        assert store.verify_point("item", seq).ok
        assert materialised_sha(store, tmp_path, seq) == history[seq]
    with pytest.raises(UnknownPoint):
        store.verify_point("item", 4)
    disk.write_random(0.02)
    ship(store, [disk], 9)
    history[9] = disk.sha256()
    fresh = ReplicaStore(tmp_path / "site")  # everything from disk, nothing from the cache
    assert fresh.prune("item", {9}) == [3, 5, 8]
    assert fresh.item_bytes("item") < before
    assert materialised_sha(fresh, tmp_path, 9) == history[9]
    assert fresh.disk_tree("item", "d0").root_hex() == disk.root()
    left = {p.name for p in (tmp_path / "site/items/item").iterdir()}
    assert left == {"packs", "points", "base", "BASE", "tmp"}


def test_prune_refuses_to_drop_the_latest_point(tmp_path: Path) -> None:
    store, disk = new_item(tmp_path)
    evolve(store, disk, 3)
    with pytest.raises(ValueError, match="latest"):
        store.prune("item", {1, 2})
    assert [p.seq for p in store.points("item")] == [1, 2, 3]


def test_prune_spares_the_blocks_of_the_cycle_in_flight(tmp_path: Path) -> None:
    store, disk = new_item(tmp_path)
    evolve(store, disk, 4)
    disk.write_random(0.05)
    pending = stage_cycle(store, "item", 5, [disk])  # blocks put, not committed yet
    store.prune("item", {4})
    store.commit_point("item", pending)
    assert materialised_sha(store, tmp_path, 5) == disk.sha256()


@pytest.mark.parametrize("by_hash", [True, False], ids=["boundary-shipped", "boundary-derived"])
def test_disk_growth_and_shrink(tmp_path: Path, by_hash: bool) -> None:
    store, disk = new_item(tmp_path, size=300 * BS + 123)
    history = {}
    disk.write_random(0.6)
    for seq, size in enumerate(
        [300 * BS + 123, 512 * BS + 77, 512 * BS + 77, 200 * BS + 5, 200 * BS + 4000, 200 * BS],
        start=1,
    ):
        disk.resize(size)
        disk.write_random(0.02)
        ship(store, [disk], seq, by_hash=by_hash)
        history[seq] = (size, disk.sha256())
    store.prune("item", {2, 4, 6})
    for seq in (2, 4, 6):
        size, sha = history[seq]
        assert materialised_sha(store, tmp_path, seq) == sha
        assert (tmp_path / f"out-{seq}-d0.img").stat().st_size == size
        assert store.verify_point("item", seq).ok


def test_disks_added_and_removed_between_points(tmp_path: Path) -> None:
    store, d0 = new_item(tmp_path)
    d1 = SourceDisk("d1", 64 * BS, BS, random.Random(2))
    d0.write_random(0.2)
    ship(store, [d0], 1)
    d1.write_random(0.5)
    ship(store, [d0, d1], 2)
    shas = (d0.sha256(), d1.sha256())
    d0.write_random(0.1)
    ship(store, [d0], 3)
    store.prune("item", {2, 3})
    assert (
        materialised_sha(store, tmp_path, 2),
        materialised_sha(store, tmp_path, 2, "d1"),
    ) == shas
    with pytest.raises(UnknownPoint):
        store.materialise("item", 3, "d1", tmp_path / "x.img")


def test_verify_and_materialise_detect_corrupt_and_missing_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_packs, "PACK_BYTES", 1)  # a pack per batch
    store, disk = new_item(tmp_path)
    evolve(store, disk, 2)
    records = pack_records(tmp_path)
    rotten_pack, offset, rotten, _ = records[0]
    with open(rotten_pack, "r+b") as fh:  # bit rot inside one block's bytes
        fh.seek(offset)
        fh.write(b"rot")
    lost_pack = records[-1][0]
    lost = {sha for pack, _, sha, _ in records if pack == lost_pack}
    lost_pack.unlink()
    result = store.verify_point("item", 2)
    assert not result.ok
    (d,) = result.disks
    assert d.actual_root != d.expected_root
    assert {b.sha256 for b in d.corrupt} == {rotten}
    assert {b.sha256 for b in d.missing} == lost
    assert result.as_dict()["ok"] is False
    with pytest.raises((CorruptBlock, MissingBlock)):
        store.materialise("item", 2, "d0", tmp_path / "bad.img")
    assert not list(tmp_path.glob("bad.img*"))


def test_items_in_threads_delete_and_sizes(tmp_path: Path) -> None:
    store = ReplicaStore(tmp_path / "site")
    disks = {f"item{n}": SourceDisk("d0", 128 * BS, BS, random.Random(n)) for n in range(4)}

    def run(item: str) -> None:
        for seq in range(1, 6):
            disks[item].write_random(0.1)
            store.commit_point(item, stage_cycle(store, item, seq, [disks[item]]))

    threads = [threading.Thread(target=run, args=(item,)) for item in disks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sizes = {item: store.item_bytes(item) for item in disks}
    assert store.total_bytes() == sum(sizes.values()) > 0
    for item, disk in disks.items():
        assert store.latest_seq(item) == 5
        assert store.disk_tree(item, "d0").root_hex() == disk.root()
    store.delete_item("item0")
    assert store.latest_seq("item0") is None
    assert store.total_bytes() == sum(sizes.values()) - sizes["item0"]
    with pytest.raises(ValueError):
        store.latest_seq("../escape")


def test_a_committed_failover_truncates_to_the_point_failed_over_to(tmp_path: Path) -> None:
    store, disk = new_item(tmp_path)
    history = evolve(store, disk, 6)
    before = store.item_bytes("item")
    assert store.prune("item", {4}, truncate=True) == [1, 2, 3, 5, 6]
    assert [p.seq for p in store.points("item")] == [4]
    assert store.latest_seq("item") == 4
    assert store.item_bytes("item") < before  # the later points' blocks are freed at once
    assert store.verify_point("item", 4).ok
    assert materialised_sha(store, tmp_path, 4) == history[4]
    fresh = ReplicaStore(tmp_path / "site")
    assert fresh.disk_tree("item", "d0").root_hex() == fresh.disk_tree("item", "d0", 4).root_hex()
    assert materialised_sha(fresh, tmp_path, 4) == history[4]
    assert fresh.prune("item", {4}, truncate=True) == []  # idempotent
    with pytest.raises(ValueError, match="at least one"):
        fresh.prune("item", {99}, truncate=True)


def _image(path: Path, disk: SourceDisk) -> Path:
    path.write_bytes(bytes(disk.image))
    return path


def test_seeding_from_images_commits_a_point_of_their_blocks(tmp_path: Path) -> None:
    store = ReplicaStore(tmp_path / "site")
    a = SourceDisk("a", SIZE, 65536, random.Random(3))
    b = SourceDisk("b", 3 * 65536, 65536, random.Random(4))
    a.write_random(0.3)
    b.write_random(0.5)
    a.zero([0, 1])
    images = {"a": _image(tmp_path / "a.vhdx", a), "b": _image(tmp_path / "b.vhdx", b)}
    when = datetime(2025, 2, 1, tzinfo=UTC)
    manifest = store.seed_from_images("rev", 1, images, when)
    assert [p.seq for p in store.points("rev")] == [1]
    roots = {d.disk_id: d.merkle_root for d in manifest.disks}
    assert roots == {
        "a": MerkleTree.from_leaves(
            [block_hash(a.block(a.image, i)) for i in range(a.blocks)], a.blocks
        ).root_hex(),
        "b": MerkleTree.from_leaves(
            [block_hash(b.block(b.image, i)) for i in range(b.blocks)], b.blocks
        ).root_hex(),
    }
    zero_blocks = sum(
        a.block(a.image, i) == bytes(len(a.block(a.image, i))) for i in range(a.blocks)
    )
    assert len(manifest.disks[0].changed) == a.blocks - zero_blocks  # zero blocks not stored
    assert store.verify_point("rev", 1).ok
    out = tmp_path / "out.vhdx"
    assert store.materialise("rev", 1, "a", out) == hashlib.sha256(a.image).hexdigest()
    leaves = store.leaf_hashes("rev", "b")
    assert leaves[0] == block_hash(b.block(b.image, 0))
    # Seeding again with the same images is a no-op; other content conflicts.
    assert store.seed_from_images("rev", 1, images, when) == manifest
    b.write_random(0.3)
    _image(tmp_path / "b.vhdx", b)
    with pytest.raises(PointConflict):
        store.seed_from_images("rev", 1, images, when)
    with pytest.raises(FileNotFoundError):
        store.seed_from_images("other", 1, {"a": tmp_path / "missing.vhdx"}, when)


def test_every_point_reads_the_same_after_a_restart(tmp_path: Path) -> None:
    store, disk = new_item(tmp_path, seed=5)
    history = evolve(store, disk, 4)
    store.close()
    reopened = ReplicaStore(tmp_path / "site")
    for seq, sha in history.items():
        assert materialised_sha(reopened, tmp_path, seq) == sha
        assert reopened.verify_point("item", seq).ok


def _blocks(seed: int, count: int) -> list[tuple[int | None, str, bytes]]:
    rng = random.Random(seed)
    datas = [rng.randbytes(BS) for _ in range(count)]
    return [(i, hashlib.sha256(d).hexdigest(), d) for i, d in enumerate(datas)]


def assert_stored_once_in_order(
    tmp_path: Path, blocks: list[tuple[int | None, str, bytes]]
) -> None:
    """A store opened afresh has every block (puts nothing), each in one record, in order."""
    assert ReplicaStore(tmp_path / "site").put_blocks("item", blocks) == 0
    assert [sha for _, _, sha, _ in pack_records(tmp_path)] == [sha for _, sha, _ in blocks]


def test_an_append_cut_short_by_a_crash_is_dropped_on_restart(tmp_path: Path) -> None:
    """What a crash may leave at the end of the newest pack: a record cut short, or one whose
    bytes never reached the disk (its batch was never acknowledged). The next store to use the
    item cuts the pack after the last good record; what was acknowledged before is all there."""
    store = ReplicaStore(tmp_path / "site")
    blocks = _blocks(3, 6)
    assert store.put_blocks("item", blocks[:4]) == 4
    (pack,) = {p for p, _, _, _ in pack_records(tmp_path)}
    good = pack.stat().st_size
    unsynced = bytes(BS)  # the record's header made it, its bytes did not
    with open(pack, "ab") as fh:
        fh.write(RECORD.pack(b"DRP1", hashlib.sha256(b"x" * BS).digest(), BS) + unsynced)
        fh.write(RECORD.pack(b"DRP1", bytes(32), BS)[:20])  # and a header cut short
    restarted = ReplicaStore(tmp_path / "site")
    assert restarted.put_blocks("item", blocks[:4]) == 0  # all there
    assert pack.stat().st_size == good
    assert restarted.put_blocks("item", blocks) == 2  # appends go on cleanly
    assert_stored_once_in_order(tmp_path, blocks)


def test_a_failed_append_leaves_no_torn_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ReplicaStore(tmp_path / "site")
    blocks = _blocks(9, 8)
    store.put_blocks("item", blocks[:2])
    real = os.fdatasync

    def disk_error(fd: int) -> None:
        raise OSError(5, "I/O error")

    monkeypatch.setattr(os, "fdatasync", disk_error)
    with pytest.raises(OSError, match="I/O error"):
        store.put_blocks("item", blocks[2:5])
    monkeypatch.setattr(os, "fdatasync", real)
    assert store.put_blocks("item", blocks) == 6  # the failed batch was not taken as stored
    assert_stored_once_in_order(tmp_path, blocks)


def test_gc_deletes_dead_packs_and_rewrites_mostly_dead_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_packs, "PACK_BYTES", 1)  # a pack per cycle here
    store, disk = new_item(tmp_path, seed=8)
    rng = random.Random(8)

    def cycle(seq: int, indexes: range) -> set[str]:
        for i in indexes:
            disk.image[i * BS : (i + 1) * BS] = rng.randbytes(BS)
        ship(store, [disk], seq)
        return {block_hash(disk.block(disk.image, i)).hex() for i in indexes}

    cycle(1, range(0, 100))  # pack 1
    dead = cycle(2, range(100, 110))  # pack 2: all overwritten by 3
    cycle(3, range(100, 110))  # pack 3
    mostly_dead = cycle(4, range(200, 220))  # pack 4: 18 of 20 overwritten by 5
    cycle(5, range(200, 218))  # pack 5
    history = {6: ""}
    cycle(6, range(300, 301))
    history[6] = disk.sha256()
    survivors = {block_hash(disk.block(disk.image, i)).hex() for i in (218, 219)}
    assert survivors <= mostly_dead

    def packs() -> dict[str, set[str]]:
        records = pack_records(tmp_path)
        return {p.name: {sha for q, _, sha, _ in records if q == p} for p, _, _, _ in records}

    before = packs()
    assert store.prune("item", {6}) == [1, 2, 3, 4, 5]
    after = packs()
    assert "00000002.pack" in before and "00000002.pack" not in after  # dead: deleted
    assert "00000004.pack" not in after  # mostly dead: rewritten, then deleted
    assert "00000001.pack" in after and "00000005.pack" in after  # (mostly) live: kept
    rewritten = set().union(*after.values())
    assert survivors <= rewritten and not dead & rewritten
    assert materialised_sha(store, tmp_path, 6) == history[6]
    assert store.verify_point("item", 6).ok
    reopened = ReplicaStore(tmp_path / "site")  # the index rebuilt from what is left
    assert materialised_sha(reopened, tmp_path, 6) == history[6]


def test_a_batch_of_more_blocks_than_one_writev_takes_is_stored(tmp_path: Path) -> None:
    """An initial cycle of compressible blocks brings ~1,000 blocks per write (two buffers
    each); writev(2) takes at most 1,024 buffers."""
    store = ReplicaStore(tmp_path / "site")
    blocks = _blocks(11, 1500)
    assert store.put_blocks("item", blocks) == 1500
    assert_stored_once_in_order(tmp_path, blocks)
