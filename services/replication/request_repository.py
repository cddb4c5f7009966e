"""Queries on the failover service's requests: one row per request id, its state and the
answer recorded with it (answered exactly once, re-published on a repeated id)."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg

from services.replication.retention import OpenRequest

REQUEST_COLUMNS = """request_id, kind, vault_id, item_id, request, state, answer_type, answer,
 attempts, created_at, answered_at, point_seq"""


async def insert_request(
    conn: asyncpg.Connection,
    *,
    request_id: uuid.UUID,
    kind: str,
    vault_id: uuid.UUID,
    item_id: uuid.UUID,
    request: dict[str, Any],
    state: str = "pending",
    answer_type: str | None = None,
    answer: dict[str, Any] | None = None,
) -> bool:
    """Record a failover request; False if its id is already recorded."""
    return bool(
        await conn.fetchval(
            "INSERT INTO failover_requests (request_id, kind, vault_id, item_id, request, state,"
            " answer_type, answer, answered_at) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,"
            " CASE WHEN $6 = 'pending' THEN NULL ELSE now() END)"
            " ON CONFLICT DO NOTHING RETURNING true",
            request_id,
            kind,
            vault_id,
            item_id,
            request,
            state,
            answer_type,
            answer,
        )
    )


async def get_request(conn: asyncpg.Connection, request_id: uuid.UUID) -> dict[str, Any] | None:
    row = await conn.fetchrow(
        f"SELECT {REQUEST_COLUMNS} FROM failover_requests WHERE request_id = $1", request_id
    )
    return dict(row) if row else None


async def pending_requests(conn: asyncpg.Connection, limit: int) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        f"SELECT {REQUEST_COLUMNS} FROM failover_requests WHERE state = 'pending'"
        " ORDER BY created_at LIMIT $1",
        limit,
    )
    return [dict(r) for r in rows]


async def answer_request(
    conn: asyncpg.Connection,
    request_id: uuid.UUID,
    state: str,
    answer_type: str | None,
    answer: dict[str, Any] | None,
) -> bool:
    """Record the answer of a pending request; False if it was answered already."""
    return bool(
        await conn.fetchval(
            "UPDATE failover_requests SET state = $2, answer_type = $3, answer = $4,"
            " answered_at = now() WHERE request_id = $1 AND state IN ('pending', 'delegated')"
            " RETURNING true",
            request_id,
            state,
            answer_type,
            answer,
        )
    )


async def delegate_request(conn: asyncpg.Connection, request_id: uuid.UUID) -> bool:
    """A pending request handed to the recovery host (its answer comes as an agent event)."""
    return bool(
        await conn.fetchval(
            "UPDATE failover_requests SET state = 'delegated' WHERE request_id = $1"
            " AND state = 'pending' RETURNING true",
            request_id,
        )
    )


async def undelegate_request(conn: asyncpg.Connection, request_id: uuid.UUID, why: str) -> bool:
    """The recovery host could not do it: pending again, to be done here (`replica_refused`)."""
    return bool(
        await conn.fetchval(
            "UPDATE failover_requests SET state = 'pending',"
            " request = request || jsonb_build_object('replica_refused', $2::text)"
            " WHERE request_id = $1 AND state = 'delegated' RETURNING true",
            request_id,
            why,
        )
    )


async def bump_request_attempts(conn: asyncpg.Connection, request_id: uuid.UUID) -> int:
    return int(
        await conn.fetchval(
            "UPDATE failover_requests SET attempts = attempts + 1 WHERE request_id = $1"
            " RETURNING attempts",
            request_id,
        )
        or 0
    )


async def note_request_point(conn: asyncpg.Connection, request_id: uuid.UUID, seq: int) -> None:
    """The point the worker chose for an unanswered materialise request (retention keeps it)."""
    await conn.execute(
        "UPDATE failover_requests SET point_seq = $2 WHERE request_id = $1"
        " AND state IN ('pending', 'delegated')",
        request_id,
        seq,
    )


async def open_materialise_requests(
    conn: asyncpg.Connection, item_id: uuid.UUID
) -> list[OpenRequest]:
    """The item's materialise requests not answered yet, with the points they need."""
    rows = await conn.fetch(
        "SELECT created_at, point_seq, CASE WHEN request->>'choice' = 'chosen'"
        " THEN (request->>'cycle_seq')::integer END AS named_seq FROM failover_requests"
        " WHERE item_id = $1 AND kind = 'materialise' AND state IN ('pending', 'delegated')",
        item_id,
    )
    return [OpenRequest(r["created_at"], r["named_seq"], r["point_seq"]) for r in rows]
