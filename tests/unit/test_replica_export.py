"""Verifying and exporting a retained point of the recovery-site replica (for a replication
service without a block copy): each disk read back through a frozen view of the point, its
Merkle root recomputed and its SHA-256 taken, and with a folder written there byte for byte;
the view never outlives the command; a root that differs is an answer, a point not retained
a failure."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from services.host_agent import replica_export
from services.host_agent.replica import SiteReplica
from services.host_agent.replica_feed import ReplicaFeed
from services.host_agent.replica_format import Point, ReplicaError
from services.host_agent.wiring import CommandFailed
from shared.schemas.agent import ReplicaDisk, ReplicaPointExportRequested
from tests.support.site_replica_worker import ITEM, History

ITEM_ID = uuid.UUID(int=7)


class Recorded(History):
    """A History that keeps each point it shipped and each disk's bytes there."""

    def __init__(self, root: Path, points: int = 6) -> None:
        self.points: dict[int, Point] = {}
        self.content: dict[int, dict[str, bytes]] = {}
        super().__init__(root, points)

    def cycle(self, seq: int) -> Point:
        point = super().cycle(seq)
        self.points[seq] = point
        self.content[seq] = {d.disk_id: bytes(d.image) for d in self.disks}
        return point


def _setup(tmp_path: Path, points: int = 6) -> tuple[Recorded, ReplicaFeed, Path]:
    """A replica of item ITEM_ID at `points` points, and a feed over it with its storage."""
    storage = tmp_path / "storage"
    storage.mkdir()
    h = Recorded(tmp_path / "state", points=points)
    replicas = tmp_path / "state" / "replica"
    (replicas / ITEM).rename(replicas / str(ITEM_ID))
    h.replica = SiteReplica(tmp_path / "state")
    return h, ReplicaFeed(h.replica, "127.0.0.1:1", "", storage, agent_id="a"), storage


def _command(
    h: Recorded, seq: int, target: Path | None = None, **roots: str
) -> ReplicaPointExportRequested:
    """Export (or verify, without `target`) point `seq` with the source's roots (or `roots`)."""
    point = h.points[min(seq, max(h.points))]
    return ReplicaPointExportRequested(
        command_id=uuid.uuid4(),
        agent_id=uuid.uuid4(),
        item_id=ITEM_ID,
        request_id=uuid.uuid5(ITEM_ID, f"export-{seq}-{target}"),
        cycle_seq=seq,
        disks=[
            ReplicaDisk(
                disk_id=d.disk_id,
                size_bytes=d.size_bytes,
                block_size=d.block_size,
                merkle_root=roots.get(d.disk_id, d.merkle_root),
            )
            for d in point.disks
        ],
        target_dir=None if target is None else str(target),
    )


def _views_left(h: Recorded) -> list[Path]:
    return list((h.replica.files(str(ITEM_ID)).views).glob("*.json"))


async def test_verify_gives_the_sources_roots_and_bytes_at_the_latest_and_an_older_point(
    tmp_path: Path,
) -> None:
    h, feed, _ = _setup(tmp_path)
    for seq in (6, 2):  # the latest (HEAD) and an older one, read through the undo records
        result = await feed.export(_command(h, seq))
        assert result["ok"] is True and result["cycle_seq"] == seq
        assert result["item_id"] == str(ITEM_ID)
        disks = {d["disk_id"]: d for d in result["disks"]}
        assert set(disks) == {"d0", "d1"}
        for disk_id, d in disks.items():
            assert d["merkle_root"] == d["expected_root"] == h.roots[seq][disk_id], seq
            assert d["sha256"] == h.sha[seq][disk_id], seq
            assert d["size_bytes"] == len(h.content[seq][disk_id]), seq
            assert d["ok"] is True and "path" not in d
    assert disks["d0"]["size_bytes"] != h.points[6].disk("d0").size_bytes  # type: ignore[union-attr]
    assert _views_left(h) == []
    assert h.replica.head(str(ITEM_ID)).seq == 6  # the replica is not moved
    assert h.replica.retained(str(ITEM_ID)) == [1, 2, 3, 4, 5, 6]


async def test_export_writes_the_older_points_disks_byte_for_byte_and_drops_its_view(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(replica_export, "CHUNK_BLOCKS", 7)  # several chunks, the last short
    h, feed, storage = _setup(tmp_path)
    command = _command(h, 3, storage / "exports" / "p3")
    result = await feed.export(command)
    assert result["ok"] is True
    folder = (storage / "exports" / "p3").resolve()
    assert sorted(p.name for p in folder.iterdir()) == ["d0.vhdx", "d1.vhdx"]  # no .partial
    for d in result["disks"]:
        path = folder / f"{d['disk_id']}.vhdx"
        assert d["path"] == str(path)
        assert path.read_bytes() == h.content[3][d["disk_id"]]
        assert d["sha256"] == h.sha[3][d["disk_id"]]
    assert _views_left(h) == []
    # the same command again: the same answer, the files written again
    (folder / "d1.vhdx").write_bytes(b"overwritten")
    assert await feed.export(command) == result
    assert (folder / "d1.vhdx").read_bytes() == h.content[3]["d1"]
    assert _views_left(h) == []
    # nothing pinned: retention prunes the point once the service lets it go
    h.replica.prune(str(ITEM_ID), 4)
    assert h.replica.retained(str(ITEM_ID)) == [4, 5, 6]


async def test_a_root_that_differs_is_reported_not_failed_and_the_files_are_written(
    tmp_path: Path,
) -> None:
    h, feed, storage = _setup(tmp_path, points=3)
    wrong = "0" * 64
    verified = await feed.export(_command(h, 2, d1=wrong))
    assert verified["ok"] is False
    disks = {d["disk_id"]: d for d in verified["disks"]}
    assert disks["d0"]["ok"] is True
    assert disks["d1"]["ok"] is False and disks["d1"]["expected_root"] == wrong
    assert disks["d1"]["merkle_root"] == h.roots[2]["d1"]  # what the replica holds
    exported = await feed.export(_command(h, 2, storage / "x", d0=wrong))
    assert exported["ok"] is False
    assert [d["ok"] for d in exported["disks"]] == [False, True]
    for d in exported["disks"]:
        path = (storage / "x" / f"{d['disk_id']}.vhdx").resolve()
        assert d["path"] == str(path)
        assert path.read_bytes() == h.content[2][d["disk_id"]]
    assert _views_left(h) == []


async def test_a_point_not_retained_or_a_folder_it_may_not_write_fails(tmp_path: Path) -> None:
    h, feed, storage = _setup(tmp_path)
    h.replica.prune(str(ITEM_ID), 2)
    with pytest.raises(CommandFailed, match=r"point 1 is not retained .* holds 2\.\.6"):
        await feed.export(_command(h, 1))
    with pytest.raises(CommandFailed, match=r"point 9 is not retained .* holds 2\.\.6"):
        await feed.export(_command(h, 9))
    other = _command(h, 6).model_copy(update={"item_id": uuid.UUID(int=8)})
    with pytest.raises(CommandFailed, match="keeps no replica"):
        await feed.export(other)
    for outside in (tmp_path / "elsewhere", storage / "..", storage):
        with pytest.raises(CommandFailed, match="not a folder in this host's storage"):
            await feed.export(_command(h, 6, outside))
    (storage / "vm").mkdir()
    (storage / "vm" / "vm.json").write_text("{}")
    with pytest.raises(CommandFailed, match=r"holds a VM \(vm.json\)"):
        await feed.export(_command(h, 6, storage / "vm"))
    assert sorted(p.name for p in (storage / "vm").iterdir()) == ["vm.json"]
    bad_id = _command(h, 6, storage / "y")
    bad_id.disks[0] = bad_id.disks[0].model_copy(update={"disk_id": "../d0"})
    with pytest.raises(CommandFailed, match="unusable as file names"):
        await feed.export(bad_id)
    missing = _command(h, 6)
    missing.disks[0] = missing.disks[0].model_copy(update={"disk_id": "d9"})
    with pytest.raises(CommandFailed, match="disk d9 is not in point 6"):
        await feed.export(missing)
    assert _views_left(h) == []
    assert not (storage / "y").exists() and not (tmp_path / "elsewhere").exists()


async def test_a_failure_while_reading_drops_the_view_and_the_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h, feed, storage = _setup(tmp_path, points=3)
    read_view = h.replica.read_view
    calls: list[Any] = []

    def failing(*args: Any) -> bytes:
        calls.append(args)
        if len(calls) == 2:  # d1, after d0 was written
            raise ReplicaError("an undo record cannot be read")
        return read_view(*args)

    monkeypatch.setattr(h.replica, "read_view", failing)
    with pytest.raises(CommandFailed, match="an undo record cannot be read"):
        await feed.export(_command(h, 2, storage / "z"))
    assert _views_left(h) == []
    assert sorted(p.name for p in (storage / "z").iterdir()) == ["d0.vhdx"]  # no .partial


def test_the_export_schema_refuses_what_cannot_be_right() -> None:
    disk = {"disk_id": "d0", "size_bytes": 10, "block_size": 4, "merkle_root": "a" * 64}
    base: dict[str, Any] = {
        "command_id": uuid.uuid4(),
        "agent_id": uuid.uuid4(),
        "item_id": uuid.uuid4(),
        "request_id": uuid.uuid4(),
        "cycle_seq": 1,
        "disks": [disk],
    }
    assert ReplicaPointExportRequested(**base).target_dir is None
    bad = {
        "each disk is named once": {"disks": [disk, disk]},
        "at least 1 item": {"disks": []},
        "at least 1 character": {"target_dir": ""},
        "greater than or equal to 1": {"cycle_seq": 0},
    }
    for error, fields in bad.items():
        with pytest.raises(ValidationError, match=error):
            ReplicaPointExportRequested(**{**base, **fields})
