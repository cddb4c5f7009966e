"""Resync: when the replica can't take the next cycle, the item waits for a resync and the
source agent is asked for the blocks whose hashes differ from the replica's latest point
(retried with a backoff; docs/reference.md gives the schedule)."""

from __future__ import annotations

import asyncio
import base64
import logging
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from prometheus_client import Counter

from services.replication import repository as repo
from services.replication.context import Context, change_state, command
from shared.metrics import reason_label
from shared.schemas import agent as cmd
from shared.schemas.replication import Health, ItemState

log = logging.getLogger(__name__)

HASHES_PER_CHUNK = 16_384  # 512 KiB of digests -> ~700 KB base64 per resync command
RESYNCS = Counter("dr_replication_resyncs_total", "Resyncs requested", ["reason"])


async def require_resync(
    ctx: Context, conn: asyncpg.Connection, item: dict[str, Any], reason: str
) -> None:
    """The replica can't take the next cycle: put the item in resync. The first time the
    agent is asked at once; a resync that fails again is retried after a backoff (docs/reference.md:
    1, 2, 4, 8, 10 min, then every 30 min)."""
    RESYNCS.labels(reason_label(reason)).inc()
    await repo.drop_cycles(conn, item["item_id"])
    retrying = ItemState(item["state"]) in (
        ItemState.RESYNCHRONIZING,
        ItemState.WAITING_TO_START_RESYNC,
    )
    attempts = (item["resync_attempts"] or 0) + 1 if retrying else 1
    delay = ctx.settings.resync_backoff(attempts - 1) if retrying else 0.0
    await change_state(
        conn,
        item,
        ItemState.WAITING_TO_START_RESYNC,
        reason=reason,
        health=Health.CRITICAL,
        error=reason,
        resync_attempts=attempts,
        resync_not_before=datetime.now(UTC) + timedelta(seconds=delay),
    )
    log.warning(
        "resync required",
        extra={
            "item_id": str(item["item_id"]),
            "reason": reason,
            "attempt": attempts,
            "delay_seconds": delay,
        },
    )
    if not retrying:
        await request_resync(ctx, conn, item)


async def request_resync(ctx: Context, conn: asyncpg.Connection, item: dict[str, Any]) -> None:
    """Ask the agent for the blocks whose hashes differ from the replica's latest point (the
    replica's leaf hashes travel in chunked commands); the resync cycle gets the next number."""
    seq = (item["last_committed_seq"] or 0) + 1
    resync_id = uuid.uuid4()
    store = ctx.store(item["target_site"])
    item_key = str(item["item_id"])
    has_point = item["last_committed_seq"] is not None
    disks = item["disks"]
    for disk in disks:
        hashes: list[bytes] = (
            await asyncio.to_thread(store.leaf_hashes, item_key, disk["disk_id"])
            if has_point
            else []
        )
        size = disk["size_bytes"] if has_point else 0
        chunks = max(1, -(-len(hashes) // HASHES_PER_CHUNK))
        for chunk_no in range(chunks):
            part = hashes[chunk_no * HASHES_PER_CHUNK : (chunk_no + 1) * HASHES_PER_CHUNK]
            await command(
                conn,
                item,
                cmd.ResyncRequested(
                    command_id=uuid.uuid5(resync_id, f"{disk['disk_id']}:{chunk_no}"),
                    agent_id=item["source_agent_id"],
                    item_id=item["item_id"],
                    resync_id=resync_id,
                    cycle_seq=seq,
                    disk_id=disk["disk_id"],
                    disk_count=len(disks),
                    size_bytes=size,
                    chunk_no=chunk_no,
                    chunks=chunks,
                    first_index=chunk_no * HASHES_PER_CHUNK,
                    leaf_hashes=base64.b64encode(b"".join(part)).decode(),
                ),
            )
    await change_state(
        conn,
        item,
        ItemState.RESYNCHRONIZING,
        reason=item["error"] or "resync requested",
        health=Health.CRITICAL,
        resync_seq=seq,
        resync_id=resync_id,
        resync_not_before=None,
    )


async def start_due_resyncs(ctx: Context) -> int:
    """Send the resync requests whose backoff has passed."""
    async with ctx.pool.acquire() as conn:
        due = await repo.resyncs_due(conn)
    for item_id in due:
        async with ctx.pool.acquire() as conn, conn.transaction():
            item = await repo.get_item(conn, item_id, lock=True)
            if item is not None and item["state"] == ItemState.WAITING_TO_START_RESYNC.value:
                await request_resync(ctx, conn, item)
    return len(due)
