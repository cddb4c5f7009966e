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
from services.failover.domain import FailoverRefused, Operation, PlanGroup
from services.failover.operations import STEPS, path_exists
from services.failover.workflow import Engine, Notifier
from shared.kafka.consumers import Handler
from shared.kafka.decode import Incoming
from shared.schemas import agent, failover, inventory, policy, replication
from shared.schemas.failover import JobState


@dataclass
class Context:
    pool: asyncpg.Pool
    settings: FailoverSettings
    engine: Engine
    notifier: Notifier


# ------------------------------------------------------------------ events


def make_event_handlers(notifier: Notifier) -> dict[str, Handler]:
    async def on_protected(conn: asyncpg.Connection, inc: Incoming) -> None:
        ev = inc.payload
        assert isinstance(ev, replication.ProtectionEnabled)
        await conn.execute(
            "INSERT INTO rm_items (item_id, vault_id, vm_id, vm_name, source_cloud_id,"
            " target_cloud_id, pairing_id, source_agent_id) VALUES ($1,$2,$3,$4,$5,$6,$7,$8)"
            " ON CONFLICT (item_id) DO UPDATE SET source_agent_id = EXCLUDED.source_agent_id,"
            " active = true, updated_at = now() WHERE rm_items.vault_id = EXCLUDED.vault_id",
            ev.item_id,
            inc.envelope.vault_id,
            ev.vm_id,
            ev.vm_name,
            ev.source_cloud_id,
            ev.target_cloud_id,
            ev.pairing_id,
            ev.source_agent_id,
        )
        notifier.poke()

    async def on_disabled(conn: asyncpg.Connection, inc: Incoming) -> None:
        ev = inc.payload
        assert isinstance(ev, replication.ProtectionDisabled)
        await conn.execute(
            "UPDATE rm_items SET active = false WHERE item_id = $1 AND vault_id = $2",
            ev.item_id,
            inc.envelope.vault_id,
        )

    async def on_state(conn: asyncpg.Connection, inc: Incoming) -> None:
        ev = inc.payload
        assert isinstance(ev, replication.ItemStateChanged)
        await conn.execute(
            "UPDATE rm_items SET state = $2, health = $3, updated_at = now()"
            " WHERE item_id = $1 AND vault_id = $4",
            ev.item_id,
            ev.state.value,
            ev.health.value,
            inc.envelope.vault_id,
        )
        notifier.poke()

    async def on_point(conn: asyncpg.Connection, inc: Incoming) -> None:
        ev = inc.payload
        assert isinstance(ev, replication.RecoveryPointCreated)
        app = ev.point_type is replication.RecoveryPointType.APP_CONSISTENT
        await conn.execute(
            "UPDATE rm_items SET latest_source_time = CASE WHEN coalesce(latest_seq, 0) < $2"
            "  THEN $3 ELSE latest_source_time END,"
            " latest_seq = greatest(coalesce(latest_seq, 0), $2),"
            " latest_app_seq = CASE WHEN $4 THEN greatest(coalesce(latest_app_seq, 0), $2)"
            "  ELSE latest_app_seq END, updated_at = now() WHERE item_id = $1 AND vault_id = $5",
            ev.item_id,
            ev.cycle_seq,
            ev.source_time,
            app,
            inc.envelope.vault_id,
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
            assert isinstance(ev, failover.RecoveryPointMaterialiseFailed)
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
            await conn.execute(
                "UPDATE rm_vms SET removed = true WHERE vault_id = $1 AND vm_id = $2 AND site = $3",
                inc.envelope.vault_id,
                ev.vm_id,
                ev.site,
            )
            return
        # A recovery VM keeps its source's id: the primary's record stays the one we use for
        # the source disks and NICs; only an item's own source site may overwrite it.
        await conn.execute(
            "INSERT INTO rm_vms (vm_id, vault_id, site, vm) VALUES ($1,$2,$3,$4)"
            " ON CONFLICT (vault_id, vm_id) DO UPDATE SET vm = EXCLUDED.vm, site = EXCLUDED.site,"
            " removed = false WHERE rm_vms.site = EXCLUDED.site OR rm_vms.removed",
            ev.vm_id,
            inc.envelope.vault_id,
            ev.site,
            ev.vm.model_dump(mode="json"),
        )

    async def on_network(conn: asyncpg.Connection, inc: Incoming) -> None:
        ev = inc.payload
        assert isinstance(ev, inventory.NetworkChanged)
        if ev.network is None:
            await conn.execute(
                "UPDATE rm_networks SET removed = true WHERE vault_id = $1 AND network_id = $2",
                inc.envelope.vault_id,
                ev.network_id,
            )
            return
        await conn.execute(
            "INSERT INTO rm_networks (network_id, vault_id, site, network) VALUES ($1,$2,$3,$4)"
            " ON CONFLICT (vault_id, network_id) DO UPDATE SET network = EXCLUDED.network,"
            " site = EXCLUDED.site, removed = false",
            ev.network_id,
            inc.envelope.vault_id,
            ev.site,
            ev.network.model_dump(mode="json"),
        )

    async def on_cloud(conn: asyncpg.Connection, inc: Incoming) -> None:
        ev = inc.payload
        assert isinstance(ev, inventory.CloudChanged)
        await conn.execute(
            "INSERT INTO rm_clouds (cloud_id, vault_id, site) VALUES ($1,$2,$3)"
            " ON CONFLICT (vault_id, cloud_id) DO UPDATE SET site = EXCLUDED.site",
            ev.cloud_id,
            inc.envelope.vault_id,
            ev.site,
        )

    async def on_mapping(conn: asyncpg.Connection, inc: Incoming) -> None:
        ev = inc.payload
        assert isinstance(
            ev,
            policy.NetworkMappingCreated
            | policy.NetworkMappingChanged
            | policy.NetworkMappingRemoved,
        )
        m = ev.mapping
        await conn.execute(
            "INSERT INTO rm_mappings (mapping_id, vault_id, source_network_id, target_network_id,"
            " removed) VALUES ($1,$2,$3,$4,$5) ON CONFLICT (vault_id, mapping_id) DO UPDATE SET"
            " target_network_id = EXCLUDED.target_network_id, removed = EXCLUDED.removed",
            m.mapping_id,
            inc.envelope.vault_id,
            m.source_network_id,
            m.target_network_id,
            isinstance(ev, policy.NetworkMappingRemoved),
        )

    return {
        "ProtectionEnabled": on_protected,
        "ProtectionDisabled": on_disabled,
        "ItemStateChanged": on_state,
        "RecoveryPointCreated": on_point,
        "RecoveryPointMaterialised": on_materialised,
        "RecoveryPointMaterialiseFailed": on_materialised,
        "CommandCompleted": on_completed,
        "VmChanged": on_vm,
        "NetworkChanged": on_network,
        "CloudChanged": on_cloud,
        "NetworkMappingCreated": on_mapping,
        "NetworkMappingChanged": on_mapping,
        "NetworkMappingRemoved": on_mapping,
    }


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
        raise FailoverRefused(f"protected item {item_id} not found in this vault", 404)
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
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"jobs:{vault_id}")
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
        raise FailoverRefused(f"recovery plan {plan_ref} not found", 404)
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
        job = await conn.fetchrow("SELECT * FROM jobs WHERE job_id = $1 FOR UPDATE", job_id)
        if job is None or job["vault_id"] != vault_id:
            raise FailoverRefused(f"job {job_id} not found", 404)
        waiting = job["waiting_for"]
        if job["state"] != JobState.WAITING_FOR_INPUT.value or not waiting:
            raise FailoverRefused(f"job {job_id} is not waiting for input (it is {job['state']})")
        if waiting["action_id"] != action_id:
            raise FailoverRefused(
                f"job {job_id} waits for action '{waiting['action_id']}', not '{action_id}'"
            )
        await conn.execute(
            "INSERT INTO approvals (job_id, action_key, approved_by, comment) VALUES ($1,$2,$3,$4)"
            " ON CONFLICT DO NOTHING",
            job_id,
            waiting["action_key"],
            by,
            comment,
        )
        await repo.history(conn, job_id, f"manual action '{waiting['name']}' approved by {by}")
    ctx.notifier.poke()
    return dict(job)


async def restart(ctx: Context, vault_id: uuid.UUID, job_id: uuid.UUID, by: str) -> dict[str, Any]:
    async with ctx.pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"jobs:{vault_id}")
        job = await conn.fetchrow("SELECT * FROM jobs WHERE job_id = $1 FOR UPDATE", job_id)
        if job is None or job["vault_id"] != vault_id:
            raise FailoverRefused(f"job {job_id} not found", 404)
        why = domain.can_restart(Operation(job["operation"]), JobState(job["state"]))
        if why:
            raise FailoverRefused(why)
        busy = await repo.busy_items(conn, vault_id, list(job["params"].get("items", [])))
        if busy:
            raise FailoverRefused("another job holds the job's items; wait for it to finish")
        # Failed steps run again with a new idempotency key; done steps stand.
        await conn.execute("DELETE FROM tasks WHERE job_id = $1 AND state <> 'succeeded'", job_id)
        updated = await repo.update_job(
            conn,
            job_id,
            state=JobState.IN_PROGRESS.value,
            run_no=job["run_no"] + 1,
            restarts=job["restarts"] + 1,
            error=None,
            cause=None,
            recommendation=None,
            ended_at=None,
        )
        await repo.history(conn, job_id, f"restarted by {by}")
    ctx.engine.submit(job_id)
    return updated


async def force_old_test_cleanups(ctx: Context) -> int:
    """Clean up test failovers older than the limit (docs/reference.md: after 2 weeks)."""
    limit = datetime.now(UTC) - timedelta(seconds=ctx.settings.test_max_age_seconds)
    # A forced cleanup that failed is not retried for an hour: an operator sees the failed job
    # (and its alert) instead of a new failed job every sweep.
    rows = await ctx.pool.fetch(
        "SELECT f.item_id, f.vault_id FROM item_failover f WHERE f.state = 'testing'"
        " AND f.test IS NOT NULL AND (f.test->>'started_at')::timestamptz < $1"
        " AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.target = f.item_id::text"
        " AND j.created_by = 'system:forced-cleanup' AND j.state = 'failed'"
        " AND j.ended_at > now() - interval '1 hour')",
        limit,
    )
    started = 0
    for row in rows:
        try:
            await start_item_operation(
                ctx,
                row["vault_id"],
                row["item_id"],
                Operation.TEST_CLEANUP,
                {"notes": "forced cleanup: the test failover was older than the limit"},
                "system:forced-cleanup",
            )
            started += 1
        except FailoverRefused:
            continue
    return started
