"""Routes of jobs: the vault's jobs, one with its tasks and history, a long-poll watch,
restarting a failed job and approving the manual action a job waits for."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import datetime
from typing import Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.encoders import jsonable_encoder
from pydantic import BaseModel, ConfigDict, Field

from services.failover import handlers
from services.failover import job_repository as jobs_repo
from services.failover.api.common import PREFIX, context, job_out, refused
from services.failover.commands import ApproveAction, RestartJob
from services.failover.domain.errors import FailoverRefused
from services.failover.domain.jobs import Operation, TaskRow
from services.failover.job import Job
from shared.auth import CurrentPrincipal
from shared.schemas.failover import JobState
from shared.schemas.registration import Role

router = APIRouter(prefix=PREFIX)


class ApproveIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    action_id: str = Field(min_length=1, max_length=64)
    comment: str = Field(default="", max_length=2000)


def task_out(t: TaskRow) -> dict[str, Any]:
    keys = (
        "task_no",
        "name",
        "state",
        "started_at",
        "ended_at",
        "error",
        "cause",
        "recommendation",
        "detail",
        "command_id",
    )
    encoded: dict[str, Any] = jsonable_encoder({k: getattr(t, k) for k in keys})
    return encoded


@router.get("/jobs", tags=["jobs"], summary="Jobs of the vault, newest first")
async def list_jobs(
    vault_id: uuid.UUID,
    request: Request,
    principal: CurrentPrincipal,
    state: JobState | None = None,
    operation: Operation | None = None,
    target: str | None = Query(default=None, description="An item or plan id."),
    since: datetime | None = None,
    limit: int = Query(default=100, ge=1, le=1000),
) -> Any:
    principal.check(Role.READER, vault_id)
    rows = await jobs_repo.jobs(
        context(request).pool,
        vault_id,
        state=state.value if state else None,
        operation=operation.value if operation else None,
        target=target,
        since=since,
        limit=limit,
    )
    return [job_out(j) for j in rows]


async def _job(request: Request, vault_id: uuid.UUID, job_id: uuid.UUID) -> Job:
    job = await jobs_repo.job(context(request).pool, job_id)
    if job is None or job.vault_id != vault_id:
        raise HTTPException(404, f"job {job_id} not found in this vault")
    return job


@router.get("/jobs/{job_id}", tags=["jobs"], summary="A job with its tasks and history")
async def show_job(
    vault_id: uuid.UUID, job_id: uuid.UUID, request: Request, principal: CurrentPrincipal
) -> Any:
    principal.check(Role.READER, vault_id)
    job = await _job(request, vault_id, job_id)
    pool = context(request).pool
    return {
        **job_out(job),
        "tasks": [task_out(t) for t in await jobs_repo.tasks(pool, job_id)],
        "history": jsonable_encoder(await jobs_repo.job_history(pool, job_id)),
    }


@router.get(
    "/jobs/{job_id}/watch",
    tags=["jobs"],
    summary="Long-poll: answers when the job's state or progress differs from the given ones "
    "(or after `timeout` seconds) with the job and its tasks",
)
async def watch_job(
    vault_id: uuid.UUID,
    job_id: uuid.UUID,
    request: Request,
    principal: CurrentPrincipal,
    state: JobState | None = None,
    progress: int | None = Query(default=None, ge=0, le=100),
    timeout: float = Query(default=25, gt=0, le=120),
) -> Any:
    principal.check(Role.READER, vault_id)
    ctx = context(request)
    deadline = time.monotonic() + timeout
    while True:
        job = await _job(request, vault_id, job_id)
        changed = (state is not None and job.state is not state) or (
            progress is not None and job.progress != progress
        )
        if changed or (state is None and progress is None) or time.monotonic() > deadline:
            return {
                **job_out(job),
                "tasks": [task_out(t) for t in await jobs_repo.tasks(ctx.pool, job_id)],
            }
        await asyncio.sleep(min(0.25, max(0.0, deadline - time.monotonic())))


@router.post(
    "/jobs/{job_id}/restart",
    tags=["jobs"],
    summary="Re-run a failed job from its failed steps (operator)",
)
async def restart_job(
    vault_id: uuid.UUID, job_id: uuid.UUID, request: Request, principal: CurrentPrincipal
) -> Any:
    principal.check(Role.OPERATOR, vault_id)
    try:
        job = await handlers.restart(
            context(request), RestartJob(vault_id, job_id, principal.token_id)
        )
    except FailoverRefused as exc:
        raise refused(exc) from None
    return job_out(job)


@router.post(
    "/jobs/{job_id}/approve",
    tags=["jobs"],
    summary="Approve the manual action a job waits for (operator)",
)
async def approve_action(
    vault_id: uuid.UUID,
    job_id: uuid.UUID,
    body: ApproveIn,
    request: Request,
    principal: CurrentPrincipal,
) -> Any:
    principal.check(Role.OPERATOR, vault_id)
    try:
        await handlers.approve(
            context(request),
            ApproveAction(vault_id, job_id, body.action_id, principal.token_id, body.comment),
        )
    except FailoverRefused as exc:
        raise refused(exc) from None
    return {"job_id": str(job_id), "action_id": body.action_id, "approved": True}
