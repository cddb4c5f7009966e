"""Recovery-host VM commands (create from materialised disks, delete, start) and seeded
replication (reverse replication: nothing ships until the resync against the seed)."""

from __future__ import annotations

import base64
import json
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kit.poll import eventually
from services.host_agent.commands import CommandHandler
from services.host_agent.cycles import FileSink, signer_for
from services.host_agent.item_record import ReplicationPhase
from services.host_agent.replica import SiteReplica
from services.host_agent.replica_feed import ReplicaFeed
from services.host_agent.replicator import Replicator
from services.host_agent.tracking import HostIO
from services.host_agent.vms import create_vm, disk_path, load_vm
from services.host_agent.wiring import Wiring
from services.host_agent.workload import Pattern, Workloads
from shared.merkle import BLOCK_SIZE, disk_tree
from shared.schemas.agent import (
    CommandCompleted,
    DiskSpec,
    InitialReplication,
    NicAttachment,
    ReplicationEnableRequested,
    ResyncRequested,
    VmCreateRequested,
    VmDeleteRequested,
    VmDisk,
    VmPowerRequested,
)
from shared.schemas.envelope import EventPayload
from tests.unit.test_agent_commands import IDENTITY, deliver

SIZES = {"d-os": 3 * BLOCK_SIZE + 100, "d-data": 2 * BLOCK_SIZE}


class Agent:
    def __init__(self, tmp: Path, handler: CommandHandler, sent: list[EventPayload]) -> None:
        self.tmp, self.handler, self.sent = tmp, handler, sent
        self.storage = handler.storage

    def last(self) -> CommandCompleted:
        done = [e for e in self.sent if isinstance(e, CommandCompleted)]
        return done[-1]

    async def run(self, command: EventPayload) -> CommandCompleted:
        await deliver(self.handler, command)
        return self.last()


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[Agent]:
    storage, host = tmp_path / "storage", HostIO()
    sent: list[EventPayload] = []

    async def emit(payload: EventPayload) -> None:
        sent.append(payload)

    sign = signer_for(IDENTITY)
    wiring = Wiring(sign, emit, lambda item, seq: FileSink(sign, tmp_path / f"{item}-{seq}.jsonl"))
    replicator = Replicator(tmp_path / "state", host, wiring)
    await replicator.start()
    storage.mkdir()
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
    yield Agent(tmp_path, handler, sent)
    await replicator.stop()


def materialise(storage: Path, name: str, sizes: dict[str, int] = SIZES) -> None:
    """What the replication service does before VmCreateRequested: the disk images."""
    (storage / name).mkdir(parents=True, exist_ok=True)
    for disk_id, size in sizes.items():
        with open(storage / name / f"{disk_id}.vhdx", "wb") as fh:
            fh.write(os.urandom(1000))
            fh.truncate(size)


def create_command(name: str, vm_id: str, sizes: dict[str, int] = SIZES) -> VmCreateRequested:
    return VmCreateRequested(
        command_id=uuid.uuid4(),
        agent_id=IDENTITY.producer_id,
        vm_id=vm_id,
        vm_name=name,
        disks=[VmDisk(disk_id=d, file=f"{d}.vhdx", size_bytes=s) for d, s in sizes.items()],
        nics=[
            NicAttachment(
                nic_id="nic0",
                network_id="net-recovery",
                subnet="corp",
                ip_mode="static",
                ip_address="10.20.0.150",
            ),
            NicAttachment(nic_id="nic1", network_id=None),
        ],
    )


async def test_create_writes_the_vm_from_its_disks_once(agent: Agent) -> None:
    materialise(agent.storage, "web01")
    done = await agent.run(create_command("web01", "vm-r1"))
    assert done.outcome == "succeeded", done.error
    assert done.result["already_existed"] is False
    assert done.result["vm"]["id"] == "vm-r1" and done.result["vm"]["state"] == "Running"
    on_disk = json.loads((agent.storage / "web01" / "vm.json").read_text())
    assert on_disk["nics"][0] == {
        "nic_id": "nic0",
        "network_id": "net-recovery",
        "subnet": "corp",
        "ip_mode": "static",
        "ip_address": "10.20.0.150",
    }
    assert [d["id"] for d in on_disk["disks"]] == ["d-os", "d-data"]
    assert load_vm(agent.storage, "web01").nics[1].network_id is None

    # The same VM again (a new command id): succeeded, left as is.
    again = await agent.run(create_command("web01", "vm-r1"))
    assert again.outcome == "succeeded" and again.result["already_existed"] is True
    # Another VM of that name: refused, the existing one untouched.
    other = await agent.run(create_command("web01", "vm-other"))
    assert other.outcome == "failed" and "different VM (id vm-r1)" in other.error
    assert load_vm(agent.storage, "web01").id == "vm-r1"


async def test_create_fails_clearly_without_the_disk_images(agent: Agent) -> None:
    missing = await agent.run(create_command("db01", "vm-db"))
    assert missing.outcome == "failed"
    assert "no image at" in missing.error and "materialise" in missing.error
    materialise(agent.storage, "db01", {"d-os": SIZES["d-os"], "d-data": BLOCK_SIZE})
    resized = await agent.run(create_command("db01", "vm-db"))
    assert resized.outcome == "failed"
    assert f"is {BLOCK_SIZE} bytes, the command says {2 * BLOCK_SIZE}" in resized.error
    assert not (agent.storage / "db01" / "vm.json").exists()
    bad_name = await agent.run(create_command("../x", "vm-x"))
    assert bad_name.outcome == "failed" and "not a usable VM name" in bad_name.error


async def test_delete_stops_forgets_and_removes_and_is_idempotent(agent: Agent) -> None:
    vm = create_vm(agent.storage, "test01", [2 * BLOCK_SIZE], vm_id="vm-t")
    agent.handler.workloads.start(vm, 50, Pattern.RANDOM)
    item_id = uuid.uuid4()
    enable = ReplicationEnableRequested(
        command_id=uuid.uuid4(),
        agent_id=IDENTITY.producer_id,
        item_id=item_id,
        vm_id=vm.id,
        vm_name=vm.name,
        disks=[
            DiskSpec(
                disk_id=d.id,
                path=str(disk_path(agent.storage, vm, d)),
                size_bytes=d.size_bytes,
            )
            for d in vm.disks
        ],
        copy_interval_seconds=3600,
        initial_replication=InitialReplication.SEEDED,
    )
    assert (await agent.run(enable)).outcome == "succeeded"
    delete = VmDeleteRequested(
        command_id=uuid.uuid4(), agent_id=IDENTITY.producer_id, vm_name="test01"
    )
    done = await agent.run(delete)
    assert done.outcome == "succeeded", done.error
    assert done.result["deleted"] is True and done.result["vm_id"] == "vm-t"
    assert done.result["replication_forgotten"] == [str(item_id)]
    assert not (agent.storage / "test01").exists()
    assert "test01" not in agent.handler.workloads.rates
    assert item_id not in agent.handler.replicator.items
    gone = await agent.run(
        VmDeleteRequested(command_id=uuid.uuid4(), agent_id=IDENTITY.producer_id, vm_name="test01")
    )
    assert gone.outcome == "succeeded" and gone.result["already_gone"] is True


async def test_a_failed_over_vm_starts_without_replication(agent: Agent) -> None:
    materialise(agent.storage, "web02")
    command = create_command("web02", "vm-w2").model_copy(update={"start": False})
    assert (await agent.run(command)).result["vm"]["state"] == "Off"
    start = VmPowerRequested(
        command_id=uuid.uuid4(), agent_id=IDENTITY.producer_id, vm_id="vm-w2", action="start"
    )
    done = await agent.run(start)
    assert done.outcome == "succeeded" and done.result["state"] == "Running"
    assert load_vm(agent.storage, "web02").state == "Running"


async def test_seeded_replication_ships_nothing_until_the_resync_then_only_differences(
    agent: Agent, tmp_path: Path
) -> None:
    materialise(agent.storage, "web03")
    await agent.run(create_command("web03", "vm-w3"))
    vm = load_vm(agent.storage, "web03")
    paths = {d.id: disk_path(agent.storage, vm, d) for d in vm.disks}
    seeds = {}
    for disk_id, path in paths.items():  # the target's older copy: what the source had before
        seeds[disk_id] = tmp_path / f"seed-{disk_id}"
        seeds[disk_id].write_bytes(path.read_bytes())
    item_id = uuid.uuid4()
    enable = ReplicationEnableRequested(
        command_id=uuid.uuid4(),
        agent_id=IDENTITY.producer_id,
        item_id=item_id,
        vm_id=vm.id,
        vm_name=vm.name,
        disks=[
            DiskSpec(disk_id=d, path=str(p), size_bytes=p.stat().st_size) for d, p in paths.items()
        ],
        copy_interval_seconds=1,
        initial_replication=InitialReplication.SEEDED,
        next_cycle_seq=2,
    )
    done = await agent.run(enable)
    assert done.outcome == "succeeded", done.error
    item = agent.handler.replicator.get(item_id)
    await eventually(
        lambda: _ready(item.state == "waiting_for_resync"), timeout=5, what="waiting state"
    )
    # The VM runs on: one block written through the agent, one block of the other disk.
    write_raw(paths["d-os"], BLOCK_SIZE, os.urandom(BLOCK_SIZE))  # around the agent
    agent.handler.workloads.host.write(
        vm.name, paths["d-data"], 1, os.urandom(BLOCK_SIZE)
    )  # through the agent
    final = VmPowerRequested(
        command_id=uuid.uuid4(), agent_id=IDENTITY.producer_id, vm_id="vm-w3", action="shutdown"
    )
    refused = await agent.run(final)
    assert refused.outcome == "failed" and "initial replication" in refused.error
    assert not shipped_files(tmp_path, item_id)  # nothing shipped
    resync_id = uuid.uuid4()
    for disk_id, seed in seeds.items():
        leaves = b"".join(disk_tree(seed).leaf_hashes())
        chunk = ResyncRequested(
            command_id=uuid.uuid4(),
            agent_id=IDENTITY.producer_id,
            item_id=item_id,
            resync_id=resync_id,
            cycle_seq=2,
            disk_id=disk_id,
            disk_count=2,
            size_bytes=seed.stat().st_size,
            chunk_no=0,
            chunks=1,
            first_index=0,
            leaf_hashes=base64.b64encode(leaves).decode(),
        )
        assert (await agent.run(chunk)).outcome == "succeeded"
    out = tmp_path / f"{item_id}-2.jsonl"

    async def shipped() -> list[dict[str, object]] | None:
        lines = out.read_text().splitlines() if out.exists() else []
        records = [json.loads(line) for line in lines]
        return records if records and records[-1]["type"] == "CycleCompleted" else None

    cycle = await eventually(shipped, timeout=10, what="the resync cycle")
    blocks = {
        (env["payload"]["disk_id"], b["index"])  # type: ignore[index]
        for env in cycle[1:-1]
        for b in env["payload"]["blocks"]  # type: ignore[index]
    }
    assert blocks == {("d-os", 1), ("d-data", 1)}
    assert cycle[-1]["payload"]["kind"] == "resync"  # type: ignore[index]
    await eventually(lambda: _ready(item.state == "replicating"), timeout=5, what="replicating")
    assert item.record.phase is ReplicationPhase.REPLICATING and item.record.next_seq == 3


def write_raw(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)


def shipped_files(folder: Path, item_id: uuid.UUID) -> list[Path]:
    return list(folder.glob(f"{item_id}-*.jsonl"))


async def _ready(value: bool) -> bool:
    return value
