"""Retention at work: each item's recovery points past its policy's window pruned from the
replica store, then from the index (`retention.select_retained` chooses which to keep). A point
an unanswered materialise request needs is kept (`retention.pinned_seqs`): the decision and the
prune run under the item's points lock, under which the failover worker also chooses and pins
a request's point, so a point chosen for a failover is never pruned under it."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Any

from services.replication import leaves
from services.replication import read_model_repository as rm_repo
from services.replication import repository as repo
from services.replication import request_repository as request_repo
from services.replication.context import Context, emit
from services.replication.retention import PointMeta, pinned_seqs, select_retained
from shared.schemas import replication as ev
from shared.schemas.replication import ItemState

log = logging.getLogger(__name__)


async def apply_retention(ctx: Context) -> int:
    """Prune recovery points past the policy's window (store first, then the index)."""
    pruned_total = 0
    async with ctx.pool.acquire() as conn:
        items = await repo.active_items(conn)
    for item in items:
        if ItemState(item["state"]) is ItemState.FAILED_OVER:
            continue  # its points are the failover's to choose from, until commit
        async with ctx.pool.acquire() as conn:
            settings = await rm_repo.policy_settings(conn, item["vault_id"], item["policy_id"])
        pruned_total += await _prune_item(ctx, item, settings)
    return pruned_total


async def _prune_item(ctx: Context, item: dict[str, Any], settings: dict[str, Any]) -> int:
    """One item's retention pass; how many points it pruned."""
    item_id = item["item_id"]
    async with ctx.pool.acquire() as conn, conn.transaction():
        await repo.lock_item_points(conn, item_id)
        points = await repo.live_points(conn, item_id)
        if len(points) <= 1:
            return 0
        now = datetime.now(UTC)
        keep = select_retained(
            [
                PointMeta(p["cycle_seq"], p["source_time"], p["point_type"] == "app_consistent")
                for p in points
            ],
            now=now,
            retention_hours=int(settings.get("recovery_points", 0)),
            app_consistent_hours=int(settings.get("app_consistent_frequency_hours", 0)),
            keep_recent=ctx.settings.keep_recent_points,
            pinned=pinned_seqs(await request_repo.open_materialise_requests(conn, item_id), now),
        )
        drop = sorted(p["cycle_seq"] for p in points if p["cycle_seq"] not in keep)
        if not drop:
            return 0
        store = ctx.store(item["target_site"])
        try:
            async with ctx.storing(item_id):
                if ctx.keeps_blocks(item["recovery_agent_id"]):
                    await asyncio.to_thread(store.prune, str(item_id), keep)
                elif await leaves.known(conn, item_id):
                    # its points are its recovery host's (the host prunes on the command
                    # below); blocks this service stored before, if any, are not needed
                    await asyncio.to_thread(store.delete_item, str(item_id))
        except ValueError as exc:  # the item changed meanwhile (e.g. a failover committed)
            log.warning("retention skipped", extra={"item_id": str(item_id), "why": str(exc)})
            return 0
        except OSError as exc:  # the item's health shows a storage failure; retried next round
            log.warning("retention failed", extra={"item_id": str(item_id), "error": str(exc)})
            return 0
        await repo.mark_pruned(conn, item_id, drop)
        await emit(
            conn,
            item["vault_id"],
            ev.RecoveryPointsPruned(item_id=item_id, cycle_seqs=drop),
            str(item_id),
        )
    return len(drop)
