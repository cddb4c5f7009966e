"""Commands: only this agent's, only from a service of its vault, each executed once."""

from __future__ import annotations

import base64
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from services.host_agent.commands import COMMAND_TYPES, REPLICA_COMMAND_TYPES, CommandHandler
from services.host_agent.cycles import FileSink, signer_for
from services.host_agent.replica import SiteReplica
from services.host_agent.replica_feed import ReplicaFeed
from services.host_agent.replica_seed import SeedDisk
from services.host_agent.replicator import Replicator
from services.host_agent.tracking import HostIO
from services.host_agent.vms import create_vm, disk_path, load_vm
from services.host_agent.wiring import Wiring
from services.host_agent.workload import Workloads
from shared import signing
from shared.edge_identity import Identity
from shared.kafka.decode import Incoming, Rejected
from shared.merkle import disk_root
from shared.schemas.agent import (
    LEAVES_PER_REPORT,
    CommandCompleted,
    DiskImagesCheckRequested,
    DiskSpec,
    ReplicaDisk,
    ReplicaHandoverRequested,
    ReplicaLeavesReported,
    ReplicaPointExportRequested,
    ReplicaSeedRequested,
    ReplicationDisableRequested,
    ReplicationEnableRequested,
    ReplicationPauseRequested,
    ReplicationResumeRequested,
    SeedImage,
    VmPowerRequested,
)
from shared.schemas.envelope import EventPayload, new_envelope
from shared.schemas.registration import ProducerKind
from tests.support.site_replica_worker import (
    SEED_REQUEST,
    seed_bytes,
    seed_leaves,
    write_seed_images,
)

IDENTITY = Identity(
    producer_id=uuid.uuid4(),
    vault_id=uuid.uuid4(),
    kind=ProducerKind.AGENT,
    name="hv-1",
    site="primary",
    generation=1,
    credential="drc_unit-test",
    private_key=signing.private_key_hex(signing.new_private_key()),
)


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[tuple[CommandHandler, list[EventPayload]]]:
    storage, host = tmp_path / "storage", HostIO()
    sent: list[EventPayload] = []

    async def emit(payload: EventPayload) -> None:
        sent.append(payload)

    sign = signer_for(IDENTITY)
    wiring = Wiring(sign, emit, lambda item, seq: FileSink(sign, tmp_path / f"{item}-{seq}.jsonl"))
    replicator = Replicator(tmp_path / "state", host, wiring)
    await replicator.start()
    create_vm(storage, "web01", [2**20], vm_id="vm-1")
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
    yield handler, sent
    await replicator.stop()


async def deliver(handler: CommandHandler, payload: EventPayload, **kw: object) -> None:
    env = new_envelope(
        payload,
        vault_id=kw.get("vault_id", IDENTITY.vault_id),  # type: ignore[arg-type]
        producer_id=str(kw.get("producer_id", "service:replication")),
    )
    await handler.handle(Incoming(env, payload, "agent.commands.v1", 0, 0, None))


def completed(sent: list[EventPayload]) -> list[CommandCompleted]:
    return [e for e in sent if isinstance(e, CommandCompleted)]


async def test_a_repeated_command_id_is_answered_again_not_executed_again(
    agent: tuple[CommandHandler, list[EventPayload]], tmp_path: Path
) -> None:
    handler, sent = agent
    vm = load_vm(tmp_path / "storage", "web01")
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
                path=str(disk_path(tmp_path / "storage", vm, d)),
                size_bytes=d.size_bytes,
            )
            for d in vm.disks
        ],
        copy_interval_seconds=3600,
    )
    await deliver(handler, enable)
    pause = ReplicationPauseRequested(
        command_id=uuid.uuid4(), agent_id=IDENTITY.producer_id, item_id=item_id
    )
    resume = ReplicationResumeRequested(
        command_id=uuid.uuid4(), agent_id=IDENTITY.producer_id, item_id=item_id
    )
    await deliver(handler, pause)
    await deliver(handler, resume)
    await deliver(handler, pause)  # a redelivery: same answer, no effect
    replies = completed(sent)
    assert [r.command_type for r in replies] == [
        "ReplicationEnableRequested",
        "ReplicationPauseRequested",
        "ReplicationResumeRequested",
        "ReplicationPauseRequested",
    ]
    assert all(r.outcome == "succeeded" for r in replies), replies
    assert replies[1] == replies[3]
    assert not handler.replicator.get(item_id).record.paused

    # Idempotency outlives a restart of the agent (the results are persisted).
    again = CommandHandler(
        IDENTITY, handler.emit, handler.replicator, handler.workloads, handler.storage,
        tmp_path / "state", handler.replica_feed,
    )  # fmt: skip
    await deliver(again, pause)
    assert completed(sent)[-1] == replies[1]
    assert not handler.replicator.get(item_id).record.paused

    # A failure is an answer too, and also kept.
    missing = ReplicationPauseRequested(
        command_id=uuid.uuid4(), agent_id=IDENTITY.producer_id, item_id=uuid.uuid4()
    )
    await deliver(handler, missing)
    assert completed(sent)[-1].outcome == "failed"
    assert "not replicated" in completed(sent)[-1].error
    assert completed(sent)[-1].result == {"item_id": str(missing.item_id)}  # shown on the item

    power = VmPowerRequested(
        command_id=uuid.uuid4(), agent_id=IDENTITY.producer_id, vm_id="vm-1", action="start"
    )
    await deliver(handler, power)
    assert completed(sent)[-1].result["state"] == "Running"
    disable = ReplicationDisableRequested(
        command_id=uuid.uuid4(), agent_id=IDENTITY.producer_id, item_id=item_id
    )
    await deliver(handler, disable)
    assert completed(sent)[-1].result == {"was_enabled": True}
    assert not (tmp_path / "state" / "items" / str(item_id)).exists()


async def test_commands_for_others_are_ignored_and_foreign_ones_rejected(
    agent: tuple[CommandHandler, list[EventPayload]],
) -> None:
    handler, sent = agent
    other = ReplicationPauseRequested(
        command_id=uuid.uuid4(), agent_id=uuid.uuid4(), item_id=uuid.uuid4()
    )
    await deliver(handler, other)
    assert sent == []
    mine = ReplicationPauseRequested(
        command_id=uuid.uuid4(), agent_id=IDENTITY.producer_id, item_id=uuid.uuid4()
    )
    with pytest.raises(Rejected) as not_service:
        await deliver(handler, mine, producer_id=str(uuid.uuid4()))
    assert not_service.value.reason == "not_a_service"
    with pytest.raises(Rejected) as wrong_vault:
        await deliver(handler, mine, vault_id=uuid.uuid4())
    assert wrong_vault.value.reason == "vault_mismatch"
    assert sent == []


async def test_the_replicas_commands_have_a_lane_of_their_own(
    agent: tuple[CommandHandler, list[EventPayload]],
) -> None:
    handler, _ = agent
    main, replica = set(handler.handlers), set(handler.replica_handlers)
    assert not main & replica  # each command is taken by one lane only
    assert main | replica == set(COMMAND_TYPES)
    assert replica == REPLICA_COMMAND_TYPES
    assert "ReplicaSeedRequested" in replica  # before the item's first points
    failover = {"VmCreateRequested", "VmPowerRequested", "VmDeleteRequested"}
    assert failover | {"ReplicaHandoverRequested", "DifferencingDisksRequested"} <= main
    assert "DiskImagesCheckRequested" in main  # never behind a backlog of points
    assert "ReplicaPointExportRequested" in main  # reads a view: never behind points either


def seed_command(item_id: uuid.UUID, disks: list[SeedDisk], **kw: Any) -> ReplicaSeedRequested:
    return ReplicaSeedRequested(
        command_id=uuid.uuid4(),
        agent_id=IDENTITY.producer_id,
        item_id=item_id,
        request_id=kw.get("request_id", uuid.UUID(SEED_REQUEST)),
        cycle_seq=1,
        disks=[
            SeedImage(
                disk_id=d.disk_id,
                path=str(kw.get("path", d.path)),
                size_bytes=d.size_bytes,
                block_size=d.block_size,
            )
            for d in disks
        ],
    )


async def test_a_seed_reports_every_disks_leaves_then_answers(
    agent: tuple[CommandHandler, list[EventPayload]], tmp_path: Path
) -> None:
    handler, sent = agent
    disks = write_seed_images(tmp_path / "storage" / "web01")
    item_id = uuid.uuid4()
    seed = seed_command(item_id, disks)
    await deliver(handler, seed)
    *leaves, answer = sent
    assert isinstance(answer, CommandCompleted) and answer.outcome == "succeeded", answer
    roots = {d.disk_id: disk_root(d.path, d.size_bytes, d.block_size) for d in disks}
    assert answer.result == {
        "item_id": str(item_id),
        "request_id": SEED_REQUEST,
        "cycle_seq": 1,
        "roots": roots,
    }
    # disk by disk, chunk by chunk, at most LEAVES_PER_REPORT each: d0's 32,773 in three
    reports = [r for r in leaves if isinstance(r, ReplicaLeavesReported)]
    assert len(reports) == len(leaves)
    assert [(r.disk_id, r.chunk_no, r.chunks, r.first_index) for r in reports] == [
        ("d0", 0, 3, 0),
        ("d0", 1, 3, LEAVES_PER_REPORT),
        ("d0", 2, 3, 2 * LEAVES_PER_REPORT),
        ("d1", 0, 1, 0),
    ]
    for disk in disks:
        mine = [r for r in reports if r.disk_id == disk.disk_id]
        assert all(
            (r.item_id, r.request_id, r.cycle_seq, r.disk_count) == (item_id, seed.request_id, 1, 2)
            and (r.size_bytes, r.block_size) == (disk.size_bytes, disk.block_size)
            for r in mine
        )
        got = b"".join(base64.b64decode(r.leaf_hashes) for r in mine)
        assert got == seed_leaves(disk), disk.disk_id
    replica = handler.replica_feed.replica
    for disk in disks:
        assert replica.image_path(str(item_id), disk.disk_id).read_bytes() == seed_bytes(disk)

    # The same command again (a redelivery): the leaves and the answer again, no copy (the
    # images are gone); so for a new command of the same request.
    for disk in disks:
        disk.path.unlink()
    for again in (seed, seed.model_copy(update={"command_id": uuid.uuid4()})):
        sent.clear()
        await deliver(handler, again)
        assert sent[:-1] == leaves
        assert isinstance(sent[-1], CommandCompleted)
        assert sent[-1].result == answer.result and sent[-1].outcome == "succeeded"

    # Another request for the item: refused, the replica kept.
    sent.clear()
    await deliver(handler, seed_command(item_id, disks, request_id=uuid.uuid4()))
    assert len(sent) == 1 and completed(sent)[0].outcome == "failed"
    assert "is at point 1, not seeded at point 1 from these images" in completed(sent)[0].error
    assert replica.roots(str(item_id)) == roots


async def test_a_seed_from_outside_the_storage_or_a_missing_image_fails(
    agent: tuple[CommandHandler, list[EventPayload]], tmp_path: Path
) -> None:
    handler, sent = agent
    disks = write_seed_images(tmp_path / "elsewhere")
    link = tmp_path / "storage" / "link.vhdx"
    link.symlink_to(disks[0].path)
    item_id = uuid.uuid4()
    for path in (disks[0].path, link, tmp_path / "storage" / ".." / "elsewhere" / "d0.vhdx"):
        sent.clear()
        await deliver(handler, seed_command(item_id, disks[:1], path=path))
        assert len(sent) == 1 and completed(sent)[0].outcome == "failed", path
        assert "images are read from this host's storage only" in completed(sent)[0].error
    sent.clear()
    await deliver(handler, seed_command(item_id, disks[:1], path=tmp_path / "storage" / "no.vhdx"))
    assert len(sent) == 1 and "no.vhdx does not exist" in completed(sent)[0].error
    assert handler.replica_feed.replica.head(str(item_id)).seq == 0


async def test_a_disk_images_check_answers_the_size_of_each_file_in_the_storage_only(
    agent: tuple[CommandHandler, list[EventPayload]], tmp_path: Path
) -> None:
    handler, sent = agent
    storage = tmp_path / "storage"
    vm = load_vm(storage, "web01")
    image = disk_path(storage, vm, vm.disks[0])
    elsewhere = tmp_path / "elsewhere.vhdx"
    elsewhere.write_bytes(b"x" * 4096)
    (storage / "out.vhdx").symlink_to(elsewhere)
    (storage / "in.vhdx").symlink_to(image)  # a link inside the storage is followed
    (storage / "loop.vhdx").symlink_to(storage / "loop.vhdx")
    asked = {
        str(image): 2**20,
        str(storage / "in.vhdx"): 2**20,
        str(storage / "web01" / ".." / "web01" / image.name): 2**20,
        str(storage / "gone.vhdx"): None,  # missing: an answer, not a failure
        str(storage / "web01"): None,  # a folder
        str(storage): None,
        str(elsewhere): None,  # outside the storage
        str(storage / ".." / "elsewhere.vhdx"): None,
        str(storage / "out.vhdx"): None,  # a link pointing out
        str(storage / "loop.vhdx"): None,
        "web01/d0.vhdx": None,  # not an absolute path
        "/" + "a" * 1023: None,  # too long a name for the filesystem
    }
    check = DiskImagesCheckRequested(
        command_id=uuid.uuid4(), agent_id=IDENTITY.producer_id, images=list(asked)
    )
    await deliver(handler, check)
    [answer] = completed(sent)
    assert answer.outcome == "succeeded" and answer.command_type == "DiskImagesCheckRequested"
    assert answer.result == {"images": asked}

    # a redelivery is answered the same, even if the file went meanwhile
    image.unlink()
    await deliver(handler, check)
    assert completed(sent)[-1] == answer
    await deliver(handler, check.model_copy(update={"command_id": uuid.uuid4()}))
    assert completed(sent)[-1].result["images"][str(image)] is None

    base = {"command_id": uuid.uuid4(), "agent_id": uuid.uuid4()}
    for images in ([], ["/s/d.vhdx"] * 65, [""], ["/" + "a" * 1024]):
        with pytest.raises(ValidationError):
            DiskImagesCheckRequested(**base, images=images)  # type: ignore[arg-type]


def test_seed_and_leaves_schemas_refuse_what_cannot_be_right() -> None:
    disk = SeedImage(disk_id="d0", path="/s/d0.vhdx", size_bytes=10)
    assert disk.block_size == 65536
    base = {
        "command_id": uuid.uuid4(),
        "agent_id": uuid.uuid4(),
        "item_id": uuid.uuid4(),
        "request_id": uuid.uuid4(),
        "cycle_seq": 1,
    }
    with pytest.raises(ValidationError, match="each disk is named once"):
        ReplicaSeedRequested(**base, disks=[disk, disk])
    with pytest.raises(ValidationError):
        ReplicaSeedRequested(**base, disks=[])
    leaf = bytes(32)
    report = {
        "item_id": uuid.uuid4(),
        "request_id": uuid.uuid4(),
        "cycle_seq": 1,
        "disk_id": "d0",
        "disk_count": 1,
        "size_bytes": 65536 * 3,
        "block_size": 65536,
        "chunk_no": 0,
        "chunks": 1,
        "first_index": 0,
    }
    ok = ReplicaLeavesReported(**report, leaf_hashes=base64.b64encode(leaf * 3).decode())
    assert ok.first_index == 0
    bad = {
        "leaves past the disk's 3 blocks": {"leaf_hashes": base64.b64encode(leaf * 4).decode()},
        "not whole 32-byte digests": {"leaf_hashes": base64.b64encode(leaf + b"x" * 12).decode()},
        "not base64": {"leaf_hashes": "!" * 44},
        "chunk 1 of 1": {"chunk_no": 1, "leaf_hashes": base64.b64encode(leaf).decode()},
        "at most 699052 characters": {
            "size_bytes": 2**40,
            "leaf_hashes": base64.b64encode(leaf * (LEAVES_PER_REPORT + 1)).decode(),
        },
    }
    for error, fields in bad.items():
        with pytest.raises(ValidationError, match=error):
            ReplicaLeavesReported(**{**report, **fields})  # type: ignore[arg-type]


async def seeded(
    handler: CommandHandler, sent: list[EventPayload], tmp_path: Path
) -> tuple[uuid.UUID, list[SeedDisk], list[ReplicaDisk]]:
    """An item's replica seeded on the agent from two images in its storage: the item, the
    images, and the point's disks with their roots."""
    disks = write_seed_images(tmp_path / "storage" / "web01", d0_blocks=100)
    item_id = uuid.uuid4()
    await deliver(handler, seed_command(item_id, disks))
    roots = completed(sent)[-1].result["roots"]
    point = [
        ReplicaDisk(
            disk_id=d.disk_id,
            size_bytes=d.size_bytes,
            block_size=d.block_size,
            merkle_root=roots[d.disk_id],
        )
        for d in disks
    ]
    return item_id, disks, point


async def test_a_seeded_replica_is_handed_over_as_any_other(
    agent: tuple[CommandHandler, list[EventPayload]], tmp_path: Path
) -> None:
    handler, sent = agent
    item_id, disks, point = await seeded(handler, sent, tmp_path)
    handover = ReplicaHandoverRequested(
        command_id=uuid.uuid4(),
        agent_id=IDENTITY.producer_id,
        item_id=item_id,
        request_id=uuid.uuid4(),
        cycle_seq=1,
        target_dir=str(tmp_path / "storage" / "web01-failover"),
        disks=point,
    )
    await deliver(handler, handover)
    assert completed(sent)[-1].outcome == "succeeded", completed(sent)[-1].error
    for disk in disks:
        handed = tmp_path / "storage" / "web01-failover" / f"{disk.disk_id}.vhdx"
        assert handed.read_bytes() == seed_bytes(disk)
    assert handler.replica_feed.replica.head(str(item_id)).seq == 0  # consumed


async def test_a_point_of_the_replica_is_exported_through_the_command(
    agent: tuple[CommandHandler, list[EventPayload]], tmp_path: Path
) -> None:
    handler, sent = agent
    item_id, disks, point = await seeded(handler, sent, tmp_path)

    def export(seq: int) -> ReplicaPointExportRequested:
        return ReplicaPointExportRequested(
            command_id=uuid.uuid4(),
            agent_id=IDENTITY.producer_id,
            item_id=item_id,
            request_id=uuid.uuid4(),
            cycle_seq=seq,
            target_dir=str(tmp_path / "storage" / "exported"),
            disks=point,
        )

    await deliver(handler, export(1))
    answer = completed(sent)[-1]
    assert answer.outcome == "succeeded", answer.error
    assert answer.result["ok"] is True and answer.result["cycle_seq"] == 1
    for disk, d in zip(disks, answer.result["disks"], strict=True):
        path = (tmp_path / "storage" / "exported" / f"{disk.disk_id}.vhdx").resolve()
        assert d["merkle_root"] == d["expected_root"] and d["path"] == str(path)
        assert path.read_bytes() == seed_bytes(disk)
    second = export(2)
    await deliver(handler, second)
    failed = completed(sent)[-1]
    assert failed.outcome == "failed"
    assert "point 2 is not retained by this host's replica (it holds 1..1)" in failed.error
    # the item shows it; the request it answers is named
    assert failed.result == {"item_id": str(item_id), "request_id": str(second.request_id)}
