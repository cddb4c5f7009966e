"""asyncpg queries for the failover service's own schema."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, TypeAlias

import asyncpg

from shared import outbox
from shared.kafka.decode import Rejected
from shared.schemas.envelope import EventPayload
from shared.schemas.failover import JobChanged, JobState, TaskChanged

PRODUCER_ID = "service:failover"

Conn: TypeAlias = asyncpg.Connection | asyncpg.Pool


REPLICATION = "service:replication"


async def emit(
    conn: asyncpg.Connection, vault_id: uuid.UUID, payload: EventPayload, key: str
) -> None:
    """Publish `payload` (through the outbox); a question (an agent's command, a request to
    the replication service) is recorded with whom it was asked of, in the same transaction."""
    question = _question(payload)
    if question is not None:
        await conn.execute(
            "INSERT INTO questions (request_id, vault_id, addressee) VALUES ($1,$2,$3)"
            " ON CONFLICT (request_id) DO NOTHING",
            question[0],
            vault_id,
            question[1],
        )
    await outbox.emit(conn, payload, vault_id=vault_id, key=key, producer_id=PRODUCER_ID)


def _question(payload: EventPayload) -> tuple[uuid.UUID, str] | None:
    command_id, agent_id = getattr(payload, "command_id", None), getattr(payload, "agent_id", None)
    if isinstance(command_id, uuid.UUID) and isinstance(agent_id, uuid.UUID):
        return command_id, str(agent_id)
    request_id = getattr(payload, "request_id", None)
    if isinstance(request_id, uuid.UUID):
        return request_id, REPLICATION
    return None


async def check_answerer(
    conn: asyncpg.Connection, request_id: uuid.UUID, vault_id: uuid.UUID, producer_id: str
) -> bool:
    """True if `request_id` is a question of ours and this answer comes from whom it was asked
    of, in its vault; False if it is not ours (nothing to do). Raises Rejected otherwise."""
    row = await conn.fetchrow(
        "SELECT vault_id, addressee FROM questions WHERE request_id = $1", request_id
    )
    if row is None:
        return False
    if row["vault_id"] != vault_id:
        raise Rejected("vault_mismatch", f"{request_id} was asked in another vault")
    if row["addressee"] is not None and row["addressee"] != producer_id:
        raise Rejected(
            "wrong_answerer",
            f"{request_id} was asked of {row['addressee']}, not {producer_id}",
        )
    return True


# ------------------------------------------------------------------ read models


async def item(conn: Conn, item_id: uuid.UUID) -> dict[str, Any] | None:
    row = await conn.fetchrow("SELECT * FROM rm_items WHERE item_id = $1", item_id)
    return dict(row) if row else None


async def items(conn: Conn, vault_id: uuid.UUID) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT i.*, f.state AS failover_state FROM rm_items i"
        " LEFT JOIN item_failover f ON f.item_id = i.item_id"
        " WHERE i.vault_id = $1 ORDER BY i.vm_name, i.item_id",
        vault_id,
    )
    return [dict(r) for r in rows]


async def vm(conn: Conn, vault_id: uuid.UUID, vm_id: str) -> dict[str, Any] | None:
    row = await conn.fetchrow(
        "SELECT * FROM rm_vms WHERE vault_id = $1 AND vm_id = $2", vault_id, vm_id
    )
    return dict(row) if row else None


async def networks(conn: Conn, vault_id: uuid.UUID) -> dict[str, dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT network_id, site, network FROM rm_networks WHERE vault_id = $1 AND NOT removed",
        vault_id,
    )
    return {r["network_id"]: dict(r) for r in rows}


async def mappings(conn: Conn, vault_id: uuid.UUID) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT * FROM rm_mappings WHERE vault_id = $1 AND NOT removed", vault_id
    )
    return [dict(r) for r in rows]


async def cloud_site(conn: Conn, vault_id: uuid.UUID, cloud_id: str) -> str | None:
    site: str | None = await conn.fetchval(
        "SELECT site FROM rm_clouds WHERE vault_id = $1 AND cloud_id = $2", vault_id, cloud_id
    )
    return site


async def producer(conn: Conn, producer_id: uuid.UUID) -> dict[str, Any] | None:
    row = await conn.fetchrow("SELECT * FROM known_producers WHERE producer_id = $1", producer_id)
    return dict(row) if row else None


async def agents_at(conn: Conn, vault_id: uuid.UUID, site: str) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT * FROM known_producers WHERE vault_id = $1 AND site = $2 AND kind = 'agent'"
        " AND active ORDER BY (connection_state IS DISTINCT FROM 'Connected'), name",
        vault_id,
        site,
    )
    return [dict(r) for r in rows]


async def used_ips(conn: Conn, vault_id: uuid.UUID) -> set[str]:
    """Addresses held by discovered VMs and by recovery VMs this service placed."""
    used: set[str] = set()
    for r in await conn.fetch(
        "SELECT vm FROM rm_vms WHERE vault_id = $1 AND NOT removed", vault_id
    ):
        used.update(n["ip_address"] for n in r["vm"].get("nics", []) if n.get("ip_address"))
    for r in await conn.fetch("SELECT info FROM item_failover WHERE vault_id = $1", vault_id):
        used.update(n["ip_address"] for n in r["info"].get("nics", []) if n.get("ip_address"))
    return used


async def answer(conn: Conn, request_id: uuid.UUID) -> dict[str, Any] | None:
    row = await conn.fetchrow("SELECT * FROM answers WHERE request_id = $1", request_id)
    return dict(row) if row else None


async def save_answer(
    conn: asyncpg.Connection,
    request_id: uuid.UUID,
    kind: str,
    ok: bool,
    error: str,
    result: dict[str, Any],
) -> None:
    await conn.execute(
        "INSERT INTO answers (request_id, kind, ok, error, result) VALUES ($1,$2,$3,$4,$5)"
        " ON CONFLICT (request_id) DO NOTHING",
        request_id,
        kind,
        ok,
        error,
        result,
    )


# ------------------------------------------------------------------ item failover view


async def view(conn: Conn, item_id: uuid.UUID) -> dict[str, Any] | None:
    row = await conn.fetchrow("SELECT * FROM item_failover WHERE item_id = $1", item_id)
    return dict(row) if row else None


async def set_view(
    conn: Conn,
    item_id: uuid.UUID,
    vault_id: uuid.UUID,
    state: str,
    *,
    info: dict[str, Any] | None = None,
    test: dict[str, Any] | bool | None = False,
    note: dict[str, Any] | None = None,
) -> None:
    """Upsert the item's failover view; `info` is merged, `test` replaced unless False."""
    await conn.execute(
        "INSERT INTO item_failover (item_id, vault_id, state, info, test, notes)"
        " VALUES ($1, $2, $3, coalesce($4::jsonb, '{}'::jsonb),"
        "  CASE WHEN $6 THEN $5::jsonb ELSE NULL END,"
        "  CASE WHEN $7::jsonb IS NULL THEN '[]'::jsonb ELSE jsonb_build_array($7::jsonb) END)"
        " ON CONFLICT (item_id) DO UPDATE SET state = EXCLUDED.state,"
        "  info = item_failover.info || coalesce($4::jsonb, '{}'::jsonb),"
        "  test = CASE WHEN $6 THEN $5::jsonb ELSE item_failover.test END,"
        "  notes = CASE WHEN $7::jsonb IS NULL THEN item_failover.notes"
        "   ELSE item_failover.notes || jsonb_build_array($7::jsonb) END,"
        "  updated_at = now()",
        item_id,
        vault_id,
        state,
        info,
        test if test is not False else None,
        test is not False,
        note,
    )


async def link_of(
    conn: Conn, *, old: uuid.UUID | None = None, new: uuid.UUID | None = None
) -> dict[str, Any] | None:
    if old is not None:
        row = await conn.fetchrow("SELECT * FROM item_links WHERE old_item_id = $1", old)
    else:
        row = await conn.fetchrow("SELECT * FROM item_links WHERE new_item_id = $1", new)
    return dict(row) if row else None


async def current_item(conn: Conn, item_id: uuid.UUID) -> uuid.UUID:
    """Follow reverse-replication links to the item that protects the VM now."""
    seen = {item_id}
    while True:
        nxt = await conn.fetchval(
            "SELECT new_item_id FROM item_links WHERE old_item_id = $1", item_id
        )
        if nxt is None or nxt in seen:
            return item_id
        seen.add(nxt)
        item_id = nxt


# ------------------------------------------------------------------ jobs and tasks


async def insert_job(
    conn: asyncpg.Connection,
    *,
    job_id: uuid.UUID,
    vault_id: uuid.UUID,
    operation: str,
    target_kind: str,
    target: str,
    params: dict[str, Any],
    expected_tasks: int,
    created_by: str,
) -> dict[str, Any]:
    row = await conn.fetchrow(
        "INSERT INTO jobs (job_id, vault_id, operation, target_kind, target, params, state,"
        " expected_tasks, created_by) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9) RETURNING *",
        job_id,
        vault_id,
        operation,
        target_kind,
        target,
        params,
        JobState.NOT_STARTED.value,
        expected_tasks,
        created_by,
    )
    await history(conn, job_id, f"{operation} created by {created_by or 'system'}")
    job = dict(row)
    await emit_job(conn, job)
    return job


async def emit_job(conn: asyncpg.Connection, job: dict[str, Any]) -> None:
    await emit(
        conn,
        job["vault_id"],
        JobChanged(
            job_id=job["job_id"],
            operation=job["operation"],
            target=job["target"],
            state=JobState(job["state"]),
            progress=job["progress"],
            error=job["error"],
            cause=job["cause"],
            recommendation=job["recommendation"],
            restarts=job["restarts"],
        ),
        str(job["job_id"]),
    )


async def update_job(conn: asyncpg.Connection, job_id: uuid.UUID, **fields: Any) -> dict[str, Any]:
    sets = ", ".join(f"{k} = ${i}" for i, k in enumerate(fields, start=2))
    row = await conn.fetchrow(
        f"UPDATE jobs SET {sets}, updated_at = now() WHERE job_id = $1 RETURNING *",
        job_id,
        *fields.values(),
    )
    job = dict(row)
    await emit_job(conn, job)
    return job


async def job(conn: Conn, job_id: uuid.UUID) -> dict[str, Any] | None:
    row = await conn.fetchrow("SELECT * FROM jobs WHERE job_id = $1", job_id)
    return dict(row) if row else None


async def jobs(
    conn: Conn,
    vault_id: uuid.UUID,
    *,
    state: str | None = None,
    operation: str | None = None,
    target: str | None = None,
    since: datetime | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT * FROM jobs WHERE vault_id = $1 AND ($2::text IS NULL OR state = $2)"
        " AND ($3::text IS NULL OR operation = $3) AND ($4::text IS NULL OR target = $4"
        "  OR params->'items' ? $4)"
        " AND ($5::timestamptz IS NULL OR created_at >= $5)"
        " ORDER BY created_at DESC LIMIT $6",
        vault_id,
        state,
        operation,
        target,
        since,
        limit,
    )
    return [dict(r) for r in rows]


async def unfinished_jobs(conn: Conn) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT * FROM jobs WHERE state IN ('not_started', 'in_progress', 'waiting_for_input')"
        " ORDER BY created_at"
    )
    return [dict(r) for r in rows]


async def busy_items(conn: Conn, vault_id: uuid.UUID, item_ids: list[str]) -> dict[str, str]:
    """item id -> operation of an unfinished job that holds it."""
    rows = await conn.fetch(
        "SELECT operation, params->'items' AS items FROM jobs WHERE vault_id = $1"
        " AND state IN ('not_started', 'in_progress', 'waiting_for_input')"
        " AND params->'items' ?| $2::text[]",
        vault_id,
        item_ids,
    )
    out: dict[str, str] = {}
    for r in rows:
        for i in r["items"]:
            if i in item_ids:
                out[i] = r["operation"]
    return out


async def history(conn: Conn, job_id: uuid.UUID, message: str) -> None:
    await conn.execute("INSERT INTO job_history (job_id, message) VALUES ($1, $2)", job_id, message)


async def job_history(conn: Conn, job_id: uuid.UUID) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT at, message FROM job_history WHERE job_id = $1 ORDER BY id", job_id
    )
    return [dict(r) for r in rows]


async def tasks(conn: Conn, job_id: uuid.UUID) -> list[dict[str, Any]]:
    rows = await conn.fetch("SELECT * FROM tasks WHERE job_id = $1 ORDER BY task_no", job_id)
    return [dict(r) for r in rows]


async def task(conn: Conn, job_id: uuid.UUID, step_key: str) -> dict[str, Any] | None:
    row = await conn.fetchrow(
        "SELECT * FROM tasks WHERE job_id = $1 AND step_key = $2", job_id, step_key
    )
    return dict(row) if row else None


async def insert_task(
    conn: asyncpg.Connection,
    vault_id: uuid.UUID,
    job_id: uuid.UUID,
    step_key: str,
    name: str,
    command_id: uuid.UUID,
    state: JobState = JobState.IN_PROGRESS,
) -> dict[str, Any]:
    await conn.execute("SELECT 1 FROM jobs WHERE job_id = $1 FOR UPDATE", job_id)
    row = await conn.fetchrow(
        "INSERT INTO tasks (job_id, task_no, step_key, name, state, command_id)"
        " SELECT $1, coalesce(max(task_no), -1) + 1, $2, $3, $4, $5 FROM tasks WHERE job_id = $1"
        " RETURNING *",
        job_id,
        step_key,
        name,
        state.value,
        command_id,
    )
    t = dict(row)
    await emit_task(conn, vault_id, t)
    return t


async def emit_task(conn: asyncpg.Connection, vault_id: uuid.UUID, t: dict[str, Any]) -> None:
    await emit(
        conn,
        vault_id,
        TaskChanged(
            job_id=t["job_id"],
            task_no=t["task_no"],
            name=t["name"],
            state=JobState(t["state"]),
            error=t["error"],
            detail=t["detail"],
        ),
        str(t["job_id"]),
    )


async def update_task(
    conn: asyncpg.Connection, vault_id: uuid.UUID, job_id: uuid.UUID, step_key: str, **fields: Any
) -> dict[str, Any]:
    sets = ", ".join(f"{k} = ${i}" for i, k in enumerate(fields, start=3))
    row = await conn.fetchrow(
        f"UPDATE tasks SET {sets} WHERE job_id = $1 AND step_key = $2 RETURNING *",
        job_id,
        step_key,
        *fields.values(),
    )
    t = dict(row)
    await emit_task(conn, vault_id, t)
    return t


async def approval(conn: Conn, job_id: uuid.UUID, action_key: str) -> dict[str, Any] | None:
    row = await conn.fetchrow(
        "SELECT * FROM approvals WHERE job_id = $1 AND action_key = $2", job_id, action_key
    )
    return dict(row) if row else None


# ------------------------------------------------------------------ plans


async def plan(conn: Conn, vault_id: uuid.UUID, plan_ref: str) -> dict[str, Any] | None:
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
    return dict(row) if row else None


async def plans(conn: Conn, vault_id: uuid.UUID) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT * FROM recovery_plans WHERE vault_id = $1 ORDER BY name", vault_id
    )
    return [dict(r) for r in rows]
