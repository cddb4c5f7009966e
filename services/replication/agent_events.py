"""Host agents' reports: initial replication progress, replication faults, and the answers to
the commands this service sent (`CommandCompleted`: a recovery host's applied point, an
enable that failed, and, through `answers`, the failover requests' handovers)."""

from __future__ import annotations

import logging
import uuid
from functools import partial

import asyncpg

from services.replication import catch_up
from services.replication import repository as repo
from services.replication.context import Context
from services.replication.item import ProtectedItem
from services.replication.resync import require_resync
from services.replication.unit_of_work import ItemUnitOfWork
from shared.kafka.consumers import Handler
from shared.kafka.decode import Incoming, Rejected
from shared.schemas import agent as cmd

log = logging.getLogger(__name__)


def _from_source_agent(item: ProtectedItem | None, inc: Incoming, what: str) -> ProtectedItem:
    if item is None or str(item.source_agent_id) != inc.envelope.producer_id:
        raise Rejected("wrong_agent", f"{what} for an item this agent does not replicate")
    return item


async def on_progress(conn: asyncpg.Connection, inc: Incoming) -> None:
    msg = inc.payload
    assert isinstance(msg, cmd.InitialReplicationProgressed)
    async with ItemUnitOfWork(conn) as uow:
        item = _from_source_agent(await uow.load(msg.item_id), inc, "progress")
        item.note_progress(msg.model_dump(mode="json", exclude={"item_id"}))
        await uow.commit()


async def on_fault(ctx: Context, conn: asyncpg.Connection, inc: Incoming) -> None:
    msg = inc.payload
    assert isinstance(msg, cmd.ReplicationFaulted)
    async with ItemUnitOfWork(conn) as uow:
        item = _from_source_agent(await uow.load(msg.item_id), inc, "fault")
        if item.agent_fault(msg.needs_resync):
            await require_resync(ctx, conn, item, f"agent: {msg.reason}")
        else:
            await repo.bump_stat(conn, msg.item_id, "network_failures")
        await uow.commit()


async def on_replica_applied(ctx: Context, conn: asyncpg.Connection, inc: Incoming) -> None:
    """The recovery host's answer to ReplicaPointApplyRequested: the point it holds, or why
    it could not apply it (a replica that missed points catches up:
    services/replication/catch_up.py)."""
    msg = inc.payload
    assert isinstance(msg, cmd.CommandCompleted)
    async with ItemUnitOfWork(conn) as uow:
        item = await catch_up.load_host_item(
            uow, inc, "a replica answer", "replica answer for an item this agent does not keep"
        )
        if msg.outcome is cmd.CommandOutcome.FAILED:
            held, asked = msg.result.get("replica_seq"), msg.result.get("cycle_seq")
            if isinstance(held, int) and held >= 0:
                asked = asked if isinstance(asked, int) else None
                await catch_up.on_replica_behind(ctx, conn, item, held, msg.error, asked)
            else:
                item.replica_failed(msg.error)
        else:
            seq, roots = msg.result.get("cycle_seq"), msg.result.get("roots")
            if not isinstance(seq, int) or not isinstance(roots, dict):
                raise Rejected("invalid_result", "a replica answer needs cycle_seq and roots")
            matched = await repo.record_replica_point(conn, item.item_id, seq, roots)
            await catch_up.after_applied(ctx, conn, item, item.replica_applied(seq, matched))
        await uow.commit()


def check_enable_answer(item: ProtectedItem, inc: Incoming) -> None:
    """An enable failure counts only from the item's source agent, in its vault, for the
    enable command the item is waiting on."""
    msg = inc.payload
    assert isinstance(msg, cmd.CommandCompleted)
    if item.vault_id != inc.envelope.vault_id:
        raise Rejected("vault_mismatch", "the item belongs to another vault")
    if str(item.source_agent_id) != inc.envelope.producer_id:
        raise Rejected(
            "wrong_answerer",
            f"the enable command was sent to {item.source_agent_id}, "
            f"not {inc.envelope.producer_id}",
        )
    if msg.command_id != item.enable_command_id:
        raise Rejected("wrong_answerer", f"{msg.command_id} is not the item's enable command")


async def _enable_failed(conn: asyncpg.Connection, inc: Incoming, item_id: uuid.UUID) -> None:
    msg = inc.payload
    assert isinstance(msg, cmd.CommandCompleted)
    async with ItemUnitOfWork(conn) as uow:
        item = await uow.load(item_id)
        if item is not None and item.active:
            check_enable_answer(item, inc)
            item.enable_failed(msg.error)
            await uow.commit()


async def on_command_completed(
    answers: dict[str, Handler], conn: asyncpg.Connection, inc: Incoming
) -> None:
    """An agent's answer to a command: one of `answers` (by command type), or a failed
    enable."""
    msg = inc.payload
    assert isinstance(msg, cmd.CommandCompleted)
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
            await _enable_failed(conn, inc, item_uuid)


def make_agent_event_handlers(
    ctx: Context, answers: dict[str, Handler] | None = None
) -> dict[str, Handler]:
    """Agent events; `answers`: handlers of `CommandCompleted` by command type (failover's)."""
    return {
        "InitialReplicationProgressed": on_progress,
        "ReplicationFaulted": partial(on_fault, ctx),
        "CommandCompleted": partial(
            on_command_completed,
            {
                "ReplicaPointApplyRequested": partial(on_replica_applied, ctx),
                "ReplicaLeavesRequested": partial(catch_up.on_leaves_answered, ctx),
                **(answers or {}),
            },
        ),
    }
