"""Change tracking: the journal survives restarts and tells when it can't be trusted; scan mode
finds what changed; snapshots freeze a disk while writes go on; VM folders."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from services.host_agent.tracking import (
    AgentRunning,
    HostIO,
    Journal,
    JournalUntrusted,
    Snapshot,
    TrackedDisk,
    agent_lock,
    load_leaves,
    save_leaves,
    scan_changes,
    segment_path,
)
from services.host_agent.vms import create_vm, find_vm, list_vms, parse_size
from shared.merkle import BLOCK_SIZE, MerkleTree, block_hash, disk_tree


def test_journal_survives_a_kill_and_a_clean_restart(tmp_path: Path) -> None:
    journal = Journal.create(tmp_path, "d0", 100)
    for index in (3, 7, 3):
        journal.append(index)
    assert journal.seal() == {3, 7}
    journal.append(9)
    state = journal.state.model_copy(deep=True)
    # kill -9: nothing closed; every record is in the segments already.
    again = Journal.recover(tmp_path, "d0", 100, state)
    assert again.pending == {3, 7} and again.active == {9} and again.records == 4
    assert again.seal() == {3, 7, 9}
    again.shipped()
    assert again.records == 0 and again.pending == set()
    again.append(1)
    again.close()
    clean = Journal.recover(tmp_path, "d0", 100, again.state)
    assert clean.active == {1} and clean.pending == set()
    assert len(list(tmp_path.glob("d0.*.jnl"))) == 1


def _sealed(tmp_path: Path) -> tuple[Journal, int]:
    journal = Journal.create(tmp_path, "d0", 100)
    for index in range(5):
        journal.append(index)
    journal.seal()
    journal.append(50)
    return journal, journal.state.active_epoch - 1


@pytest.mark.parametrize("damage", ["missing", "truncated", "torn", "bit_flip", "all_gone"])
def test_a_lost_or_damaged_journal_is_untrusted(tmp_path: Path, damage: str) -> None:
    journal, sealed = _sealed(tmp_path)
    path = segment_path(tmp_path, "d0", sealed)
    raw = path.read_bytes()
    match damage:
        case "missing":
            path.unlink()
        case "truncated":
            path.write_bytes(raw[:-8])
        case "torn":
            path.write_bytes(raw[:-3])
        case "bit_flip":
            path.write_bytes(raw[:20] + bytes([raw[20] ^ 1]) + raw[21:])
        case "all_gone":
            for p in tmp_path.glob("*.jnl"):
                p.unlink()
    with pytest.raises(JournalUntrusted):
        Journal.recover(tmp_path, "d0", 100, journal.state)


def test_scan_mode_finds_changed_blocks_of_any_image(tmp_path: Path) -> None:
    image = tmp_path / "disk.vhdx"
    with image.open("wb") as fh:
        fh.truncate(40 * BLOCK_SIZE + 100)  # a short last block too
    shipped = disk_tree(image)
    with image.open("r+b") as fh:
        for index in (0, 17, 40):
            fh.seek(index * BLOCK_SIZE)
            fh.write(os.urandom(50))
        fh.seek(5 * BLOCK_SIZE)
        fh.write(bytes(BLOCK_SIZE))  # same content as before: not a change
    assert scan_changes(image, image.stat().st_size, shipped) == [0, 17, 40]
    save_leaves(tmp_path / "d.leaves", shipped)
    loaded = load_leaves(tmp_path / "d.leaves", shipped.leaves)
    assert loaded is not None and loaded.root() == shipped.root()
    assert load_leaves(tmp_path / "d.leaves", shipped.leaves + 1) is None


def test_snapshot_keeps_the_captured_bytes_while_writes_go_on(tmp_path: Path) -> None:
    image = tmp_path / "disk.vhdx"
    image.write_bytes(b"a" * BLOCK_SIZE + b"b" * BLOCK_SIZE)
    host = HostIO()
    disk = TrackedDisk("d", "d0", image, 2 * BLOCK_SIZE, MerkleTree(2))
    disk.open()
    disk.journal = Journal.create(tmp_path, "d0", 2)
    host.track(disk)
    lock = host.vm_lock("vm")
    disk.snapshot = Snapshot(disk.fd, 2 * BLOCK_SIZE, {0, 1}, lock, tmp_path)
    host.write("vm", image, 1, b"c" * BLOCK_SIZE)
    host.write("vm", image, 1, b"d" * BLOCK_SIZE)
    assert disk.snapshot.read(1) == b"b" * BLOCK_SIZE
    assert disk.snapshot.read(0) == b"a" * BLOCK_SIZE
    disk.snapshot.release([0])
    host.write("vm", image, 0, b"e" * BLOCK_SIZE)
    assert 0 not in disk.snapshot.saved
    assert image.read_bytes() == b"e" * BLOCK_SIZE + b"d" * BLOCK_SIZE
    assert disk.journal.active == {0, 1} and disk.journal.records == 3
    assert isinstance(lock, type(threading.Lock()))
    disk.close()
    host.close()


def test_only_one_process_owns_the_journals(tmp_path: Path) -> None:
    with agent_lock(tmp_path), pytest.raises(AgentRunning), agent_lock(tmp_path):
        pass
    with agent_lock(tmp_path):
        pass


def test_vm_folders(tmp_path: Path) -> None:
    assert parse_size("64MiB") == 64 * 2**20 and parse_size("1G") == 2**30
    assert parse_size("4096") == 4096
    with pytest.raises(ValueError):
        parse_size("lots")
    vm = create_vm(tmp_path, "web01", [parse_size("1MiB"), 70_000], vm_id="vm-1")
    meta = json.loads((tmp_path / "web01" / "vm.json").read_text())
    assert meta["state"] == "Running" and [d["file"] for d in meta["disks"]] == [
        "disk0.vhdx",
        "disk1.vhdx",
    ]
    assert (tmp_path / "web01" / "disk1.vhdx").stat().st_size == 70_000
    assert (tmp_path / "web01" / "disk0.vhdx").stat().st_blocks == 0  # sparse
    assert find_vm(tmp_path, "vm-1") == vm == find_vm(tmp_path, "web01")
    assert [v.name for v in list_vms(tmp_path)] == ["web01"]
    with pytest.raises(FileExistsError):
        create_vm(tmp_path, "web01", [4096])
    assert block_hash(b"") != block_hash(b"x")
