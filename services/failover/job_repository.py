"""asyncpg queries of the failover jobs: the job aggregate (services/failover/job.py) loaded
and saved with its history lines and `JobChanged` events (through the outbox, in the caller's
transaction), its tasks (one per workflow step), approvals of manual actions, and the locks that
serialise job creation and address placement per vault."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from services.failover.domain.jobs import Operation, TaskRow
from services.failover.job import Job, JobParams, JobResult, WaitingFor
from services.failover.repository import Conn, emit, from_record
from shared.schemas.failover import JobState, TaskChanged

UNFINISHED = ("not_started", "in_progress", "waiting_for_input")


# ------------------------------------------------------------------ the job aggregate


def _job(row: asyncpg.Record) -> Job:
    return Job(
        job_id=row["job_id"],
        vault_id=row["vault_id"],
        operation=Operation(row["operation"]),
        target_kind=row["target_kind"],
        target=row["target"],
        params=JobParams.model_validate(row["params"]),
        state=JobState(row["state"]),
        progress=row["progress"],
        expected_tasks=row["expected_tasks"],
        error=row["error"],
        cause=row["cause"],
        recommendation=row["recommendation"],
        run_no=row["run_no"],
        restarts=row["restarts"],
        waiting_for=WaitingFor.model_validate(row["waiting_for"]) if row["waiting_for"] else None,
        result=JobResult.model_validate(row["result"]),
        created_by=row["created_by"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        ended_at=row["ended_at"],
        updated_at=row["updated_at"],
    )


async def job(conn: Conn, job_id: uuid.UUID, *, for_update: bool = False) -> Job | None:
    sql = "SELECT * FROM jobs WHERE job_id = $1" + (" FOR UPDATE" if for_update else "")
    row = await conn.fetchrow(sql, job_id)
    return _job(row) if row else None


async def add_job(conn: asyncpg.Connection, job: Job) -> None:
    """Insert a new job, its history and events."""
    row = await conn.fetchrow(
        "INSERT INTO jobs (job_id, vault_id, operation, target_kind, target, params, state,"
        " expected_tasks, created_by) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9)"
        " RETURNING created_at, updated_at",
        job.job_id,
        job.vault_id,
        job.operation.value,
        job.target_kind,
        job.target,
        job.params.stored(),
        job.state.value,
        job.expected_tasks,
        job.created_by,
    )
    job.created_at, job.updated_at = row["created_at"], row["updated_at"]
    await _flush(conn, job)


async def save_job(conn: asyncpg.Connection, job: Job) -> None:
    """Write the job's changed state, its new history lines and events."""
    if job.drop_unfinished_tasks:
        # failed steps run again with a new idempotency key; done steps stand
        await conn.execute(
            "DELETE FROM tasks WHERE job_id = $1 AND state <> 'succeeded'", job.job_id
        )
        job.drop_unfinished_tasks = False
    job.updated_at = await conn.fetchval(
        "UPDATE jobs SET state = $2, progress = $3, error = $4, cause = $5,"
        " recommendation = $6, run_no = $7, restarts = $8, waiting_for = $9, result = $10,"
        " started_at = $11, ended_at = $12, updated_at = now() WHERE job_id = $1"
        " RETURNING updated_at",
        job.job_id,
        job.state.value,
        job.progress,
        job.error,
        job.cause,
        job.recommendation,
        job.run_no,
        job.restarts,
        job.waiting_for.model_dump(mode="json") if job.waiting_for else None,
        job.result.stored(),
        job.started_at,
        job.ended_at,
    )
    await _flush(conn, job)


async def _flush(conn: asyncpg.Connection, job: Job) -> None:
    for message in job.new_history:
        await history(conn, job.job_id, message)
    for event in job.events:
        await emit(conn, job.vault_id, event, str(job.job_id))
    job.new_history.clear()
    job.events.clear()


async def jobs(
    conn: Conn,
    vault_id: uuid.UUID,
    *,
    state: str | None = None,
    operation: str | None = None,
    target: str | None = None,
    since: datetime | None = None,
    limit: int = 100,
) -> list[Job]:
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
    return [_job(r) for r in rows]


async def unfinished_jobs(conn: Conn) -> list[Job]:
    rows = await conn.fetch(
        "SELECT * FROM jobs WHERE state = ANY($1::text[]) ORDER BY created_at", list(UNFINISHED)
    )
    return [_job(r) for r in rows]


# ------------------------------------------------------------------ locks, tasks, approvals


async def lock_vault_jobs(conn: asyncpg.Connection, vault_id: uuid.UUID) -> None:
    """Serialise, per vault, what creates jobs or depends on none running (until commit)."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"jobs:{vault_id}")


async def lock_vault_ips(conn: asyncpg.Connection, vault_id: uuid.UUID) -> None:
    """Serialise, per vault, the placement of recovery VMs' addresses (until commit)."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"ips:{vault_id}")


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


@dataclass(frozen=True)
class HistoryLine:
    at: datetime
    message: str


async def job_history(conn: Conn, job_id: uuid.UUID) -> list[HistoryLine]:
    rows = await conn.fetch(
        "SELECT at, message FROM job_history WHERE job_id = $1 ORDER BY id", job_id
    )
    return [from_record(HistoryLine, r) for r in rows]


async def tasks(conn: Conn, job_id: uuid.UUID) -> list[TaskRow]:
    rows = await conn.fetch("SELECT * FROM tasks WHERE job_id = $1 ORDER BY task_no", job_id)
    return [from_record(TaskRow, r) for r in rows]


async def task(conn: Conn, job_id: uuid.UUID, step_key: str) -> TaskRow | None:
    row = await conn.fetchrow(
        "SELECT * FROM tasks WHERE job_id = $1 AND step_key = $2", job_id, step_key
    )
    return from_record(TaskRow, row) if row else None


async def insert_task(
    conn: asyncpg.Connection,
    vault_id: uuid.UUID,
    job_id: uuid.UUID,
    step_key: str,
    name: str,
    command_id: uuid.UUID,
    state: JobState = JobState.IN_PROGRESS,
) -> TaskRow:
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
    t = from_record(TaskRow, row)
    await emit_task(conn, vault_id, t)
    return t


async def emit_task(conn: asyncpg.Connection, vault_id: uuid.UUID, t: TaskRow) -> None:
    await emit(
        conn,
        vault_id,
        TaskChanged(
            job_id=t.job_id,
            task_no=t.task_no,
            name=t.name,
            state=JobState(t.state),
            error=t.error,
            detail=t.detail,
        ),
        str(t.job_id),
    )


async def _set_task(
    conn: asyncpg.Connection,
    vault_id: uuid.UUID,
    job_id: uuid.UUID,
    step_key: str,
    sql_set: str,
    *args: Any,
) -> TaskRow:
    """Run one of the fixed task updates below (`sql_set` is a literal of this module, never
    built from input), emit the task's new state."""
    row = await conn.fetchrow(
        f"UPDATE tasks SET {sql_set} WHERE job_id = $1 AND step_key = $2 RETURNING *",
        job_id,
        step_key,
        *args,
    )
    t = from_record(TaskRow, row)
    await emit_task(conn, vault_id, t)
    return t


async def fail_task(
    conn: asyncpg.Connection,
    vault_id: uuid.UUID,
    job_id: uuid.UUID,
    step_key: str,
    *,
    error: str,
    cause: str | None,
    recommendation: str | None,
) -> TaskRow:
    return await _set_task(
        conn,
        vault_id,
        job_id,
        step_key,
        "state = 'failed', ended_at = now(), error = $3, cause = $4, recommendation = $5",
        error,
        cause,
        recommendation,
    )


async def finish_task(
    conn: asyncpg.Connection,
    vault_id: uuid.UUID,
    job_id: uuid.UUID,
    step_key: str,
    detail: dict[str, object],
) -> TaskRow:
    return await _set_task(
        conn,
        vault_id,
        job_id,
        step_key,
        "state = 'succeeded', ended_at = now(), detail = $3",
        detail,
    )


async def succeeded_tasks(conn: Conn, job_id: uuid.UUID) -> int:
    done: int = await conn.fetchval(
        "SELECT count(*) FROM tasks WHERE job_id = $1 AND state = 'succeeded'", job_id
    )
    return done


async def approve(
    conn: asyncpg.Connection, job_id: uuid.UUID, action_key: str, by: str, comment: str
) -> None:
    await conn.execute(
        "INSERT INTO approvals (job_id, action_key, approved_by, comment) VALUES ($1,$2,$3,$4)"
        " ON CONFLICT DO NOTHING",
        job_id,
        action_key,
        by,
        comment,
    )


@dataclass(frozen=True)
class ApprovalRow:
    """An operator's approval of a manual action of a job."""

    job_id: uuid.UUID
    action_key: str
    approved_by: str
    comment: str
    at: datetime


async def approval(conn: Conn, job_id: uuid.UUID, action_key: str) -> ApprovalRow | None:
    row = await conn.fetchrow(
        "SELECT * FROM approvals WHERE job_id = $1 AND action_key = $2", job_id, action_key
    )
    return from_record(ApprovalRow, row) if row else None
