"""Command handlers of the failover service: start an operation on an item or a plan, approve
a manual action, restart a job, recovery plan CRUD. Each is dispatched by its command's type
(`handle`), loads what it decides on, lets the job aggregate (services/failover/job.py) or the
rules of services/failover/domain/ decide, commits through a unit of work, then hands the job
to the engine. Refusals are domain errors (`FailoverRefused`, `NotFound`, `InvalidRequest`); the
routes map them to HTTP (services/failover/api/common.py)."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from services.failover import item_failover_repository as failover_repo
from services.failover import plan_repository as plans_repo
from services.failover import read_model_repository as read_models
from services.failover.commands import (
    ApproveAction,
    Command,
    CreatePlan,
    DeletePlan,
    ReplacePlan,
    RestartJob,
    StartItemOperation,
    StartPlanOperation,
)
from services.failover.config import FailoverSettings
from services.failover.domain.errors import FailoverRefused, InvalidRequest, NotFound
from services.failover.domain.items import (
    ItemRow,
    check_cleanup,
    check_commit,
    check_planned,
    check_reverse,
    check_test,
    check_unplanned,
)
from services.failover.domain.jobs import OPERATION_KIND, Operation, can_restart
from services.failover.domain.plans import PlanGroup, RecoveryPlan, actions_for
from services.failover.domain.points import check_point_exists
from services.failover.item_workflows import STEPS
from services.failover.job import Job, JobParams
from services.failover.unit_of_work import PgUnitOfWork, ReadModels, UnitOfWork
from services.failover.workflow import Engine, Notifier


@dataclass
class Context:
    pool: asyncpg.Pool
    settings: FailoverSettings
    engine: Engine
    notifier: Notifier
    unit_of_work: Callable[[], UnitOfWork] | None = field(default=None)

    def uow(self) -> UnitOfWork:
        return self.unit_of_work() if self.unit_of_work else PgUnitOfWork(self.pool)


# ------------------------------------------------------------------ start a job

CHECKS = {
    Operation.TEST_FAILOVER: check_test,
    Operation.TEST_CLEANUP: check_cleanup,
    Operation.PLANNED_FAILOVER: check_planned,
    Operation.UNPLANNED_FAILOVER: check_unplanned,
    Operation.COMMIT: check_commit,
    Operation.REVERSE: check_reverse,
}


async def check_item(
    reads: ReadModels,
    vault_id: uuid.UUID,
    item_id: uuid.UUID,
    operation: Operation,
    params: JobParams,
) -> ItemRow:
    item = await reads.item(item_id)
    if item is None or item.vault_id != vault_id:
        raise NotFound(f"protected item {item_id} not found in this vault")
    view = await reads.view(item_id)
    if operation is Operation.FAILBACK:
        if not await reads.reversed_from(item_id):
            raise FailoverRefused(
                f"{item.vm_name} is not protected in reverse: failback comes after a "
                "failover and reverse replication"
            )
        check_planned(item, view)
    else:
        CHECKS[operation](item, view)
    if operation in (Operation.TEST_FAILOVER, Operation.UNPLANNED_FAILOVER):
        retained = await reads.retained_points(item_id)
        check_point_exists(item, params.choice, params.cycle_seq, retained)
    # Reverse replication: whether the old primary's disks are still there is asked of its
    # host by the job (services/failover/item_workflows.py), not checked here.
    return item


async def start_job(
    ctx: Context,
    vault_id: uuid.UUID,
    operation: Operation,
    *,
    item_ids: list[uuid.UUID],
    target_kind: str,
    target: str,
    params: JobParams,
    expected_tasks: int,
    created_by: str,
) -> Job:
    """Refuse or create the job (atomically per vault), then hand it to the engine."""
    async with ctx.uow() as uow:
        await uow.jobs.lock_vault(vault_id)
        busy = await uow.jobs.busy_items(vault_id, [str(i) for i in item_ids])
        items = []
        for item_id in item_ids:
            if str(item_id) in busy:
                found = await uow.reads.item(item_id)
                name = found.vm_name if found else str(item_id)
                running = busy[str(item_id)]
                what = (
                    "a test failover" if running == Operation.TEST_FAILOVER else f"a {running} job"
                )
                raise FailoverRefused(f"{what} of {name} is already running; wait for it to finish")
            items.append(await check_item(uow.reads, vault_id, item_id, operation, params))
        if operation is Operation.TEST_FAILOVER and items and params.target_site is None:
            params.target_site = (
                await uow.reads.cloud_site(vault_id, items[0].target_cloud_id) or ""
            )
        params.items = [str(i) for i in item_ids]
        job = Job.create(
            vault_id,
            operation,
            target_kind=target_kind,
            target=target,
            params=params,
            expected_tasks=expected_tasks,
            created_by=created_by,
        )
        uow.jobs.add(job)
        await uow.commit()
    ctx.engine.submit(job.job_id)
    return job


async def start_item_operation(ctx: Context, cmd: StartItemOperation) -> Job:
    network = cmd.params.network not in (None, "none")
    return await start_job(
        ctx,
        cmd.vault_id,
        cmd.operation,
        item_ids=[cmd.item_id],
        target_kind="item",
        target=str(cmd.item_id),
        params=cmd.params,
        expected_tasks=STEPS[cmd.operation] + (1 if network else 0),
        created_by=cmd.by,
    )


async def start_plan_operation(ctx: Context, cmd: StartPlanOperation) -> Job:
    plan = await plans_repo.plan(ctx.pool, cmd.vault_id, cmd.plan_ref)
    if plan is None:
        raise NotFound(f"recovery plan {cmd.plan_ref} not found")
    groups = plan.groups
    kind = OPERATION_KIND.get(cmd.operation)
    item_ids = [await failover_repo.current_item(ctx.pool, i) for g in groups for i in g.items]
    actions = sum(len(actions_for([*g.pre_actions, *g.post_actions], kind)) for g in groups)
    params = cmd.params.model_copy()
    params.groups = list(groups)
    params.plan_name = plan.name
    return await start_job(
        ctx,
        cmd.vault_id,
        cmd.operation,
        item_ids=item_ids,
        target_kind="plan",
        target=str(plan.plan_id),
        params=params,
        expected_tasks=max(1, STEPS[cmd.operation] * len(item_ids) + actions),
        created_by=cmd.by,
    )


# ------------------------------------------------------------------ a job's life


async def approve(ctx: Context, cmd: ApproveAction) -> Job:
    async with ctx.uow() as uow:
        job = await uow.jobs.get(cmd.job_id)
        if job is None or job.vault_id != cmd.vault_id:
            raise NotFound(f"job {cmd.job_id} not found")
        action_key = job.approve(cmd.action_id, cmd.by)
        await uow.jobs.approve(job.job_id, action_key, cmd.by, cmd.comment)
        await uow.commit()
    ctx.notifier.poke()
    return job


async def restart(ctx: Context, cmd: RestartJob) -> Job:
    async with ctx.uow() as uow:
        await uow.jobs.lock_vault(cmd.vault_id)
        job = await uow.jobs.get(cmd.job_id)
        if job is None or job.vault_id != cmd.vault_id:
            raise NotFound(f"job {cmd.job_id} not found")
        busy = (
            await uow.jobs.busy_items(cmd.vault_id, job.params.items)
            if can_restart(job.operation, job.state) is None
            else {}
        )
        job.restart(cmd.by, items_busy=bool(busy))
        await uow.commit()
    ctx.engine.submit(job.job_id)
    return job


# ------------------------------------------------------------------ recovery plans


async def create_plan(ctx: Context, cmd: CreatePlan) -> RecoveryPlan:
    await _check_items_known(ctx, cmd.vault_id, cmd.groups)
    plan = await plans_repo.insert_plan(
        ctx.pool, cmd.vault_id, cmd.name, cmd.description, cmd.groups
    )
    if plan is None:
        raise FailoverRefused(f"a recovery plan named '{cmd.name}' already exists")
    return plan


async def replace_plan(ctx: Context, cmd: ReplacePlan) -> RecoveryPlan:
    await _check_items_known(ctx, cmd.vault_id, cmd.groups)
    plan = await plans_repo.replace_plan(
        ctx.pool, cmd.plan_id, cmd.name, cmd.description, cmd.groups
    )
    if plan is None:
        raise FailoverRefused(f"a recovery plan named '{cmd.name}' already exists")
    return plan


async def delete_plan(ctx: Context, cmd: DeletePlan) -> RecoveryPlan:
    """Delete the plan unless it has an unfinished job; under the vault's job lock, so no job
    of it starts meanwhile."""
    async with PgUnitOfWork(ctx.pool) as uow:
        await uow.jobs.lock_vault(cmd.vault_id)
        plan = await plans_repo.plan(uow.conn, cmd.vault_id, cmd.plan_ref)
        if plan is None:
            raise NotFound(f"recovery plan {cmd.plan_ref} not found in this vault")
        if not await plans_repo.delete_idle_plan(uow.conn, plan.plan_id):
            raise FailoverRefused("the plan has a running job; wait for it to finish")
        await uow.commit()
    return plan


async def _check_items_known(ctx: Context, vault_id: uuid.UUID, groups: list[PlanGroup]) -> None:
    ids = [i for g in groups for i in g.items]
    known = await read_models.known_items(ctx.pool, vault_id, ids)
    unknown = [str(i) for i in ids if i not in known]
    if unknown:
        raise InvalidRequest(f"unknown protected items: {', '.join(unknown[:5])}")


# ------------------------------------------------------------------ forced test cleanup

FORCED_CLEANUP = "system:forced-cleanup"


async def force_old_test_cleanups(ctx: Context) -> int:
    """Clean up test failovers older than the limit (docs/reference.md: after 2 weeks)."""
    limit = datetime.now(UTC) - timedelta(seconds=ctx.settings.test_max_age_seconds)
    # A forced cleanup that failed is not retried for an hour: an operator sees the failed job
    # (and its alert) instead of a new failed job every sweep.
    started = 0
    for vault_id, item_id in await failover_repo.tests_to_force_clean(
        ctx.pool, limit, FORCED_CLEANUP
    ):
        try:
            await start_item_operation(
                ctx,
                StartItemOperation(
                    vault_id,
                    item_id,
                    Operation.TEST_CLEANUP,
                    JobParams(notes="forced cleanup: the test failover was older than the limit"),
                    FORCED_CLEANUP,
                ),
            )
            started += 1
        except FailoverRefused:
            continue
    return started


# ------------------------------------------------------------------ dispatch

COMMAND_HANDLERS: dict[type[Command], Callable[[Context, Any], Awaitable[Any]]] = {
    StartItemOperation: start_item_operation,
    StartPlanOperation: start_plan_operation,
    ApproveAction: approve,
    RestartJob: restart,
    CreatePlan: create_plan,
    ReplacePlan: replace_plan,
    DeletePlan: delete_plan,
}


async def handle(ctx: Context, command: Command) -> Any:
    """Run the handler of the command's type."""
    return await COMMAND_HANDLERS[type(command)](ctx, command)
