"""Host agents' reports: initial replication progress, replication faults, and the answers to
the commands this service sent (`CommandCompleted`: a recovery host's applied point, an
enable that failed, and, through `answers`, the failover requests' handovers)."""

from __future__ import annotations

import logging
import uuid
from functools import partial

import asyncpg

from services.replication import repository as repo
from services.replication.context import Context, change_state
from services.replication.handlers import check_enable_answer
from services.replication.resync import require_resync
from shared.kafka.consumers import Handler
from shared.kafka.decode import Incoming, Rejected
from shared.schemas import agent as cmd
from shared.schemas.replication import Health, ItemState

log = logging.getLogger(__name__)


async def on_progress(conn: asyncpg.Connection, inc: Incoming) -> None:
    msg = inc.payload
    assert isinstance(msg, cmd.InitialReplicationProgressed)
    item = await repo.get_item(conn, msg.item_id, lock=True)
    if item is None or str(item["source_agent_id"]) != inc.envelope.producer_id:
        raise Rejected("wrong_agent", "progress for an item this agent does not replicate")
    await repo.update_item(
        conn, msg.item_id, initial_progress=msg.model_dump(mode="json", exclude={"item_id"})
    )


async def on_fault(ctx: Context, conn: asyncpg.Connection, inc: Incoming) -> None:
    msg = inc.payload
    assert isinstance(msg, cmd.ReplicationFaulted)
    item = await repo.get_item(conn, msg.item_id, lock=True)
    if item is None or str(item["source_agent_id"]) != inc.envelope.producer_id:
        raise Rejected("wrong_agent", "fault for an item this agent does not replicate")
    if msg.needs_resync and ItemState(item["state"]) is not ItemState.RESYNCHRONIZING:
        await require_resync(ctx, conn, item, f"agent: {msg.reason}")
    else:
        await repo.bump_stat(conn, msg.item_id, "network_failures")


async def on_replica_applied(conn: asyncpg.Connection, inc: Incoming) -> None:
    """The recovery host's answer to ReplicaPointApplyRequested."""
    msg = inc.payload
    assert isinstance(msg, cmd.CommandCompleted)
    try:
        item_id = uuid.UUID(str(msg.result.get("item_id")))
    except ValueError:
        raise Rejected("invalid_result", "a replica answer names no item") from None
    item = await repo.get_item(conn, item_id, lock=True)
    if item is None or str(item["recovery_agent_id"]) != inc.envelope.producer_id:
        raise Rejected("wrong_agent", "replica answer for an item this agent does not keep")
    if msg.outcome is cmd.CommandOutcome.FAILED:
        await repo.update_item(conn, item_id, replica_error=msg.error)
        return
    seq, roots = msg.result.get("cycle_seq"), msg.result.get("roots")
    if not isinstance(seq, int) or not isinstance(roots, dict):
        raise Rejected("invalid_result", "a replica answer needs cycle_seq and roots")
    if await repo.record_replica_point(conn, item_id, seq, roots):
        latest = max(seq, item["replica_seq"] or 0)
        await repo.update_item(conn, item_id, replica_seq=latest, replica_error=None)
    else:
        await repo.update_item(
            conn,
            item_id,
            replica_error=f"the recovery host's roots for point {seq} are not the source's",
        )


async def on_command_completed(
    answers: dict[str, Handler], conn: asyncpg.Connection, inc: Incoming
) -> None:
    """An agent's answer to a command: a replica point applied, one of `answers` (by command
    type), or a failed enable."""
    msg = inc.payload
    assert isinstance(msg, cmd.CommandCompleted)
    if msg.command_type == "ReplicaPointApplyRequested":
        await on_replica_applied(conn, inc)
        return
    if msg.command_type in answers:
        await answers[msg.command_type](conn, inc)
        return
    if msg.outcome is cmd.CommandOutcome.FAILED:
        log.warning(
            "agent command failed",
            extra={
                "command_id": str(msg.command_id),
                "type": msg.command_type,
                "error": msg.error,
            },
        )
        item_id = msg.result.get("item_id")
        if msg.command_type == "ReplicationEnableRequested" and item_id:
            try:
                item_uuid = uuid.UUID(str(item_id))
            except ValueError:
                raise Rejected("bad_result", f"item_id {str(item_id)[:100]!r}") from None
            item = await repo.get_item(conn, item_uuid, lock=True)
            if item is not None and item["active"]:
                check_enable_answer(item, inc)
                await change_state(
                    conn,
                    item,
                    ItemState.ERROR,
                    reason=msg.error,
                    health=Health.CRITICAL,
                    error=(
                        f"agent could not enable replication: {msg.error} (cause: the "
                        "source host could not start tracking the VM's disks; "
                        "recommendation: check the VM's disk images on its host, then "
                        "disable and enable protection again)"
                    ),
                )


def make_agent_event_handlers(
    ctx: Context, answers: dict[str, Handler] | None = None
) -> dict[str, Handler]:
    """Agent events; `answers`: handlers of `CommandCompleted` by command type (failover's)."""
    return {
        "InitialReplicationProgressed": on_progress,
        "ReplicationFaulted": partial(on_fault, ctx),
        "CommandCompleted": partial(on_command_completed, answers or {}),
    }
