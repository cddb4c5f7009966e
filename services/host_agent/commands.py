"""Commands from `agent.commands.v1` -> the replicator, and a `CommandCompleted` for each.

Only commands addressed to this agent (`agent_id`) are handled; others (the topic carries every
agent's commands) are skipped. A command must come from a service (`service:*`) of this agent's
vault, else it goes to the DLQ. Idempotency: each result is kept in
`<state_dir>/commands/<command_id>.json` before it is published; a repeated command id gets the
same `CommandCompleted` again and nothing is executed twice (a seed's leaf hashes are
reported again before it, from the replica, if it is still at the seeded point).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path
from typing import Any

from prometheus_client import Counter

from services.host_agent import vm_lifecycle
from services.host_agent.item_record import ReplicationPhase
from services.host_agent.replica_feed import ReplicaFeed
from services.host_agent.replicator import Replicator
from services.host_agent.vms import VmNotFound, find_vm, image_sizes, set_state
from services.host_agent.wiring import CommandFailed, Emit
from services.host_agent.workload import Workloads
from shared.edge_identity import Identity
from shared.files import write_atomic
from shared.kafka.decode import Incoming, Rejected
from shared.schemas.agent import (
    CommandCompleted,
    CommandOutcome,
    DifferencingDisksRequested,
    DiskImagesCheckRequested,
    ReplicaDeleteRequested,
    ReplicaHandoverRequested,
    ReplicaLeavesRequested,
    ReplicaPointApplyRequested,
    ReplicaPointExportRequested,
    ReplicaSeedRequested,
    ReplicationDisableRequested,
    ReplicationEnableRequested,
    ReplicationPauseRequested,
    ReplicationResumeRequested,
    ResyncRequested,
    VmCreateRequested,
    VmDeleteRequested,
    VmPowerRequested,
)
from shared.schemas.envelope import EventPayload
from shared.schemas.inventory import VmState

log = logging.getLogger(__name__)

COMMANDS = Counter("dr_agent_commands_total", "Commands handled", ["type", "outcome"])

COMMAND_TYPES = (
    "ReplicationEnableRequested",
    "ReplicationDisableRequested",
    "ReplicationPauseRequested",
    "ReplicationResumeRequested",
    "ResyncRequested",
    "VmPowerRequested",
    "VmCreateRequested",
    "VmDeleteRequested",
    "ReplicaPointApplyRequested",
    "ReplicaDeleteRequested",
    "ReplicaHandoverRequested",
    "DifferencingDisksRequested",
    "ReplicaSeedRequested",
    "DiskImagesCheckRequested",
    "ReplicaPointExportRequested",
    "ReplicaLeavesRequested",
)
# Keeping the recovery-site replica has a lane (consumer group) of its own: a backlog of points
# to apply never holds up a failover's commands (a VM's creation, power or deletion, the
# replica's handover, a test failover's differencing disks) nor replication commands. Within
# each lane, commands keep their order; a failover asks for a point the replica already holds,
# and the replica's per-item lock orders its work on one item across the lanes.
# A seed is in that lane too: the item's first points are applied after it; and the report of
# a replica's leaves for a catch-up: the leaves of HEAD after the points applied before it.
# Verifying or exporting a point is not: it reads through a frozen view (in a thread) and must
# neither wait behind a backlog of points nor hold one up.
REPLICA_COMMAND_TYPES = frozenset(
    {
        "ReplicaPointApplyRequested",
        "ReplicaDeleteRequested",
        "ReplicaSeedRequested",
        "ReplicaLeavesRequested",
    }
)


class CommandLog:
    """command id -> the `CommandCompleted` sent for it."""

    def __init__(self, state_dir: Path) -> None:
        self.folder = state_dir / "commands"
        self.folder.mkdir(parents=True, exist_ok=True)

    def get(self, command_id: uuid.UUID) -> CommandCompleted | None:
        path = self.folder / f"{command_id}.json"
        return CommandCompleted.model_validate_json(path.read_text()) if path.exists() else None

    def put(self, completed: CommandCompleted) -> None:
        write_atomic(
            self.folder / f"{completed.command_id}.json", completed.model_dump_json().encode()
        )


class CommandHandler:
    def __init__(
        self,
        identity: Identity,
        emit: Emit,
        replicator: Replicator,
        workloads: Workloads,
        storage: Path,
        state_dir: Path,
        replica_feed: ReplicaFeed,
    ) -> None:
        self.identity = identity
        self.emit = emit
        self.replicator = replicator
        self.workloads = workloads
        self.storage = storage
        self.replica_feed = replica_feed
        self.done = CommandLog(state_dir)

    @property
    def handlers(self) -> dict[str, Any]:
        """The handlers of the main lane: every command but the replica's."""
        return dict.fromkeys(
            (t for t in COMMAND_TYPES if t not in REPLICA_COMMAND_TYPES), self.handle
        )

    @property
    def replica_handlers(self) -> dict[str, Any]:
        """The handlers of the replica lane."""
        return dict.fromkeys((t for t in COMMAND_TYPES if t in REPLICA_COMMAND_TYPES), self.handle)

    async def handle(self, incoming: Incoming) -> None:
        command = incoming.payload
        agent_id = getattr(command, "agent_id", None)
        if agent_id != self.identity.producer_id:
            return  # another agent's command
        env = incoming.envelope
        if not env.producer_id.startswith("service:"):
            raise Rejected("not_a_service", f"commands come from services, not {env.producer_id}")
        if env.vault_id != self.identity.vault_id:
            raise Rejected("vault_mismatch", f"command for vault {env.vault_id}")
        command_id: uuid.UUID = command.command_id  # type: ignore[attr-defined]
        completed = self.done.get(command_id)
        if completed is not None:
            log.info("repeated command: result sent again", extra={"command_id": str(command_id)})
            if (
                isinstance(command, ReplicaSeedRequested)
                and completed.outcome is CommandOutcome.SUCCEEDED
            ):
                await self.replica_feed.report_seeded_again(command, self.emit)
        else:
            try:
                result = await self.execute(command)
                completed = CommandCompleted(
                    command_id=command_id,
                    command_type=env.type,
                    outcome=CommandOutcome.SUCCEEDED,
                    result=result,
                )
            except (CommandFailed, VmNotFound, OSError, ValueError) as exc:
                # the item shows the failure; the request (a failover's) gets its answer
                names = {
                    key: str(value)
                    for key in ("item_id", "request_id")
                    if (value := getattr(command, key, None)) is not None
                }
                details = exc.details if isinstance(exc, CommandFailed) else {}
                completed = CommandCompleted(
                    command_id=command_id,
                    command_type=env.type,
                    outcome=CommandOutcome.FAILED,
                    error=str(exc),
                    result=details | names,
                )
            self.done.put(completed)
            COMMANDS.labels(env.type, completed.outcome.value).inc()
            log.info(
                "command handled",
                extra={
                    "command_id": str(command_id),
                    "type": env.type,
                    "outcome": completed.outcome.value,
                    "error": completed.error,
                },
            )
        await self.emit(completed)

    async def execute(self, command: EventPayload) -> dict[str, Any]:
        r = self.replicator
        match command:
            case ReplicationEnableRequested():
                return await r.enable(command)
            case ReplicationDisableRequested():
                return await r.disable(command.item_id)
            case ReplicationPauseRequested():
                return r.pause(command.item_id, True)
            case ReplicationResumeRequested():
                return r.pause(command.item_id, False)
            case ResyncRequested():
                return r.resync_chunk(command)
            case VmPowerRequested():
                return await self.power(command)
            case VmCreateRequested():
                return await vm_lifecycle.create_vm(self.storage, command)
            case VmDeleteRequested():
                return await vm_lifecycle.delete_vm(
                    self.storage, command, self.workloads, r, self.replica_feed.replica
                )
            case ReplicaPointApplyRequested():
                return await self.replica_feed.apply(command)
            case ReplicaHandoverRequested():
                return await self.replica_feed.handover(command)
            case DifferencingDisksRequested():
                return await self.replica_feed.differencing(command)
            case ReplicaDeleteRequested():
                return await self.replica_feed.delete(command.item_id)
            case ReplicaSeedRequested():
                return await self.replica_feed.seed(command, self.emit)
            case ReplicaPointExportRequested():
                return await self.replica_feed.export(command)
            case ReplicaLeavesRequested():
                return await self.replica_feed.report_leaves(command, self.emit)
            case DiskImagesCheckRequested():
                sizes = await asyncio.to_thread(image_sizes, self.storage, command.images)
                return {"images": sizes}
        raise CommandFailed(f"unsupported command {type(command).__name__}")

    async def power(self, command: VmPowerRequested) -> dict[str, Any]:
        item = self.replicator.by_vm(command.vm_id)
        name = item.record.vm_name if item else find_vm(self.storage, command.vm_id).name
        result: dict[str, Any] = {"vm_name": name}
        if command.action == "shutdown":
            self.workloads.stop(name)
            set_state(self.storage, name, VmState.OFF)
            result["state"] = VmState.OFF.value
            if item is not None and item.record.phase is not ReplicationPhase.SYNCED:
                result["final_cycle"] = await item.final_cycle()
            elif item is not None:
                result["final_cycle"] = {
                    "cycle_seq": item.record.last_cycle_seq,
                    "roots": item.record.roots,
                }
        else:
            set_state(self.storage, name, VmState.RUNNING)
            result["state"] = VmState.RUNNING.value
            if item is not None:
                item.resume_after_final()
        return result
