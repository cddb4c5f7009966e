"""Recovery plans of a vault: read by id or name, created, replaced and deleted (never while a
job of the plan is unfinished)."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg

from services.failover.domain.plans import PlanGroup, RecoveryPlan
from services.failover.repository import Conn


def _plan(row: asyncpg.Record) -> RecoveryPlan:
    return RecoveryPlan(
        plan_id=row["plan_id"],
        vault_id=row["vault_id"],
        name=row["name"],
        description=row["description"],
        groups=[PlanGroup.model_validate(g) for g in row["groups"]],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _groups(groups: list[PlanGroup]) -> list[dict[str, Any]]:
    return [g.model_dump(mode="json") for g in groups]


async def plan(conn: Conn, vault_id: uuid.UUID, plan_ref: str) -> RecoveryPlan | None:
    try:
        pid: uuid.UUID | None = uuid.UUID(plan_ref)
    except ValueError:
        pid = None
    row = await conn.fetchrow(
        "SELECT * FROM recovery_plans WHERE vault_id = $1 AND (plan_id = $2 OR name = $3)",
        vault_id,
        pid,
        plan_ref,
    )
    return _plan(row) if row else None


async def plans(conn: Conn, vault_id: uuid.UUID) -> list[RecoveryPlan]:
    rows = await conn.fetch(
        "SELECT * FROM recovery_plans WHERE vault_id = $1 ORDER BY name", vault_id
    )
    return [_plan(r) for r in rows]


async def _named_write(conn: Conn, statement: str, *args: object) -> RecoveryPlan | None:
    """The plan `statement` wrote (RETURNING *); None if that took a name another plan of the
    vault has."""
    try:
        row = await conn.fetchrow(statement, *args)
    except asyncpg.UniqueViolationError:
        return None
    return _plan(row)


async def insert_plan(
    conn: Conn,
    vault_id: uuid.UUID,
    name: str,
    description: str,
    groups: list[PlanGroup],
) -> RecoveryPlan | None:
    """The new plan; None if the vault has a plan of that name."""
    return await _named_write(
        conn,
        "INSERT INTO recovery_plans (plan_id, vault_id, name, description, groups)"
        " VALUES ($1,$2,$3,$4,$5) RETURNING *",
        uuid.uuid4(),
        vault_id,
        name,
        description,
        _groups(groups),
    )


async def replace_plan(
    conn: Conn,
    plan_id: uuid.UUID,
    name: str,
    description: str,
    groups: list[PlanGroup],
) -> RecoveryPlan | None:
    """The plan replaced; None if another plan of the vault has that name."""
    return await _named_write(
        conn,
        "UPDATE recovery_plans SET name = $2, description = $3, groups = $4,"
        " updated_at = now() WHERE plan_id = $1 RETURNING *",
        plan_id,
        name,
        description,
        _groups(groups),
    )


async def delete_idle_plan(conn: Conn, plan_id: uuid.UUID) -> bool:
    """Delete the plan unless a job of it is unfinished, in one statement (no window between
    the check and the delete); False if it was kept (or is gone)."""
    deleted = await conn.fetchval(
        "DELETE FROM recovery_plans WHERE plan_id = $1 AND NOT EXISTS (SELECT 1 FROM jobs"
        " WHERE target = $1::text AND state IN ('not_started', 'in_progress',"
        " 'waiting_for_input')) RETURNING plan_id",
        plan_id,
    )
    return deleted is not None
