"""HTTP routes of the failover service: operations on protected items and recovery plans (each
answers 202 with the job it started), jobs (list, show with tasks and history, watch, restart,
approve a manual action), recovery plans CRUD. No business rules here: handlers decide.

A failover in progress cannot be cancelled (replication has already been stopped): there is no
cancel route. A failed job that may be re-run is restarted with `POST /jobs/{id}/restart`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from services.failover import handlers
from services.failover import item_failover_repository as failover_repo
from services.failover import job_repository as jobs_repo
from services.failover import plan_repository as plans_repo
from services.failover import read_model_repository as read_models
from services.failover.commands import (
    ApproveAction,
    CreatePlan,
    DeletePlan,
    ReplacePlan,
    RestartJob,
    StartItemOperation,
    StartPlanOperation,
)
from services.failover.domain.errors import FailoverRefused, InvalidRequest, NotFound
from services.failover.domain.items import ItemFailoverState
from services.failover.domain.jobs import Operation, TaskRow, can_restart
from services.failover.domain.plans import PlanGroup, RecoveryPlan, plan_problems
from services.failover.domain.points import point_request
from services.failover.domain.scripts import script_actions
from services.failover.job import Job, JobParams
from services.failover.scripts_folder import script_file
from shared.auth import CurrentPrincipal, Principal
from shared.schemas.failover import JobState, PointChoice
from shared.schemas.registration import Role

router = APIRouter(prefix="/v1/vaults/{vault_id}")

OPERATION_PATHS = {
    "test-failover": Operation.TEST_FAILOVER,
    "test-failover-cleanup": Operation.TEST_CLEANUP,
    "planned-failover": Operation.PLANNED_FAILOVER,
    "unplanned-failover": Operation.UNPLANNED_FAILOVER,
    "commit": Operation.COMMIT,
    "reverse-replicate": Operation.REVERSE,
    "failback": Operation.FAILBACK,
}


class OperationIn(BaseModel):
    """Options of an operation; each operation reads the ones that apply to it."""

    model_config = ConfigDict(extra="forbid")

    choice: PointChoice = Field(
        default=PointChoice.LATEST,
        description="Recovery point (test, unplanned): latest, latest_app_consistent or chosen.",
    )
    cycle_seq: int | None = Field(default=None, ge=1, description="The chosen point.")
    network: str = Field(
        default="none",
        max_length=100,
        description="Test failover network: `none`, an existing (isolated) network id, or "
        "`create` (a network made for the test, deleted at cleanup).",
    )
    notes: str = Field(default="", max_length=4000, description="Test cleanup notes.")
    shutdown_source: bool = Field(
        default=False,
        description="Unplanned: try to shut the source down and sync the latest changes first "
        "(goes on if that fails).",
    )
    force_full_resync: bool = Field(
        default=False,
        description="Reverse replication without the old primary's disks: copy everything.",
    )


class ApproveIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    action_id: str = Field(min_length=1, max_length=64)
    comment: str = Field(default="", max_length=2000)


class PlanIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._-]*$")
    description: str = Field(default="", max_length=2000)
    groups: list[PlanGroup] = Field(
        description="At most 7 groups and 100 protected items; groups run in order, the "
        "items of a group in parallel."
    )


def _ctx(request: Request) -> handlers.Context:
    ctx: handlers.Context = request.app.state.context
    return ctx


def _params(body: OperationIn, operation: Operation) -> JobParams:
    point_request(body.choice, body.cycle_seq)
    out = body.model_dump(mode="json")
    if operation is not Operation.TEST_FAILOVER:
        out.pop("network")
    return JobParams.model_validate(out)


def _refused(exc: FailoverRefused) -> HTTPException:
    """A domain refusal as HTTP: what is named does not exist (404), the request itself is
    wrong (422), the state does not allow it now (409)."""
    if isinstance(exc, NotFound):
        return HTTPException(404, exc.message)
    if isinstance(exc, InvalidRequest):
        return HTTPException(422, exc.message)
    return HTTPException(409, exc.message)


def job_out(job: Job) -> dict[str, Any]:
    out = {
        "job_id": job.job_id,
        "vault_id": job.vault_id,
        "operation": job.operation.value,
        "target_kind": job.target_kind,
        "target": job.target,
        "state": job.state.value,
        "progress": job.progress,
        "error": job.error,
        "cause": job.cause,
        "recommendation": job.recommendation,
        "restarts": job.restarts,
        "run_no": job.run_no,
        "waiting_for": job.waiting_for.model_dump(mode="json") if job.waiting_for else None,
        "result": job.result.stored(),
        "created_by": job.created_by,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "ended_at": job.ended_at,
        "updated_at": job.updated_at,
        "items": job.params.items,
        "params": {k: v for k, v in job.params.stored().items() if k not in ("groups", "items")},
        "restartable": can_restart(job.operation, job.state) is None,
    }
    encoded: dict[str, Any] = jsonable_encoder(out)
    return encoded


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


# ------------------------------------------------------------------ item operations


async def _start_operation(
    request: Request,
    principal: Principal,
    vault_id: uuid.UUID,
    operation: str,
    body: OperationIn | None,
    command: Callable[[Operation, JobParams, str], StartItemOperation | StartPlanOperation],
) -> JSONResponse:
    """Check the role and the operation's name and parameters, start its job (202)."""
    principal.check(Role.OPERATOR, vault_id)
    op = OPERATION_PATHS.get(operation)
    if op is None:
        raise HTTPException(
            404, f"unknown operation '{operation}': use one of {sorted(OPERATION_PATHS)}"
        )
    try:
        params = _params(body or OperationIn(), op)
        job = await handlers.handle(_ctx(request), command(op, params, principal.token_id))
    except FailoverRefused as exc:
        raise _refused(exc) from None
    return JSONResponse(job_out(job), status_code=202)


@router.post(
    "/failovers/{item_id}/{operation}",
    status_code=202,
    tags=["failover"],
    summary="Start an operation on a protected item (operator): test-failover, "
    "test-failover-cleanup, planned-failover, unplanned-failover, commit, reverse-replicate, "
    "failback. Answers with the job; a running failover cannot be cancelled.",
)
async def item_operation(
    vault_id: uuid.UUID,
    item_id: uuid.UUID,
    operation: str,
    request: Request,
    principal: CurrentPrincipal,
    body: OperationIn | None = None,
) -> JSONResponse:
    return await _start_operation(
        request,
        principal,
        vault_id,
        operation,
        body,
        lambda op, params, by: StartItemOperation(vault_id, item_id, op, params, by),
    )


@router.get("/failovers", tags=["failover"], summary="Protected items with their failover state")
async def list_items(vault_id: uuid.UUID, request: Request, principal: CurrentPrincipal) -> Any:
    principal.check(Role.READER, vault_id)
    rows = await read_models.items(_ctx(request).pool, vault_id)
    return jsonable_encoder(
        [
            {
                "item_id": r["item_id"],
                "vm_id": r["vm_id"],
                "vm_name": r["vm_name"],
                "replication_state": r["state"],
                "health": r["health"],
                "active": r["active"],
                "failover_state": r["failover_state"] or ItemFailoverState.PROTECTED.value,
                "latest_seq": r["latest_seq"],
            }
            for r in rows
        ]
    )


@router.get("/failovers/{item_id}", tags=["failover"], summary="One item's failover state")
async def show_item(
    vault_id: uuid.UUID, item_id: uuid.UUID, request: Request, principal: CurrentPrincipal
) -> Any:
    principal.check(Role.READER, vault_id)
    pool = _ctx(request).pool
    item = await read_models.item(pool, item_id)
    if item is None or item.vault_id != vault_id:
        raise HTTPException(404, f"protected item {item_id} not found in this vault")
    view = await failover_repo.view(pool, item_id) or {}
    link = await failover_repo.link_of(pool, old=item_id)
    retained = await read_models.retained_points(pool, item_id)
    return jsonable_encoder(
        {
            "item_id": item_id,
            "vm_id": item.vm_id,
            "vm_name": item.vm_name,
            "replication_state": item.state,
            "health": item.health,
            "latest_seq": item.latest_seq,
            "latest_source_time": item.latest_source_time,
            "failover_state": view.get("state", ItemFailoverState.PROTECTED.value),
            "failover": view.get("info", {}),
            "test": view.get("test"),
            "notes": view.get("notes", []),
            "reversed_by": link["new_item_id"] if link else None,
            "retained_points": {
                "count": len(retained.seqs),
                "oldest_seq": min(retained.seqs),
                "latest_seq": max(retained.seqs),
            }
            if retained.seqs
            else None,
        }
    )


# ------------------------------------------------------------------ jobs


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
        _ctx(request).pool,
        vault_id,
        state=state.value if state else None,
        operation=operation.value if operation else None,
        target=target,
        since=since,
        limit=limit,
    )
    return [job_out(j) for j in rows]


async def _job(request: Request, vault_id: uuid.UUID, job_id: uuid.UUID) -> Job:
    job = await jobs_repo.job(_ctx(request).pool, job_id)
    if job is None or job.vault_id != vault_id:
        raise HTTPException(404, f"job {job_id} not found in this vault")
    return job


@router.get("/jobs/{job_id}", tags=["jobs"], summary="A job with its tasks and history")
async def show_job(
    vault_id: uuid.UUID, job_id: uuid.UUID, request: Request, principal: CurrentPrincipal
) -> Any:
    principal.check(Role.READER, vault_id)
    job = await _job(request, vault_id, job_id)
    pool = _ctx(request).pool
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
    ctx = _ctx(request)
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
            _ctx(request), RestartJob(vault_id, job_id, principal.token_id)
        )
    except FailoverRefused as exc:
        raise _refused(exc) from None
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
            _ctx(request),
            ApproveAction(vault_id, job_id, body.action_id, principal.token_id, body.comment),
        )
    except FailoverRefused as exc:
        raise _refused(exc) from None
    return {"job_id": str(job_id), "action_id": body.action_id, "approved": True}


# ------------------------------------------------------------------ recovery plans


def plan_out(p: RecoveryPlan) -> dict[str, Any]:
    encoded: dict[str, Any] = jsonable_encoder(
        {
            "plan_id": p.plan_id,
            "name": p.name,
            "description": p.description,
            "groups": [g.model_dump(mode="json") for g in p.groups],
            "item_count": p.item_count,
            "created_at": p.created_at,
            "updated_at": p.updated_at,
        }
    )
    return encoded


def _check_scripts(
    request: Request,
    principal: Principal,
    vault_id: uuid.UUID,
    body: PlanIn,
    before: list[PlanGroup] | None,
) -> None:
    """Only an admin creates or changes a script action; every script of the plan must be an
    executable file of the service's scripts folder."""
    scripts = script_actions(body.groups)
    unchanged = scripts == (script_actions(before) if before is not None else [])
    if scripts and not unchanged and not principal.allows(Role.ADMIN, vault_id):
        raise HTTPException(
            403,
            "only an admin can create or change a plan's script actions; an operator can "
            "change its items and manual actions",
        )
    folder = _ctx(request).settings.scripts_dir
    for action in scripts:
        try:
            script_file(folder, action.script)
        except ValueError as exc:
            raise HTTPException(
                422,
                f"action {action.action_id}: {exc}; scripts are installed by the host's "
                "administrator in the failover service's scripts folder",
            ) from None


def _validated(
    request: Request,
    principal: Principal,
    vault_id: uuid.UUID,
    body: PlanIn,
    before: list[PlanGroup] | None = None,
) -> None:
    problems = plan_problems(body.groups)
    if problems:
        raise HTTPException(422, "; ".join(problems))
    _check_scripts(request, principal, vault_id, body, before)


@router.post(
    "/recovery-plans",
    status_code=201,
    tags=["recovery plans"],
    summary="Create a recovery plan (operator; with script actions: admin)",
)
async def create_plan(
    vault_id: uuid.UUID, body: PlanIn, request: Request, principal: CurrentPrincipal
) -> Any:
    principal.check(Role.OPERATOR, vault_id)
    _validated(request, principal, vault_id, body)
    try:
        plan = await handlers.create_plan(
            _ctx(request), CreatePlan(vault_id, body.name, body.description, body.groups)
        )
    except FailoverRefused as exc:
        raise _refused(exc) from None
    return plan_out(plan)


@router.get("/recovery-plans", tags=["recovery plans"], summary="Recovery plans of the vault")
async def list_plans(vault_id: uuid.UUID, request: Request, principal: CurrentPrincipal) -> Any:
    principal.check(Role.READER, vault_id)
    return [plan_out(p) for p in await plans_repo.plans(_ctx(request).pool, vault_id)]


async def _plan(request: Request, vault_id: uuid.UUID, plan: str) -> RecoveryPlan:
    found = await plans_repo.plan(_ctx(request).pool, vault_id, plan)
    if found is None:
        raise HTTPException(404, f"recovery plan {plan} not found in this vault")
    return found


@router.get(
    "/recovery-plans/{plan}", tags=["recovery plans"], summary="A recovery plan (id or name)"
)
async def show_plan(
    vault_id: uuid.UUID, plan: str, request: Request, principal: CurrentPrincipal
) -> Any:
    principal.check(Role.READER, vault_id)
    return plan_out(await _plan(request, vault_id, plan))


@router.put(
    "/recovery-plans/{plan}",
    tags=["recovery plans"],
    summary="Replace a recovery plan (operator; adding or changing a script action: admin)",
)
async def update_plan(
    vault_id: uuid.UUID, plan: str, body: PlanIn, request: Request, principal: CurrentPrincipal
) -> Any:
    principal.check(Role.OPERATOR, vault_id)
    found = await _plan(request, vault_id, plan)
    _validated(request, principal, vault_id, body, found.groups)
    try:
        replaced = await handlers.replace_plan(
            _ctx(request),
            ReplacePlan(vault_id, found.plan_id, body.name, body.description, body.groups),
        )
    except FailoverRefused as exc:
        raise _refused(exc) from None
    return plan_out(replaced)


@router.delete(
    "/recovery-plans/{plan}", tags=["recovery plans"], summary="Delete a recovery plan (operator)"
)
async def delete_plan(
    vault_id: uuid.UUID, plan: str, request: Request, principal: CurrentPrincipal
) -> Any:
    principal.check(Role.OPERATOR, vault_id)
    try:
        deleted = await handlers.delete_plan(_ctx(request), DeletePlan(vault_id, plan))
    except FailoverRefused as exc:
        raise _refused(exc) from None
    return plan_out(deleted)


@router.post(
    "/recovery-plans/{plan}/{operation}",
    status_code=202,
    tags=["recovery plans"],
    summary="Run a recovery plan (operator): test-failover, test-failover-cleanup, "
    "planned-failover, unplanned-failover, commit, reverse-replicate, failback. Groups run in "
    "order, items of a group in parallel; planned stops on an error, unplanned goes on. A "
    "running failover cannot be cancelled.",
)
async def plan_operation(
    vault_id: uuid.UUID,
    plan: str,
    operation: str,
    request: Request,
    principal: CurrentPrincipal,
    body: OperationIn | None = None,
) -> JSONResponse:
    return await _start_operation(
        request,
        principal,
        vault_id,
        operation,
        body,
        lambda op, params, by: StartPlanOperation(vault_id, plan, op, params, by),
    )
