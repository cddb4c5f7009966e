"""asyncpg queries for the failover service's own schema."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, TypeAlias

import asyncpg

from shared import outbox
from shared.kafka import Rejected
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


async def upsert_item(
    conn: asyncpg.Connection,
    vault_id: uuid.UUID,
    item_id: uuid.UUID,
    *,
    vm_id: str,
    vm_name: str,
    source_cloud_id: str,
    target_cloud_id: str,
    pairing_id: uuid.UUID,
    source_agent_id: uuid.UUID,
) -> None:
    """A protected item (again): its source agent may change; an item of another vault is
    left alone."""
    await conn.execute(
        "INSERT INTO rm_items (item_id, vault_id, vm_id, vm_name, source_cloud_id,"
        " target_cloud_id, pairing_id, source_agent_id) VALUES ($1,$2,$3,$4,$5,$6,$7,$8)"
        " ON CONFLICT (item_id) DO UPDATE SET source_agent_id = EXCLUDED.source_agent_id,"
        " active = true, updated_at = now() WHERE rm_items.vault_id = EXCLUDED.vault_id",
        item_id,
        vault_id,
        vm_id,
        vm_name,
        source_cloud_id,
        target_cloud_id,
        pairing_id,
        source_agent_id,
    )


async def deactivate_item(
    conn: asyncpg.Connection, vault_id: uuid.UUID, item_id: uuid.UUID
) -> None:
    await conn.execute(
        "UPDATE rm_items SET active = false WHERE item_id = $1 AND vault_id = $2",
        item_id,
        vault_id,
    )


async def set_item_state(
    conn: asyncpg.Connection, vault_id: uuid.UUID, item_id: uuid.UUID, state: str, health: str
) -> None:
    await conn.execute(
        "UPDATE rm_items SET state = $2, health = $3, updated_at = now()"
        " WHERE item_id = $1 AND vault_id = $4",
        item_id,
        state,
        health,
        vault_id,
    )


async def record_point(
    conn: asyncpg.Connection,
    vault_id: uuid.UUID,
    item_id: uuid.UUID,
    cycle_seq: int,
    source_time: datetime,
    app_consistent: bool,
) -> None:
    """A new recovery point: the item's latest (and latest app-consistent) move forward only."""
    await conn.execute(
        "UPDATE rm_items SET latest_source_time = CASE WHEN coalesce(latest_seq, 0) < $2"
        "  THEN $3 ELSE latest_source_time END,"
        " latest_seq = greatest(coalesce(latest_seq, 0), $2),"
        " latest_app_seq = CASE WHEN $4 THEN greatest(coalesce(latest_app_seq, 0), $2)"
        "  ELSE latest_app_seq END, updated_at = now() WHERE item_id = $1 AND vault_id = $5",
        item_id,
        cycle_seq,
        source_time,
        app_consistent,
        vault_id,
    )


async def remove_vm(conn: asyncpg.Connection, vault_id: uuid.UUID, vm_id: str, site: str) -> None:
    await conn.execute(
        "UPDATE rm_vms SET removed = true WHERE vault_id = $1 AND vm_id = $2 AND site = $3",
        vault_id,
        vm_id,
        site,
    )


async def upsert_vm(
    conn: asyncpg.Connection, vault_id: uuid.UUID, vm_id: str, site: str, vm: dict[str, Any]
) -> None:
    """A recovery VM keeps its source's id: the primary's record stays the one we use for the
    source disks and NICs; only an item's own source site may overwrite it."""
    await conn.execute(
        "INSERT INTO rm_vms (vm_id, vault_id, site, vm) VALUES ($1,$2,$3,$4)"
        " ON CONFLICT (vault_id, vm_id) DO UPDATE SET vm = EXCLUDED.vm, site = EXCLUDED.site,"
        " removed = false WHERE rm_vms.site = EXCLUDED.site OR rm_vms.removed",
        vm_id,
        vault_id,
        site,
        vm,
    )


async def remove_network(conn: asyncpg.Connection, vault_id: uuid.UUID, network_id: str) -> None:
    await conn.execute(
        "UPDATE rm_networks SET removed = true WHERE vault_id = $1 AND network_id = $2",
        vault_id,
        network_id,
    )


async def upsert_network(
    conn: asyncpg.Connection,
    vault_id: uuid.UUID,
    network_id: str,
    site: str,
    network: dict[str, Any],
) -> None:
    await conn.execute(
        "INSERT INTO rm_networks (network_id, vault_id, site, network) VALUES ($1,$2,$3,$4)"
        " ON CONFLICT (vault_id, network_id) DO UPDATE SET network = EXCLUDED.network,"
        " site = EXCLUDED.site, removed = false",
        network_id,
        vault_id,
        site,
        network,
    )


async def upsert_cloud(
    conn: asyncpg.Connection, vault_id: uuid.UUID, cloud_id: str, site: str
) -> None:
    await conn.execute(
        "INSERT INTO rm_clouds (cloud_id, vault_id, site) VALUES ($1,$2,$3)"
        " ON CONFLICT (vault_id, cloud_id) DO UPDATE SET site = EXCLUDED.site",
        cloud_id,
        vault_id,
        site,
    )


async def upsert_mapping(
    conn: asyncpg.Connection,
    vault_id: uuid.UUID,
    mapping_id: uuid.UUID,
    source_network_id: str,
    target_network_id: str,
    removed: bool,
) -> None:
    await conn.execute(
        "INSERT INTO rm_mappings (mapping_id, vault_id, source_network_id, target_network_id,"
        " removed) VALUES ($1,$2,$3,$4,$5) ON CONFLICT (vault_id, mapping_id) DO UPDATE SET"
        " target_network_id = EXCLUDED.target_network_id, removed = EXCLUDED.removed",
        mapping_id,
        vault_id,
        source_network_id,
        target_network_id,
        removed,
    )


async def known_items(conn: Conn, vault_id: uuid.UUID, item_ids: list[uuid.UUID]) -> set[uuid.UUID]:
    """Those of `item_ids` that are protected items of the vault."""
    rows = await conn.fetch(
        "SELECT item_id FROM rm_items WHERE vault_id = $1 AND item_id = ANY($2::uuid[])",
        vault_id,
        item_ids,
    )
    return {r["item_id"] for r in rows}


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


async def tests_to_force_clean(
    conn: Conn, started_before: datetime, forced_by: str
) -> list[tuple[uuid.UUID, uuid.UUID]]:
    """(vault, item) of test failovers started before the limit; an item whose forced cleanup
    (by `forced_by`) failed in the last hour is left out: an operator sees the failed job (and
    its alert) instead of a new failed job every sweep."""
    rows = await conn.fetch(
        "SELECT f.vault_id, f.item_id FROM item_failover f WHERE f.state = 'testing'"
        " AND f.test IS NOT NULL AND (f.test->>'started_at')::timestamptz < $1"
        " AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.target = f.item_id::text"
        " AND j.created_by = $2 AND j.state = 'failed'"
        " AND j.ended_at > now() - interval '1 hour')",
        started_before,
        forced_by,
    )
    return [(r["vault_id"], r["item_id"]) for r in rows]


async def insert_link(
    conn: asyncpg.Connection,
    vault_id: uuid.UUID,
    old_item_id: uuid.UUID,
    new_item_id: uuid.UUID,
    *,
    vm_id: str,
    vm_name: str,
    source_agent_id: uuid.UUID,
    source_site: str,
    target_site: str,
    disks: list[dict[str, Any]],
    nics: list[dict[str, Any]],
) -> None:
    """Reverse replication: `new_item_id` protects the VM of `old_item_id` now."""
    await conn.execute(
        "INSERT INTO item_links (old_item_id, new_item_id, vault_id, vm_id, vm_name,"
        " source_agent_id, source_site, target_site, disks, nics)"
        " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10) ON CONFLICT DO NOTHING",
        old_item_id,
        new_item_id,
        vault_id,
        vm_id,
        vm_name,
        source_agent_id,
        source_site,
        target_site,
        disks,
        nics,
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


async def _set_job(conn: asyncpg.Connection, sql_set: str, *args: Any) -> dict[str, Any]:
    """Run one of the fixed job updates below (`sql_set` is a literal of this module, never
    built from input), emit the job's new state."""
    row = await conn.fetchrow(
        f"UPDATE jobs SET {sql_set}, updated_at = now() WHERE job_id = $1 RETURNING *", *args
    )
    job = dict(row)
    await emit_job(conn, job)
    return job


async def start_job(conn: asyncpg.Connection, job_id: uuid.UUID) -> dict[str, Any]:
    return await _set_job(conn, "state = 'in_progress', started_at = now()", job_id)


async def set_job_progress(
    conn: asyncpg.Connection, job_id: uuid.UUID, progress: int
) -> dict[str, Any]:
    return await _set_job(conn, "progress = $2", job_id, progress)


async def wait_for_input(
    conn: asyncpg.Connection, job_id: uuid.UUID, waiting_for: dict[str, Any]
) -> dict[str, Any]:
    return await _set_job(
        conn, "state = 'waiting_for_input', waiting_for = $2", job_id, waiting_for
    )


async def resume_after_input(conn: asyncpg.Connection, job_id: uuid.UUID) -> dict[str, Any]:
    return await _set_job(conn, "state = 'in_progress', waiting_for = NULL", job_id)


async def count_resume(conn: asyncpg.Connection, job_id: uuid.UUID) -> dict[str, Any]:
    """The service restarted and resumes the job."""
    return await _set_job(conn, "restarts = restarts + 1", job_id)


async def restart_job(conn: asyncpg.Connection, job_id: uuid.UUID) -> dict[str, Any]:
    """An operator re-runs a failed job: a new run (new idempotency keys), errors cleared."""
    await conn.execute("DELETE FROM tasks WHERE job_id = $1 AND state <> 'succeeded'", job_id)
    return await _set_job(
        conn,
        "state = 'in_progress', run_no = run_no + 1, restarts = restarts + 1, error = NULL,"
        " cause = NULL, recommendation = NULL, ended_at = NULL",
        job_id,
    )


async def finish_job(
    conn: asyncpg.Connection,
    job_id: uuid.UUID,
    *,
    state: JobState,
    result: dict[str, Any],
    progress: int | None,
    error: str | None,
    cause: str | None,
    recommendation: str | None,
) -> dict[str, Any]:
    """The job's end: its final state and result; `progress` None leaves it as it is."""
    return await _set_job(
        conn,
        "state = $2, ended_at = now(), waiting_for = NULL, result = $3,"
        " progress = coalesce($4, progress), error = $5, cause = $6, recommendation = $7",
        job_id,
        state.value,
        result,
        progress,
        error,
        cause,
        recommendation,
    )


async def job_for_update(conn: asyncpg.Connection, job_id: uuid.UUID) -> dict[str, Any] | None:
    row = await conn.fetchrow("SELECT * FROM jobs WHERE job_id = $1 FOR UPDATE", job_id)
    return dict(row) if row else None


async def lock_vault_jobs(conn: asyncpg.Connection, vault_id: uuid.UUID) -> None:
    """Serialise, per vault, what creates jobs or depends on none running (until commit)."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"jobs:{vault_id}")


async def lock_vault_ips(conn: asyncpg.Connection, vault_id: uuid.UUID) -> None:
    """Serialise, per vault, the placement of recovery VMs' addresses (until commit)."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"ips:{vault_id}")


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


async def _set_task(
    conn: asyncpg.Connection,
    vault_id: uuid.UUID,
    job_id: uuid.UUID,
    step_key: str,
    sql_set: str,
    *args: Any,
) -> dict[str, Any]:
    """Run one of the fixed task updates below (`sql_set` is a literal of this module, never
    built from input), emit the task's new state."""
    row = await conn.fetchrow(
        f"UPDATE tasks SET {sql_set} WHERE job_id = $1 AND step_key = $2 RETURNING *",
        job_id,
        step_key,
        *args,
    )
    t = dict(row)
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
) -> dict[str, Any]:
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
    detail: dict[str, Any],
) -> dict[str, Any]:
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


async def approval(conn: Conn, job_id: uuid.UUID, action_key: str) -> dict[str, Any] | None:
    row = await conn.fetchrow(
        "SELECT * FROM approvals WHERE job_id = $1 AND action_key = $2", job_id, action_key
    )
    return dict(row) if row else None


# ------------------------------------------------------------------ test networks


async def insert_test_network(
    conn: Conn,
    vault_id: uuid.UUID,
    job_id: uuid.UUID,
    network_id: str,
    site: str,
    name: str,
) -> None:
    await conn.execute(
        "INSERT INTO test_networks (network_id, vault_id, job_id, site, name)"
        " VALUES ($1,$2,$3,$4,$5) ON CONFLICT DO NOTHING",
        network_id,
        vault_id,
        job_id,
        site,
        name,
    )


async def open_test_networks(conn: Conn, job_ids: list[uuid.UUID]) -> list[str]:
    """Networks created for the test failovers `job_ids` and not deleted yet."""
    rows = await conn.fetch(
        "SELECT network_id FROM test_networks WHERE job_id = ANY($1::uuid[])"
        " AND deleted_at IS NULL",
        job_ids,
    )
    return [str(r["network_id"]) for r in rows]


async def delete_test_network(conn: Conn, network_id: str) -> None:
    await conn.execute(
        "UPDATE test_networks SET deleted_at = now() WHERE network_id = $1", network_id
    )


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


async def insert_plan(
    conn: Conn,
    vault_id: uuid.UUID,
    name: str,
    description: str,
    groups: list[dict[str, Any]],
) -> dict[str, Any] | None:
    """The new plan; None if the vault has a plan of that name."""
    try:
        row = await conn.fetchrow(
            "INSERT INTO recovery_plans (plan_id, vault_id, name, description, groups)"
            " VALUES ($1,$2,$3,$4,$5) RETURNING *",
            uuid.uuid4(),
            vault_id,
            name,
            description,
            groups,
        )
    except asyncpg.UniqueViolationError:
        return None
    return dict(row)


async def replace_plan(
    conn: Conn,
    plan_id: uuid.UUID,
    name: str,
    description: str,
    groups: list[dict[str, Any]],
) -> dict[str, Any] | None:
    """The plan replaced; None if another plan of the vault has that name."""
    try:
        row = await conn.fetchrow(
            "UPDATE recovery_plans SET name = $2, description = $3, groups = $4,"
            " updated_at = now() WHERE plan_id = $1 RETURNING *",
            plan_id,
            name,
            description,
            groups,
        )
    except asyncpg.UniqueViolationError:
        return None
    return dict(row)


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
