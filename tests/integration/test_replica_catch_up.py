"""A recovery host's answers about an item's replica, against the real PostgreSQL: an answer
that names no item, or comes from another host than the item's, is refused (to the DLQ with
the reason); a failed apply that says the replica is behind starts its catch-up (the host is
asked for its leaves), and the host's leaves, once they give the roots it reports, turn into
a resync of the source agent; leaves that do not add up retry the catch-up later."""

from __future__ import annotations

import base64
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from kit.stack import migrated_pool
from services.replication import repository as repo
from services.replication.__main__ import MIGRATIONS
from services.replication.agent_events import on_replica_applied
from services.replication.catch_up import on_leaves_answered, on_leaves_reported
from services.replication.config import ReplicationSettings
from services.replication.context import Context
from shared.kafka.decode import Incoming, Rejected, decode_event
from shared.merkle import MerkleTree, block_hash
from shared.schemas import agent as cmd
from shared.schemas.envelope import EventPayload, new_envelope
from shared.schemas.replication import ItemState

pytestmark = pytest.mark.integration

BS = 65536
BLOCKS = [bytes([i]) * BS for i in range(4)]


async def new_item(conn: asyncpg.Connection) -> dict[str, Any]:
    item_id, host = uuid.uuid4(), uuid.uuid4()
    await repo.insert_item(
        conn,
        item_id=item_id,
        vault_id=uuid.uuid4(),
        vm_id=f"vm-{item_id}",
        vm_name="db01",
        pairing_id=uuid.uuid4(),
        policy_id=uuid.uuid4(),
        source_agent_id=uuid.uuid4(),
        source_site="primary",
        target_site="recovery",
        target_cloud_id="cloud-r",
        disks=[{"disk_id": "d0", "path": "/vms/db01/d0.img", "size_bytes": len(BLOCKS) * BS}],
        copy_interval_seconds=30,
        state="replicating",
        last_committed_seq=8,
        recovery_agent_id=host,
        replica_seq=4,
    )
    return {"item_id": item_id, "host": host}


async def deliver(ctx: Context, handler: Any, payload: EventPayload, producer: uuid.UUID) -> Any:
    """`payload` from agent `producer` handled by `handler` (the context first, unless it is
    `on_leaves_reported`), in a transaction."""
    env = new_envelope(payload, vault_id=uuid.uuid4(), producer_id=str(producer))
    inc = Incoming(env, payload, "agent-events", 0, 0, str(producer))
    async with ctx.pool.acquire() as conn, conn.transaction():
        if handler is on_leaves_reported:
            return await handler(conn, inc)
        return await handler(ctx, conn, inc)


async def outbox(pool: asyncpg.Pool, event_type: str) -> list[Any]:
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT value FROM outbox WHERE event_type = $1", event_type)
    return [decode_event(bytes(r["value"]))[1] for r in rows]


def completed(command_type: str, **kw: Any) -> cmd.CommandCompleted:
    return cmd.CommandCompleted(command_id=uuid.uuid4(), command_type=command_type, **kw)


def leaves_report(item_id: uuid.UUID, request_id: uuid.UUID, seq: int) -> cmd.ReplicaLeavesReported:
    hashes = b"".join(block_hash(b) for b in BLOCKS)
    return cmd.ReplicaLeavesReported(
        item_id=item_id,
        request_id=request_id,
        cycle_seq=seq,
        disk_id="d0",
        disk_count=1,
        size_bytes=len(BLOCKS) * BS,
        block_size=BS,
        chunk_no=0,
        chunks=1,
        first_index=0,
        leaf_hashes=base64.b64encode(hashes).decode(),
    )


async def test_answers_from_another_host_or_naming_no_item_are_refused(
    database_url: str, tmp_path: Path
) -> None:
    async with migrated_pool(database_url, "catchup", MIGRATIONS) as pool:
        ctx = Context(pool=pool, settings=ReplicationSettings(store_dir=tmp_path / "store"))
        async with pool.acquire() as conn:
            item = await new_item(conn)
        ok = cmd.CommandOutcome.SUCCEEDED
        for handler, kind in (
            (on_replica_applied, "ReplicaPointApplyRequested"),
            (on_leaves_answered, "ReplicaLeavesRequested"),
        ):
            nameless = completed(kind, outcome=ok, result={"item_id": "not-a-uuid"})
            with pytest.raises(Rejected, match="names no item") as refused:
                await deliver(ctx, handler, nameless, item["host"])
            assert refused.value.reason == "invalid_result"
            other = completed(kind, outcome=ok, result={"item_id": str(item["item_id"])})
            with pytest.raises(Rejected) as refused:
                await deliver(ctx, handler, other, uuid.uuid4())
            assert refused.value.reason == "wrong_agent"


async def test_a_replica_behind_is_asked_its_leaves_then_the_source_resyncs(
    database_url: str, tmp_path: Path
) -> None:
    async with migrated_pool(database_url, "catchup", MIGRATIONS) as pool:
        ctx = Context(pool=pool, settings=ReplicationSettings(store_dir=tmp_path / "store"))
        async with pool.acquire() as conn:
            item = await new_item(conn)
        item_id, host = item["item_id"], item["host"]
        behind = completed(
            "ReplicaPointApplyRequested",
            outcome=cmd.CommandOutcome.FAILED,
            error="point 6 cannot follow",
            result={"item_id": str(item_id), "replica_seq": 4, "cycle_seq": 6},
        )
        await deliver(ctx, on_replica_applied, behind, host)
        asked = await outbox(pool, "ReplicaLeavesRequested")
        assert [(a.item_id, a.agent_id) for a in asked] == [(item_id, host)]
        async with pool.acquire() as conn:
            saved = await repo.load_item(conn, item_id, lock=False)
        assert saved is not None and saved.replica_follows == 4
        assert saved.state is ItemState.RESYNCHRONIZING
        request_id = asked[0].request_id

        # the leaves: only from the item's host, and only for the request it waits on
        with pytest.raises(Rejected) as refused:
            await deliver(
                ctx, on_leaves_reported, leaves_report(item_id, request_id, 4), uuid.uuid4()
            )
        assert refused.value.reason == "wrong_agent"
        report = leaves_report(item_id, uuid.uuid4(), 4)
        assert not await deliver(ctx, on_leaves_reported, report, host)  # not a catch-up's
        assert await deliver(ctx, on_leaves_reported, leaves_report(item_id, request_id, 4), host)

        leaves = [block_hash(b) for b in BLOCKS]
        root = MerkleTree.from_leaves(leaves, len(leaves)).root_hex()
        answer = completed(
            "ReplicaLeavesRequested",
            outcome=cmd.CommandOutcome.SUCCEEDED,
            result={
                "item_id": str(item_id),
                "request_id": str(request_id),
                "cycle_seq": 4,
                "roots": {"d0": root},
            },
        )
        await deliver(ctx, on_leaves_answered, answer, host)
        resyncs = await outbox(pool, "ResyncRequested")
        assert [(r.item_id, r.cycle_seq) for r in resyncs] == [(item_id, 9)]
        async with pool.acquire() as conn:
            saved = await repo.load_item(conn, item_id, lock=False)
        assert saved is not None and saved.replica_catchup_id is None
        assert saved.replica_follows == 4 and saved.resync_seq == 9


async def test_leaves_that_do_not_give_the_reported_root_retry_the_catch_up(
    database_url: str, tmp_path: Path
) -> None:
    async with migrated_pool(database_url, "catchup", MIGRATIONS) as pool:
        ctx = Context(pool=pool, settings=ReplicationSettings(store_dir=tmp_path / "store"))
        async with pool.acquire() as conn:
            item = await new_item(conn)
        item_id, host = item["item_id"], item["host"]
        behind = completed(
            "ReplicaPointApplyRequested",
            outcome=cmd.CommandOutcome.FAILED,
            error="offset 5 is gone",
            result={"item_id": str(item_id), "replica_seq": 4, "cycle_seq": 5},
        )
        await deliver(ctx, on_replica_applied, behind, host)
        request_id = (await outbox(pool, "ReplicaLeavesRequested"))[0].request_id
        await deliver(ctx, on_leaves_reported, leaves_report(item_id, request_id, 4), host)
        answer = completed(
            "ReplicaLeavesRequested",
            outcome=cmd.CommandOutcome.SUCCEEDED,
            result={
                "item_id": str(item_id),
                "request_id": str(request_id),
                "cycle_seq": 4,
                "roots": {"d0": "ab" * 32},
            },
        )
        await deliver(ctx, on_leaves_answered, answer, host)
        assert await outbox(pool, "ResyncRequested") == []
        async with pool.acquire() as conn:
            saved = await repo.load_item(conn, item_id, lock=False)
        assert saved is not None and saved.state is ItemState.WAITING_TO_START_RESYNC
        assert saved.error is not None and "do not give the reported root" in saved.error
        assert saved.replica_follows == 4 and saved.resync_not_before is not None
        # a repeated answer changes nothing: the catch-up no longer waits for it
        await deliver(ctx, on_leaves_answered, answer, host)
        assert await outbox(pool, "ResyncRequested") == []
