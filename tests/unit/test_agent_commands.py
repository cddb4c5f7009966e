"""Commands: only this agent's, only from a service of its vault, each executed once."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.host_agent.commands import COMMAND_TYPES, REPLICA_COMMAND_TYPES, CommandHandler
from services.host_agent.cycles import FileSink, signer_for
from services.host_agent.replica import SiteReplica
from services.host_agent.replica_feed import ReplicaFeed
from services.host_agent.replicator import Replicator
from services.host_agent.tracking import HostIO
from services.host_agent.vms import create_vm, disk_path, load_vm
from services.host_agent.wiring import Wiring
from services.host_agent.workload import Workloads
from shared import signing
from shared.edge_identity import Identity
from shared.kafka.decode import Incoming, Rejected
from shared.schemas.agent import (
    CommandCompleted,
    DiskSpec,
    ReplicationDisableRequested,
    ReplicationEnableRequested,
    ReplicationPauseRequested,
    ReplicationResumeRequested,
    VmPowerRequested,
)
from shared.schemas.envelope import EventPayload, new_envelope
from shared.schemas.registration import ProducerKind

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
    failover = {"VmCreateRequested", "VmPowerRequested", "VmDeleteRequested"}
    assert failover | {"ReplicaHandoverRequested", "DifferencingDisksRequested"} <= main
