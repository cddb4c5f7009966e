"""A recovery point verified or exported by the recovery host that keeps the item's replica,
for an item whose blocks this service does not keep (`DR_REPLICATION_KEEP_BLOCK_COPY=false`):
the API's `verify` and `materialise` send `ReplicaPointExportRequested` (through the outbox)
and wait for the host's `CommandCompleted`, which whichever instance consumes it records in
`host_requests`. The host reads every block of the point through a frozen view of its replica
and recomputes the roots (and, for an export, writes the images into a folder of its own
storage); nothing is read here."""

from __future__ import annotations

import asyncio
import time
import uuid
from functools import partial
from typing import Any

import asyncpg

from services.replication.context import Context, emit
from services.replication.materialise import on_handover, replica_disks
from shared.kafka.consumers import Handler
from shared.kafka.decode import Incoming, Rejected
from shared.schemas import agent as cmd

POLL_SECONDS = 0.2


class HostFailed(Exception):
    """The recovery host answered that it could not (its message says why)."""


class HostSilent(Exception):
    """The recovery host did not answer in time."""


async def ask_host(
    ctx: Context,
    item: dict[str, Any],
    point: dict[str, Any],
    target_dir: str | None,
    timeout: float,
) -> dict[str, Any]:
    """The host's result for point `point` of `item` (verified; exported to `target_dir`, a
    folder of the host's storage, if given). HostFailed or HostSilent otherwise."""
    deadline = time.monotonic() + timeout
    request_id = uuid.uuid4()
    command_id = uuid.uuid5(request_id, "replica-export")
    agent_id = item["recovery_agent_id"]
    async with ctx.pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO host_requests (request_id, command_id, item_id, agent_id, cycle_seq,"
            " kind) VALUES ($1, $2, $3, $4, $5, $6)",
            request_id,
            command_id,
            item["item_id"],
            agent_id,
            point["cycle_seq"],
            "verify" if target_dir is None else "export",
        )
        await emit(
            conn,
            item["vault_id"],
            cmd.ReplicaPointExportRequested(
                command_id=command_id,
                agent_id=agent_id,
                item_id=item["item_id"],
                request_id=request_id,
                cycle_seq=point["cycle_seq"],
                disks=replica_disks(point["disks"]),
                target_dir=target_dir,
            ),
            str(agent_id),
        )
    while True:
        async with ctx.pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT answered_at, answer, error FROM host_requests WHERE request_id = $1",
                request_id,
            )
        if row is not None and row["answered_at"] is not None:
            if row["error"] is not None:
                raise HostFailed(str(row["error"]))
            return dict(row["answer"] or {})
        if time.monotonic() >= deadline:
            raise HostSilent(
                f"the recovery host (agent {agent_id}) did not answer within {timeout:.0f} s: "
                "check that its agent runs and reaches Kafka, then retry"
            )
        await asyncio.sleep(POLL_SECONDS)


async def replica_reaches(ctx: Context, item_id: uuid.UUID, seq: int, wait: float) -> None:
    """Until the item's replica holds point `seq` (as its host reported), at most `wait` s: a
    point just committed is being applied there."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        async with ctx.pool.acquire() as conn:
            held = await conn.fetchval(
                "SELECT replica_seq FROM protected_items WHERE item_id = $1", item_id
            )
        if (held or 0) >= seq:
            return
        await asyncio.sleep(POLL_SECONDS)


async def on_exported(ctx: Context, conn: asyncpg.Connection, inc: Incoming) -> None:
    """The host's answer, recorded for the waiting request (idempotent); or, for a failover's
    request for a copy, its answer (services/replication/materialise.py)."""
    msg = inc.payload
    assert isinstance(msg, cmd.CommandCompleted)
    row = await conn.fetchrow(
        "SELECT request_id, agent_id FROM host_requests WHERE command_id = $1", msg.command_id
    )
    if row is None:
        await on_handover(ctx, conn, inc)
        return
    if str(row["agent_id"]) != inc.envelope.producer_id:
        raise Rejected("wrong_agent", "an export answer from another host than the one asked")
    failed = msg.outcome is cmd.CommandOutcome.FAILED
    await conn.execute(
        "UPDATE host_requests SET answered_at = now(), answer = $2, error = $3"
        " WHERE request_id = $1 AND answered_at IS NULL",
        row["request_id"],
        None if failed else msg.result,
        (msg.error or "the recovery host could not do it") if failed else None,
    )


async def prune_host_requests(pool: asyncpg.Pool, older_than_s: float = 3600) -> None:
    async with pool.acquire() as conn:
        await conn.execute(
            "DELETE FROM host_requests WHERE created_at < now() - make_interval(secs => $1)",
            older_than_s,
        )


def export_answers(ctx: Context) -> dict[str, Handler]:
    """`CommandCompleted` handlers by command type."""
    return {"ReplicaPointExportRequested": partial(on_exported, ctx)}
