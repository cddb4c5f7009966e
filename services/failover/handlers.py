"""Handlers: events that keep the read models and collect answers, and the commands behind the
API (start an operation on an item or a plan, approve a manual action, restart a job, recovery
plan CRUD). Each command loads, decides with `domain`, persists, then hands the job to the
engine."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from services.failover import domain
from services.failover import repository as repo
from services.failover.config import FailoverSettings
from services.failover.domain import (
    FailoverRefused,
    InvalidRequest,
    NotFound,
    Operation,
    PlanGroup,
)
from services.failover.operations import STEPS, path_exists
from services.failover.workflow import Engine, Notifier
from shared.kafka import Handler, Incoming
from shared.schemas import agent, failover, inventory, policy, replication
from shared.schemas.envelope import EventPayload
from shared.schemas.failover import JobState
from shared.schemas.registry import type_name_of


@dataclass
class Context:
    pool: asyncpg.Pool
    settings: FailoverSettings
    engine: Engine
    notifier: Notifier


# ------------------------------------------------------------------ events


def make_event_handlers(notifier: Notifier) -> dict[str, Handler]:
    """The read models' handlers, keyed by payload type (the consumer dispatches by the
    envelope's type name)."""

    async def on_protected(conn: asyncpg.Connection, inc: Incoming) -> None:
        ev = inc.payload
        assert isinstance(ev, replication.ProtectionEnabled)
        await repo.upsert_item(
            conn,
            inc.envelope.vault_id,
            ev.item_id,
            vm_id=ev.vm_id,
            vm_name=ev.vm_name,
            source_cloud_id=ev.source_cloud_id,
            target_cloud_id=ev.target_cloud_id,
            pairing_id=ev.pairing_id,
            source_agent_id=ev.source_agent_id,
        )
        notifier.poke()

    async def on_disabled(conn: asyncpg.Connection, inc: Incoming) -> None:
        ev = inc.payload
        assert isinstance(ev, replication.ProtectionDisabled)
        await repo.deactivate_item(conn, inc.envelope.vault_id, ev.item_id)

    async def on_state(conn: asyncpg.Connection, inc: Incoming) -> None:
        ev = inc.payload
        assert isinstance(ev, replication.ItemStateChanged)
        await repo.set_item_state(
            conn, inc.envelope.vault_id, ev.item_id, ev.state.value, ev.health.value
        )
        notifier.poke()

    async def on_point(conn: asyncpg.Connection, inc: Incoming) -> None:
        ev = inc.payload
        assert isinstance(ev, replication.RecoveryPointCreated)
        app = ev.point_type is replication.RecoveryPointType.APP_CONSISTENT
        await repo.record_point(
            conn, inc.envelope.vault_id, ev.item_id, ev.cycle_seq, ev.source_time, app
        )
        notifier.poke()

    async def on_materialised(conn: asyncpg.Connection, inc: Incoming) -> None:
        ev = inc.payload
        assert isinstance(
            ev, failover.RecoveryPointMaterialised | failover.RecoveryPointMaterialiseFailed
        )
        if not await repo.check_answerer(
            conn, ev.request_id, inc.envelope.vault_id, inc.envelope.producer_id
        ):
            return
        if isinstance(ev, failover.RecoveryPointMaterialised):
            await repo.save_answer(
                conn,
                ev.request_id,
                "materialise",
                True,
                "",
                ev.model_dump(
                    mode="json", include={"cycle_seq", "source_time", "app_consistent", "disks"}
                ),
            )
        else:
            await repo.save_answer(conn, ev.request_id, "materialise", False, ev.error, {})
        notifier.poke()

    async def on_completed(conn: asyncpg.Connection, inc: Incoming) -> None:
        ev = inc.payload
        assert isinstance(ev, agent.CommandCompleted)
        if not await repo.check_answerer(
            conn, ev.command_id, inc.envelope.vault_id, inc.envelope.producer_id
        ):
            return  # another service's command
        await repo.save_answer(
            conn,
            ev.command_id,
            f"agent {ev.command_type}",
            ev.outcome is agent.CommandOutcome.SUCCEEDED,
            ev.error,
            ev.result,
        )
        notifier.poke()

    async def on_vm(conn: asyncpg.Connection, inc: Incoming) -> None:
        ev = inc.payload
        assert isinstance(ev, inventory.VmChanged)
        if ev.vm is None:
            await repo.remove_vm(conn, inc.envelope.vault_id, ev.vm_id, ev.site)
        else:
            await repo.upsert_vm(
                conn, inc.envelope.vault_id, ev.vm_id, ev.site, ev.vm.model_dump(mode="json")
            )

    async def on_network(conn: asyncpg.Connection, inc: Incoming) -> None:
        ev = inc.payload
        assert isinstance(ev, inventory.NetworkChanged)
        if ev.network is None:
            await repo.remove_network(conn, inc.envelope.vault_id, ev.network_id)
        else:
            await repo.upsert_network(
                conn,
                inc.envelope.vault_id,
                ev.network_id,
                ev.site,
                ev.network.model_dump(mode="json"),
            )

    async def on_cloud(conn: asyncpg.Connection, inc: Incoming) -> None:
        ev = inc.payload
        assert isinstance(ev, inventory.CloudChanged)
        await repo.upsert_cloud(conn, inc.envelope.vault_id, ev.cloud_id, ev.site)

    async def on_mapping(conn: asyncpg.Connection, inc: Incoming) -> None:
        ev = inc.payload
        assert isinstance(
            ev,
            policy.NetworkMappingCreated
            | policy.NetworkMappingChanged
            | policy.NetworkMappingRemoved,
        )
        m = ev.mapping
        await repo.upsert_mapping(
            conn,
            inc.envelope.vault_id,
            m.mapping_id,
            m.source_network_id,
            m.target_network_id,
            isinstance(ev, policy.NetworkMappingRemoved),
        )

    by_type: dict[type[EventPayload], Handler] = {
        replication.ProtectionEnabled: on_protected,
        replication.ProtectionDisabled: on_disabled,
        replication.ItemStateChanged: on_state,
        replication.RecoveryPointCreated: on_point,
        failover.RecoveryPointMaterialised: on_materialised,
        failover.RecoveryPointMaterialiseFailed: on_materialised,
        agent.CommandCompleted: on_completed,
        inventory.VmChanged: on_vm,
        inventory.NetworkChanged: on_network,
        inventory.CloudChanged: on_cloud,
        policy.NetworkMappingCreated: on_mapping,
        policy.NetworkMappingChanged: on_mapping,
        policy.NetworkMappingRemoved: on_mapping,
    }
    return {type_name_of(t)[0]: h for t, h in by_type.items()}


# ------------------------------------------------------------------ commands

CHECKS = {
    Operation.TEST_FAILOVER: domain.check_test,
    Operation.TEST_CLEANUP: domain.check_cleanup,
    Operation.PLANNED_FAILOVER: domain.check_planned,
    Operation.UNPLANNED_FAILOVER: domain.check_unplanned,
    Operation.COMMIT: domain.check_commit,
    Operation.REVERSE: domain.check_reverse,
}


async def check_item(
    conn: asyncpg.Connection,
    vault_id: uuid.UUID,
    item_id: uuid.UUID,
    operation: Operation,
    params: dict[str, Any],
) -> dict[str, Any]:
    item = await repo.item(conn, item_id)
    if item is None or item["vault_id"] != vault_id:
        raise NotFound(f"protected item {item_id} not found in this vault")
    view = await repo.view(conn, item_id)
    if operation is Operation.FAILBACK:
        link = await repo.link_of(conn, new=item_id)
        if link is None:
            raise FailoverRefused(
                f"{item['vm_name']} is not protected in reverse: failback comes after a "
                "failover and reverse replication"
            )
        domain.check_planned(item, view)
    else:
        CHECKS[operation](item, view)
    if operation in (Operation.TEST_FAILOVER, Operation.UNPLANNED_FAILOVER):
        domain.check_point_exists(item, params)
    if operation is Operation.REVERSE:
        info = (view or {}).get("info", {})
        old = dict(info.get("source_disks", {}))
        exists = {p for p in old.values() if p and path_exists(p)}
        domain.seed_disks(
            info.get("recovery_disks", []), old, exists, bool(params.get("force_full_resync"))
        )
    return item


async def start_job(
    ctx: Context,
    vault_id: uuid.UUID,
    operation: Operation,
    *,
    item_ids: list[uuid.UUID],
    target_kind: str,
    target: str,
    params: dict[str, Any],
    expected_tasks: int,
    created_by: str,
) -> dict[str, Any]:
    """Refuse or create the job (atomically per vault), then hand it to the engine."""
    async with ctx.pool.acquire() as conn, conn.transaction():
        await repo.lock_vault_jobs(conn, vault_id)
        busy = await repo.busy_items(conn, vault_id, [str(i) for i in item_ids])
        items = []
        for item_id in item_ids:
            if str(item_id) in busy:
                name = (await repo.item(conn, item_id) or {}).get("vm_name", item_id)
                running = busy[str(item_id)]
                what = (
                    "a test failover" if running == Operation.TEST_FAILOVER else f"a {running} job"
                )
                raise FailoverRefused(f"{what} of {name} is already running; wait for it to finish")
            items.append(await check_item(conn, vault_id, item_id, operation, params))
        if operation is Operation.TEST_FAILOVER and items and "target_site" not in params:
            params["target_site"] = (
                await repo.cloud_site(conn, vault_id, items[0]["target_cloud_id"]) or ""
            )
        params["items"] = [str(i) for i in item_ids]
        job = await repo.insert_job(
            conn,
            job_id=uuid.uuid4(),
            vault_id=vault_id,
            operation=operation.value,
            target_kind=target_kind,
            target=target,
            params=params,
            expected_tasks=expected_tasks,
            created_by=created_by,
        )
    ctx.engine.submit(job["job_id"])
    return job


async def start_item_operation(
    ctx: Context,
    vault_id: uuid.UUID,
    item_id: uuid.UUID,
    operation: Operation,
    params: dict[str, Any],
    created_by: str,
) -> dict[str, Any]:
    return await start_job(
        ctx,
        vault_id,
        operation,
        item_ids=[item_id],
        target_kind="item",
        target=str(item_id),
        params=params,
        expected_tasks=STEPS[operation] + (1 if params.get("network") not in (None, "none") else 0),
        created_by=created_by,
    )


async def start_plan_operation(
    ctx: Context,
    vault_id: uuid.UUID,
    plan_ref: str,
    operation: Operation,
    params: dict[str, Any],
    created_by: str,
) -> dict[str, Any]:
    plan = await repo.plan(ctx.pool, vault_id, plan_ref)
    if plan is None:
        raise NotFound(f"recovery plan {plan_ref} not found")
    groups = [PlanGroup.model_validate(g) for g in plan["groups"]]
    kind = domain.OPERATION_KIND.get(operation)
    item_ids = [await repo.current_item(ctx.pool, i) for g in groups for i in g.items]
    actions = sum(len(domain.actions_for([*g.pre_actions, *g.post_actions], kind)) for g in groups)
    params = {**params, "groups": plan["groups"], "plan_name": plan["name"]}
    return await start_job(
        ctx,
        vault_id,
        operation,
        item_ids=item_ids,
        target_kind="plan",
        target=str(plan["plan_id"]),
        params=params,
        expected_tasks=max(1, STEPS[operation] * len(item_ids) + actions),
        created_by=created_by,
    )


async def approve(
    ctx: Context, vault_id: uuid.UUID, job_id: uuid.UUID, action_id: str, by: str, comment: str
) -> dict[str, Any]:
    async with ctx.pool.acquire() as conn, conn.transaction():
        job = await repo.job_for_update(conn, job_id)
        if job is None or job["vault_id"] != vault_id:
            raise NotFound(f"job {job_id} not found")
        waiting = job["waiting_for"]
        if job["state"] != JobState.WAITING_FOR_INPUT.value or not waiting:
            raise FailoverRefused(f"job {job_id} is not waiting for input (it is {job['state']})")
        if waiting["action_id"] != action_id:
            raise FailoverRefused(
                f"job {job_id} waits for action '{waiting['action_id']}', not '{action_id}'"
            )
        await repo.approve(conn, job_id, waiting["action_key"], by, comment)
        await repo.history(conn, job_id, f"manual action '{waiting['name']}' approved by {by}")
    ctx.notifier.poke()
    return job


async def restart(ctx: Context, vault_id: uuid.UUID, job_id: uuid.UUID, by: str) -> dict[str, Any]:
    async with ctx.pool.acquire() as conn, conn.transaction():
        await repo.lock_vault_jobs(conn, vault_id)
        job = await repo.job_for_update(conn, job_id)
        if job is None or job["vault_id"] != vault_id:
            raise NotFound(f"job {job_id} not found")
        why = domain.can_restart(Operation(job["operation"]), JobState(job["state"]))
        if why:
            raise FailoverRefused(why)
        busy = await repo.busy_items(conn, vault_id, list(job["params"].get("items", [])))
        if busy:
            raise FailoverRefused("another job holds the job's items; wait for it to finish")
        # Failed steps run again with a new idempotency key; done steps stand.
        updated = await repo.restart_job(conn, job_id)
        await repo.history(conn, job_id, f"restarted by {by}")
    ctx.engine.submit(job_id)
    return updated


# ------------------------------------------------------------------ recovery plans


async def create_plan(
    ctx: Context, vault_id: uuid.UUID, name: str, description: str, groups: list[PlanGroup]
) -> dict[str, Any]:
    await _check_items_known(ctx, vault_id, groups)
    plan = await repo.insert_plan(
        ctx.pool, vault_id, name, description, [g.model_dump(mode="json") for g in groups]
    )
    if plan is None:
        raise FailoverRefused(f"a recovery plan named '{name}' already exists")
    return plan


async def replace_plan(
    ctx: Context,
    vault_id: uuid.UUID,
    plan_id: uuid.UUID,
    name: str,
    description: str,
    groups: list[PlanGroup],
) -> dict[str, Any]:
    await _check_items_known(ctx, vault_id, groups)
    plan = await repo.replace_plan(
        ctx.pool, plan_id, name, description, [g.model_dump(mode="json") for g in groups]
    )
    if plan is None:
        raise FailoverRefused(f"a recovery plan named '{name}' already exists")
    return plan


async def delete_plan(ctx: Context, vault_id: uuid.UUID, plan_ref: str) -> dict[str, Any]:
    """Delete the plan unless it has an unfinished job; under the vault's job lock, so no job
    of it starts meanwhile."""
    async with ctx.pool.acquire() as conn, conn.transaction():
        await repo.lock_vault_jobs(conn, vault_id)
        plan = await repo.plan(conn, vault_id, plan_ref)
        if plan is None:
            raise NotFound(f"recovery plan {plan_ref} not found in this vault")
        if not await repo.delete_idle_plan(conn, plan["plan_id"]):
            raise FailoverRefused("the plan has a running job; wait for it to finish")
    return plan


async def _check_items_known(ctx: Context, vault_id: uuid.UUID, groups: list[PlanGroup]) -> None:
    ids = [i for g in groups for i in g.items]
    known = await repo.known_items(ctx.pool, vault_id, ids)
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
    for vault_id, item_id in await repo.tests_to_force_clean(ctx.pool, limit, FORCED_CLEANUP):
        try:
            await start_item_operation(
                ctx,
                vault_id,
                item_id,
                Operation.TEST_CLEANUP,
                {"notes": "forced cleanup: the test failover was older than the limit"},
                FORCED_CLEANUP,
            )
            started += 1
        except FailoverRefused:
            continue
    return started
