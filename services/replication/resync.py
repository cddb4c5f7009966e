"""Resync: when the replica can't take the next cycle, the item waits for a resync and the
source agent is asked for the blocks whose hashes differ from the replica's latest point
(retried with a backoff; docs/reference.md gives the schedule). The rules are the protected
item's (`ProtectedItem.require_resync`, `request_resync`); here the replica's hashes are read
and the item's staged cycles dropped."""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import UTC, datetime

import asyncpg
from prometheus_client import Counter

from services.replication import leaves
from services.replication import repository as repo
from services.replication.context import Context
from services.replication.item import ProtectedItem
from services.replication.store import StoreError
from services.replication.unit_of_work import ItemUnitOfWork
from shared.metrics import reason_label
from shared.schemas.replication import ItemState

log = logging.getLogger(__name__)

RESYNCS = Counter("dr_replication_resyncs_total", "Resyncs requested", ["reason"])


async def require_resync(
    ctx: Context, conn: asyncpg.Connection, item: ProtectedItem, reason: str
) -> None:
    """The replica can't take the next cycle: its staged cycles are dropped and the item goes
    to resync; the first time the agent is asked at once, a resync that fails again is retried
    after a backoff (docs/reference.md: 1, 2, 4, 8, 10 min, then every 30 min). The caller
    commits the item."""
    RESYNCS.labels(reason_label(reason)).inc()
    await repo.drop_cycles(conn, item.item_id)
    plan = item.require_resync(reason, now=datetime.now(UTC), backoff=ctx.settings.resync_backoff)
    log.warning(
        "resync required",
        extra={
            "item_id": str(item.item_id),
            "reason": reason,
            "attempt": plan.attempt,
            "delay_seconds": plan.delay_seconds,
        },
    )
    if plan.ask_now:
        await request_resync(ctx, conn, item)


async def request_resync(ctx: Context, conn: asyncpg.Connection, item: ProtectedItem) -> None:
    """Ask the agent for the blocks whose hashes differ from the replica's latest point (the
    leaf hashes, read here, travel in the item's chunked commands). A replica that missed
    points (`replica_follows`) first reports its own leaves (services/replication/catch_up.py),
    unless it holds nothing: then every block is sent."""
    if item.replica_follows:
        item.ask_replica_leaves(uuid.uuid4())
        return
    hashes = {} if item.replica_follows == 0 else await latest_hashes(ctx, conn, item)
    item.request_resync(hashes, uuid.uuid4())


async def latest_hashes(
    ctx: Context, conn: asyncpg.Connection, item: ProtectedItem
) -> dict[str, list[bytes]]:
    """Each disk's leaf hashes at the item's latest point: verified in PostgreSQL for an item
    whose recovery host keeps its replica (services/replication/leaves.py), else from this
    service's replica store. A disk with no known hashes is left out (sent whole)."""
    hashes: dict[str, list[bytes]] = {}
    if item.has_point:
        for disk in item.disks:
            known = None
            if not ctx.keeps_blocks(item.recovery_agent_id) and item.last_committed_seq:
                known = await leaves.leaf_hashes(
                    conn, item.item_id, disk.disk_id, item.last_committed_seq
                )
            if known is None:
                known = await stored_hashes(ctx, item.target_site, item.item_id, disk.disk_id)
            if known is not None:
                hashes[disk.disk_id] = known
    return hashes


async def stored_hashes(
    ctx: Context, site: str, item_id: uuid.UUID, disk_id: str
) -> list[bytes] | None:
    """The disk's leaf hashes at the item's latest point in this service's replica store;
    None if the store holds none."""
    try:
        return await asyncio.to_thread(ctx.store(site).leaf_hashes, str(item_id), disk_id)
    except (StoreError, OSError, KeyError):
        return None


async def start_due_resyncs(ctx: Context) -> int:
    """Send the resync requests whose backoff has passed."""
    async with ctx.pool.acquire() as conn:
        due = await repo.resyncs_due(conn)
    for item_id in due:
        async with ctx.pool.acquire() as conn, conn.transaction(), ItemUnitOfWork(conn) as uow:
            item = await uow.load(item_id)
            if item is not None and item.state is ItemState.WAITING_TO_START_RESYNC:
                await request_resync(ctx, conn, item)
                await uow.commit()
    return len(due)
