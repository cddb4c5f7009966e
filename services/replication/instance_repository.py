"""Queries of the one-active-instance rule (`services/replication/instance.py`): the
deployment's session-level advisory lock, taken on a connection of its own that the active
instance holds for its lifetime (PostgreSQL releases it when that connection ends, a process
killed included), and the deployment's record (table `active_instance`)."""

from __future__ import annotations

import hashlib
import uuid

import asyncpg

from services.replication.instance import ActiveInstance


def lock_key(schema: str, prefix: str) -> int:
    """The advisory lock of a deployment (a schema and a topic prefix): 64 bits of a hash."""
    digest = hashlib.sha256(f"replication-active:{schema}:{prefix}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


async def try_lock(conn: asyncpg.Connection, key: int) -> bool:
    """Take the lock on `conn`'s session if it is free (True), without waiting. Held until
    `unlock` or the end of the session."""
    return bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", key))


async def unlock(conn: asyncpg.Connection, key: int) -> None:
    await conn.execute("SELECT pg_advisory_unlock($1)", key)


async def record(conn: asyncpg.Connection, deployment: str) -> ActiveInstance | None:
    row = await conn.fetchrow(
        "SELECT store_id, host, pid, store_dir, started_at, heartbeat_at, heartbeat_seconds,"
        " extract(epoch FROM now() - heartbeat_at)::float8 AS heartbeat_age,"
        " released_at IS NOT NULL AS released"
        " FROM active_instance WHERE deployment = $1",
        deployment,
    )
    return ActiveInstance(**dict(row)) if row is not None else None


async def protects(conn: asyncpg.Connection) -> bool:
    """Whether the deployment has a protected item or a recovery point (in its store)."""
    return bool(
        await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM protected_items WHERE active)"
            " OR EXISTS (SELECT 1 FROM recovery_points)"
        )
    )


async def become_active(
    conn: asyncpg.Connection,
    deployment: str,
    *,
    store_id: uuid.UUID,
    host: str,
    pid: int,
    store_dir: str,
    heartbeat_seconds: float,
) -> ActiveInstance:
    """Record this instance as the active one (and its store as the deployment's). Only the
    lock's holder calls it."""
    row = await conn.fetchrow(
        "INSERT INTO active_instance (deployment, store_id, host, pid, store_dir, started_at,"
        " heartbeat_at, heartbeat_seconds) VALUES ($1, $2, $3, $4, $5, now(), now(), $6)"
        " ON CONFLICT (deployment) DO UPDATE SET store_id = excluded.store_id,"
        " host = excluded.host, pid = excluded.pid, store_dir = excluded.store_dir,"
        " started_at = excluded.started_at, heartbeat_at = excluded.heartbeat_at,"
        " heartbeat_seconds = excluded.heartbeat_seconds, released_at = NULL"
        " RETURNING store_id, host, pid, store_dir, started_at, heartbeat_at, heartbeat_seconds,"
        " 0::float8 AS heartbeat_age, false AS released",
        deployment,
        store_id,
        host,
        pid,
        store_dir,
        heartbeat_seconds,
    )
    return ActiveInstance(**dict(row))


async def heartbeat(conn: asyncpg.Connection, deployment: str, pid: int, host: str) -> None:
    await conn.execute(
        "UPDATE active_instance SET heartbeat_at = now()"
        " WHERE deployment = $1 AND pid = $2 AND host = $3",
        deployment,
        pid,
        host,
    )


async def released(conn: asyncpg.Connection, deployment: str, pid: int, host: str) -> None:
    """The active instance stops gracefully: the next one need not wait for its heartbeat."""
    await conn.execute(
        "UPDATE active_instance SET released_at = now()"
        " WHERE deployment = $1 AND pid = $2 AND host = $3",
        deployment,
        pid,
        host,
    )
