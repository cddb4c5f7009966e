"""Inbox: the events a consumer has applied, one `processed_events` row per (consumer, event id).

A consumer claims an event in the same transaction as the event's effect: the claim fails for
an event already applied, so a record delivered twice (at-least-once) takes effect once. The
table comes with each service's migrations (shared/migrations).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import asyncpg


async def claim(conn: asyncpg.Connection, consumer: str, event_id: uuid.UUID) -> bool:
    """Record that `consumer` applies `event_id`, inside the caller's transaction; False if
    it was applied before (the caller then skips the effect)."""
    fresh = await conn.fetchval(
        "INSERT INTO processed_events (consumer, event_id) VALUES ($1, $2)"
        " ON CONFLICT DO NOTHING RETURNING true",
        consumer,
        event_id,
    )
    return bool(fresh)


async def claim_all(
    conn: asyncpg.Connection, consumer: str, event_ids: Sequence[uuid.UUID]
) -> set[uuid.UUID]:
    """`claim` of several events in one statement; returns the ids not applied before."""
    return {
        row[0]
        for row in await conn.fetch(
            "INSERT INTO processed_events (consumer, event_id)"
            " SELECT $1, unnest($2::uuid[]) ON CONFLICT DO NOTHING"
            " RETURNING event_id",
            consumer,
            list(event_ids),
        )
    }


async def prune(pool: asyncpg.Pool, older_than_s: float) -> int:
    """Delete the rows of events applied more than `older_than_s` seconds ago (a record that
    old is past every redelivery); returns how many."""
    done = await pool.execute(
        "DELETE FROM processed_events WHERE processed_at < now() - make_interval(secs => $1)",
        older_than_s,
    )
    return int(done.split()[-1])
