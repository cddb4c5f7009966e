"""A point verified or exported by the recovery host (services/replication/host_points.py),
against the real PostgreSQL: the request goes out through the outbox as
`ReplicaPointExportRequested` to the item's recovery host; the API side waits for the answer
that a consumer (any instance's) records by the command's id; a failure comes back as the
host's reason, silence as a timeout; an answer from another host, or naming no request, is
refused."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from kit.poll import eventually
from kit.stack import migrated_pool
from services.replication.__main__ import MIGRATIONS
from services.replication.config import ReplicationSettings
from services.replication.context import Context
from services.replication.host_points import HostFailed, HostSilent, ask_host, on_exported
from shared.kafka.decode import Incoming, Rejected, decode_event
from shared.schemas import agent as cmd
from shared.schemas.envelope import new_envelope

pytestmark = pytest.mark.integration

ROOT = "ab" * 32


def item_and_point() -> tuple[dict[str, Any], dict[str, Any]]:
    item = {"item_id": uuid.uuid4(), "vault_id": uuid.uuid4(), "recovery_agent_id": uuid.uuid4()}
    point = {
        "cycle_seq": 7,
        "disks": [{"disk_id": "d0", "size_bytes": 1 << 20, "merkle_root": ROOT}],
    }
    return item, point


async def sent_command(pool: asyncpg.Pool, item_id: uuid.UUID) -> cmd.ReplicaPointExportRequested:
    """The item's command, once it is in the outbox."""

    async def queued() -> cmd.ReplicaPointExportRequested | None:
        async with pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT value FROM outbox WHERE event_type = 'ReplicaPointExportRequested'"
            )
        for row in rows:
            _, payload = decode_event(bytes(row["value"]))
            if isinstance(payload, cmd.ReplicaPointExportRequested) and payload.item_id == item_id:
                return payload
        return None

    return await eventually(queued, timeout=10, what="the export command in the outbox")


async def answer(
    ctx: Context, command: cmd.ReplicaPointExportRequested, producer: uuid.UUID, **kw: Any
) -> None:
    done = cmd.CommandCompleted(
        command_id=command.command_id, command_type="ReplicaPointExportRequested", **kw
    )
    env = new_envelope(done, vault_id=uuid.uuid4(), producer_id=str(producer))
    async with ctx.pool.acquire() as conn, conn.transaction():
        await on_exported(ctx, conn, Incoming(env, done, "agent-events", 0, 0, str(producer)))


async def test_the_hosts_answer_reaches_the_waiting_request(
    database_url: str, tmp_path: Path
) -> None:
    async with migrated_pool(database_url, "hostpoints", MIGRATIONS) as pool:
        ctx = Context(pool=pool, settings=ReplicationSettings(store_dir=tmp_path / "store"))
        item, point = item_and_point()
        host = item["recovery_agent_id"]
        waiting = asyncio.create_task(ask_host(ctx, item, point, "/srv/r1/export", 30))

        sent = await sent_command(pool, item["item_id"])
        assert (sent.agent_id, sent.item_id, sent.cycle_seq) == (host, item["item_id"], 7)
        assert sent.target_dir == "/srv/r1/export" and sent.disks[0].merkle_root == ROOT
        with pytest.raises(Rejected, match="another host"):
            await answer(ctx, sent, uuid.uuid4(), outcome=cmd.CommandOutcome.SUCCEEDED)
        result = {"request_id": str(sent.request_id), "ok": True, "disks": []}
        await answer(ctx, sent, host, outcome=cmd.CommandOutcome.SUCCEEDED, result=result)
        assert await asyncio.wait_for(waiting, 10) == result
        # recorded once: a redelivered answer changes nothing
        await answer(ctx, sent, host, outcome=cmd.CommandOutcome.FAILED, error="late")
        async with pool.acquire() as conn:
            assert (
                await conn.fetchval(
                    "SELECT error FROM host_requests WHERE request_id = $1", sent.request_id
                )
                is None
            )


async def test_a_failure_is_the_hosts_reason_and_silence_a_timeout(
    database_url: str, tmp_path: Path
) -> None:
    async with migrated_pool(database_url, "hostpoints", MIGRATIONS) as pool:
        ctx = Context(pool=pool, settings=ReplicationSettings(store_dir=tmp_path / "store"))
        item, point = item_and_point()
        waiting = asyncio.create_task(ask_host(ctx, item, point, None, 30))
        sent = await sent_command(pool, item["item_id"])
        assert sent.target_dir is None
        await answer(
            ctx,
            sent,
            item["recovery_agent_id"],
            outcome=cmd.CommandOutcome.FAILED,
            error="point 7 is not retained by this host's replica",
        )
        with pytest.raises(HostFailed, match="not retained"):
            await asyncio.wait_for(waiting, 10)
        with pytest.raises(HostSilent, match="did not answer within 1 s"):
            await ask_host(ctx, item, point, None, 1)
        unknown = cmd.ReplicaPointExportRequested(
            command_id=uuid.uuid4(),
            agent_id=item["recovery_agent_id"],
            item_id=item["item_id"],
            request_id=uuid.uuid4(),
            cycle_seq=7,
            disks=sent.disks,
        )
        with pytest.raises(Rejected, match="no known request"):
            await answer(
                ctx, unknown, item["recovery_agent_id"], outcome=cmd.CommandOutcome.SUCCEEDED
            )
