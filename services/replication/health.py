"""Health and RPO: every item's health re-evaluated (domain.evaluate_health) on a timer, and
the metrics of RPO, items by health and the replica store's size."""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, datetime, timedelta

import asyncpg
from prometheus_client import Gauge

from services.replication import domain
from services.replication import repository as repo
from services.replication.context import Context
from services.replication.item import ProtectedItem
from services.replication.unit_of_work import ItemUnitOfWork
from shared.schemas.replication import Health, ItemState

RPO_SECONDS = Gauge("dr_replication_rpo_seconds", "RPO of a protected item", ["item_id", "vm"])
RPO_THRESHOLD = Gauge(
    "dr_replication_rpo_threshold_seconds",
    "RPO an item should stay under: twice its policy's copy interval, at least 30 s",
    ["item_id", "vm"],
)
ITEMS_BY_HEALTH = Gauge("dr_replication_items", "Protected items by health", ["health"])
STORE_BYTES = Gauge("dr_replica_store_bytes", "Bytes of pack files (blocks) in the replica store")
STORE_BYTES_EVERY = 30.0  # seconds between two walks of the replica store for STORE_BYTES


def _error_with_storage(error: str | None, fault: str | None) -> str | None:
    """The item's error: a storage failure while there is one; once it clears, the error it
    had before (a storage failure never hides another error: it is only set over none)."""
    if fault is not None and (error is None or error.startswith(STORAGE_FAULT_PREFIX)):
        return fault
    if fault is None and error is not None and error.startswith(STORAGE_FAULT_PREFIX):
        return None
    return error


STORAGE_FAULT_PREFIX = "replica storage failure"


async def _judge_health(
    ctx: Context,
    conn: asyncpg.Connection,
    item: ProtectedItem,
    notes: domain.FaultNotes,
    now: datetime,
) -> domain.HealthVerdict:
    """The item's health now, by domain.evaluate_health."""
    s = ctx.settings
    window_start = now - timedelta(seconds=s.monitoring_window_seconds)
    points = await repo.points_since(conn, item.item_id, max(window_start, item.protected_since))
    return domain.evaluate_health(
        domain.HealthInputs(
            state=item.state,
            paused=item.paused,
            now=now,
            protected_since=item.initial_done_at or item.protected_since,
            last_cycle_at=item.last_cycle_at,
            points_in_window=points,
            copy_interval_seconds=item.copy_interval_seconds,
            window_seconds=s.monitoring_window_seconds,
            stale_log_seconds=s.stale_log_seconds,
            missed_ratio_warning=s.missed_cycles_warning_ratio,
            error=item.error,
            rpo_seconds=domain.rpo_seconds(now, item.last_point_source_time),
            rpo_threshold_seconds=domain.rpo_threshold_seconds(item.copy_interval_seconds),
            storage_fault=notes.storage_fault,
            dead_letter=notes.dead_letter,
            broker_problem=ctx.broker.problem if ctx.broker else None,
        )
    )


async def evaluate_health(ctx: Context) -> None:
    """Re-evaluate RPO and health of every item; export them as metrics."""
    now = datetime.now(UTC)
    counts = {h: 0 for h in Health}
    async with ctx.pool.acquire() as conn:
        items = await repo.active_items(conn)
    for row in items:
        async with ctx.pool.acquire() as conn, conn.transaction(), ItemUnitOfWork(conn) as uow:
            item = await uow.load(row["item_id"])
            if item is None:
                continue
            notes = await repo.fault_notes(conn, item.item_id)
            verdict = await _judge_health(ctx, conn, item, notes, now)
            reasons = list(verdict.reasons)
            error = _error_with_storage(item.error, notes.storage_fault)
            if (verdict.health, reasons, error) != (item.health, item.health_reasons, item.error):
                item.record_health(verdict.health, reasons, error)
                await uow.commit()
        counts[verdict.health] += 1
        if item.state is ItemState.FAILED_OVER:
            for gauge in (RPO_SECONDS, RPO_THRESHOLD):
                with contextlib.suppress(KeyError):  # the VM runs from its replica: no RPO
                    gauge.remove(str(item.item_id), item.vm_name)
            continue
        rpo = domain.rpo_seconds(now, item.last_point_source_time)
        if rpo is not None:
            RPO_SECONDS.labels(str(item.item_id), item.vm_name).set(rpo)
            RPO_THRESHOLD.labels(str(item.item_id), item.vm_name).set(
                domain.rpo_threshold_seconds(item.copy_interval_seconds)
            )
    for health, count in counts.items():
        ITEMS_BY_HEALTH.labels(health.value).set(count)
    if time.monotonic() - ctx.store_bytes_at >= STORE_BYTES_EVERY:
        # a walk over every item's pack files (16k for 1 TiB of blocks): now and then only
        ctx.store_bytes_at = time.monotonic()
        STORE_BYTES.set(
            sum(
                await asyncio.gather(
                    *(asyncio.to_thread(store.total_bytes) for store in ctx.stores.values())
                )
            )
            if ctx.stores
            else 0
        )
