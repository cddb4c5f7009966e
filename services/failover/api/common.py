"""What the failover routes share: the vault prefix, an operation's path names and options,
the service context of a request, a domain refusal as HTTP, a job as JSON, and starting an
operation's job (on an item or a recovery plan)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from fastapi import HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from services.failover import handlers
from services.failover.commands import StartItemOperation, StartPlanOperation
from services.failover.domain.errors import FailoverRefused, InvalidRequest, NotFound
from services.failover.domain.jobs import Operation, can_restart
from services.failover.domain.points import point_request
from services.failover.job import Job, JobParams
from shared.auth import Principal
from shared.schemas.failover import PointChoice
from shared.schemas.registration import Role

PREFIX = "/v1/vaults/{vault_id}"

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


def context(request: Request) -> handlers.Context:
    ctx: handlers.Context = request.app.state.context
    return ctx


def _params(body: OperationIn, operation: Operation) -> JobParams:
    point_request(body.choice, body.cycle_seq)
    out = body.model_dump(mode="json")
    if operation is not Operation.TEST_FAILOVER:
        out.pop("network")
    return JobParams.model_validate(out)


def refused(exc: FailoverRefused) -> HTTPException:
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


async def start_operation(
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
        job = await handlers.handle(context(request), command(op, params, principal.token_id))
    except FailoverRefused as exc:
        raise refused(exc) from None
    return JSONResponse(job_out(job), status_code=202)
