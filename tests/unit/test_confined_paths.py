"""Paths confined to roots after following links (shared.files), durable atomic writes, and
the host agent refusing a command's disk image or export folder outside its own folders."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from services.host_agent.commands import CommandHandler
from services.host_agent.cycles import FileSink, signer_for
from services.host_agent.replica import SiteReplica
from services.host_agent.replica_feed import ReplicaFeed
from services.host_agent.replicator import Replicator
from services.host_agent.tracking import HostIO
from services.host_agent.vms import create_vm, disk_path, load_vm
from services.host_agent.wiring import Wiring
from services.host_agent.workload import Workloads
from shared.files import OutsideRoots, confined, write_atomic
from shared.kafka.decode import Incoming
from shared.schemas.agent import (
    CommandCompleted,
    CommandOutcome,
    DiskSpec,
    InitialReplication,
    ReplicationEnableRequested,
)
from shared.schemas.envelope import EventPayload, new_envelope
from tests.unit.test_agent_commands import IDENTITY


def test_confined_follows_links_and_dots(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "vm").mkdir(parents=True)
    (root / "out").symlink_to(tmp_path)
    (root / "loop").symlink_to(root / "loop")
    assert confined(str(root / "vm" / "a.vhdx"), [root]) == (root / "vm" / "a.vhdx").resolve()
    assert confined(str(root / "vm" / ".." / "vm"), [root]) == (root / "vm").resolve()
    for bad in (
        str(root / ".." / "x"),
        str(root / "out" / "x"),
        "/etc/passwd",
        "relative/x",
        str(root) + "/\x00x",
        str(root / "loop"),
        str(root / "loop" / "x"),
    ):
        with pytest.raises(OutsideRoots):
            confined(bad, [root])


def test_write_atomic_replaces_the_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_atomic(path, b"one")
    write_atomic(path, b"two")
    assert path.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


async def test_the_agent_refuses_disks_and_exports_outside_its_folders(tmp_path: Path) -> None:
    storage, host = tmp_path / "storage", HostIO()
    sent: list[EventPayload] = []

    async def emit(payload: EventPayload) -> None:
        sent.append(payload)

    sign = signer_for(IDENTITY)
    wiring = Wiring(sign, emit, lambda item, seq: FileSink(sign, tmp_path / f"{item}-{seq}.jsonl"))
    replicator = Replicator(
        tmp_path / "state", host, wiring, disk_roots=[storage], export_roots=[tmp_path / "export"]
    )
    await replicator.start()
    create_vm(storage, "web01", [2**20], vm_id="vm-1")
    vm = load_vm(storage, "web01")
    elsewhere = tmp_path / "elsewhere.vhdx"
    elsewhere.write_bytes(bytes(2**20))
    handler = CommandHandler(
        IDENTITY,
        emit,
        replicator,
        Workloads(host, storage),
        storage,
        tmp_path / "state",
        ReplicaFeed(
            SiteReplica(tmp_path / "state"), "127.0.0.1:9", "", storage, agent_id="a"
        ),  # not used
    )

    def enable(path: Path, **kw: object) -> ReplicationEnableRequested:
        return ReplicationEnableRequested(
            command_id=uuid.uuid4(),
            agent_id=IDENTITY.producer_id,
            item_id=uuid.uuid4(),
            vm_id=vm.id,
            vm_name=vm.name,
            disks=[DiskSpec(disk_id=vm.disks[0].id, path=str(path), size_bytes=2**20)],
            copy_interval_seconds=3600,
            **kw,  # type: ignore[arg-type]
        )

    try:
        inside = disk_path(storage, vm, vm.disks[0])
        for command in (
            enable(elsewhere),
            enable(storage / ".." / "elsewhere.vhdx"),
            enable(
                inside,
                initial_replication=InitialReplication.OFFLINE,
                export_path=str(tmp_path / "not-export"),
            ),
        ):
            env = new_envelope(
                command, vault_id=IDENTITY.vault_id, producer_id="service:replication"
            )
            await handler.handle(Incoming(env, command, "agent.commands.v1", 0, 0, None))
        answers = [e for e in sent if isinstance(e, CommandCompleted)]
        assert [a.outcome for a in answers] == [CommandOutcome.FAILED] * 3
        assert all("not under an allowed folder" in a.error for a in answers), answers
        assert replicator.items == {}
    finally:
        await replicator.stop()


def test_metric_reasons_are_bounded() -> None:
    from shared.metrics import reason_label

    assert reason_label("cycle 12: root mismatch") == "cycle N"
    assert reason_label("bad block in cycle 7: block 3: x") == "bad block in cycle N"
    assert reason_label("sequence gap: expected cycle 5, got 9") == "sequence gap"
    assert reason_label("") == "other"
    labels = {reason_label(f"cycle {n}: anything {n}") for n in range(1000)}
    assert labels == {"cycle N"}
