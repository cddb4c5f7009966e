"""Routes of recovery plans: create, list, show, replace and delete (a script action is an
admin's to add or change, and names an executable of the scripts folder), and run one."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from services.failover import handlers
from services.failover import plan_repository as plans_repo
from services.failover.api.common import PREFIX, OperationIn, context, refused, start_operation
from services.failover.commands import CreatePlan, DeletePlan, ReplacePlan, StartPlanOperation
from services.failover.domain.errors import FailoverRefused
from services.failover.domain.plans import PlanGroup, RecoveryPlan, plan_problems
from services.failover.domain.scripts import script_actions
from services.failover.scripts_folder import script_file
from shared.auth import CurrentPrincipal, Principal
from shared.schemas.registration import Role

router = APIRouter(prefix=PREFIX)


class PlanIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._-]*$")
    description: str = Field(default="", max_length=2000)
    groups: list[PlanGroup] = Field(
        description="At most 7 groups and 100 protected items; groups run in order, the "
        "items of a group in parallel."
    )


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
    folder = context(request).settings.scripts_dir
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
            context(request), CreatePlan(vault_id, body.name, body.description, body.groups)
        )
    except FailoverRefused as exc:
        raise refused(exc) from None
    return plan_out(plan)


@router.get("/recovery-plans", tags=["recovery plans"], summary="Recovery plans of the vault")
async def list_plans(vault_id: uuid.UUID, request: Request, principal: CurrentPrincipal) -> Any:
    principal.check(Role.READER, vault_id)
    return [plan_out(p) for p in await plans_repo.plans(context(request).pool, vault_id)]


async def _plan(request: Request, vault_id: uuid.UUID, plan: str) -> RecoveryPlan:
    found = await plans_repo.plan(context(request).pool, vault_id, plan)
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
            context(request),
            ReplacePlan(vault_id, found.plan_id, body.name, body.description, body.groups),
        )
    except FailoverRefused as exc:
        raise refused(exc) from None
    return plan_out(replaced)


@router.delete(
    "/recovery-plans/{plan}", tags=["recovery plans"], summary="Delete a recovery plan (operator)"
)
async def delete_plan(
    vault_id: uuid.UUID, plan: str, request: Request, principal: CurrentPrincipal
) -> Any:
    principal.check(Role.OPERATOR, vault_id)
    try:
        deleted = await handlers.delete_plan(context(request), DeletePlan(vault_id, plan))
    except FailoverRefused as exc:
        raise refused(exc) from None
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
    return await start_operation(
        request,
        principal,
        vault_id,
        operation,
        body,
        lambda op, params, by: StartPlanOperation(vault_id, plan, op, params, by),
    )
