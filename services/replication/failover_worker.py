"""The worker of the failover service's recorded requests: materialise a point, or seed a
reverse replication's replica; a request that fails is retried, and a materialise gives up
with a `RecoveryPointMaterialiseFailed` after `MAX_ATTEMPTS`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from services.replication import request_repository as request_repo
from services.replication.context import Context
from services.replication.materialise import materialise, record_answer
from services.replication.reverse import seed_and_resync
from shared.schemas import failover as fo

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 5
BATCH = 4  # requests worked on at once


async def _work_on(ctx: Context, request: dict[str, Any]) -> None:
    try:
        if request["kind"] == "materialise":
            answer = await materialise(ctx, request)
            if answer is not None:
                await record_answer(ctx, request, answer)
        else:
            await seed_and_resync(ctx, request)
    except Exception as exc:
        async with ctx.pool.acquire() as conn:
            attempts = await request_repo.bump_request_attempts(conn, request["request_id"])
        log.exception(
            "failover request failed; retrying",
            extra={"request_id": str(request["request_id"]), "attempt": attempts},
        )
        if attempts >= MAX_ATTEMPTS and request["kind"] == "materialise":
            await record_answer(
                ctx,
                request,
                fo.RecoveryPointMaterialiseFailed(
                    request_id=request["request_id"],
                    item_id=request["item_id"],
                    error=f"gave up after {attempts} attempts: {type(exc).__name__}: {exc}",
                ),
            )


async def work_on_pending_requests(ctx: Context) -> int:
    """One pass over the pending requests (a few at a time); returns how many were taken."""
    async with ctx.pool.acquire() as conn:
        pending = await request_repo.pending_requests(conn, BATCH)
    if pending:
        await asyncio.gather(*(_work_on(ctx, r) for r in pending))
    return len(pending)


async def failover_worker(ctx: Context) -> None:
    """Work on pending requests as soon as a handler records one (or every interval)."""
    while True:
        ctx.failover_wake.clear()
        await work_on_pending_requests(ctx)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ctx.failover_wake.wait(), ctx.settings.health_interval_seconds)
