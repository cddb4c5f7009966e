"""De-duplication rows and published outbox rows are pruned after the retention period, over
the real PostgreSQL; younger rows and unpublished outbox rows stay."""

from __future__ import annotations

import uuid

import pytest

from kit.stack import migrated_pool
from services.policy.__main__ import MIGRATIONS
from shared.runtime import prune_processed
from shared.settings import ServiceSettings

pytestmark = pytest.mark.integration


async def test_old_processed_events_and_published_outbox_rows_are_pruned(
    database_url: str,
) -> None:
    async with migrated_pool(database_url, "prune", MIGRATIONS) as pool:
        old, young = uuid.uuid4(), uuid.uuid4()
        await pool.execute(
            "INSERT INTO processed_events (consumer, event_id, processed_at) VALUES"
            " ('c', $1, now() - interval '8 days'), ('c', $2, now() - interval '1 hour')",
            old,
            young,
        )
        await pool.execute(
            "INSERT INTO outbox (topic, key, value, event_id, event_type, published_at)"
            " VALUES ('t', 'k', '\\x00', $1, 'X', now() - interval '8 days'),"
            " ('t', 'k', '{}', $2, 'X', now() - interval '1 hour'),"
            " ('t', 'k', '{}', $3, 'X', NULL)",
            uuid.uuid4(),
            uuid.uuid4(),
            uuid.uuid4(),
        )
        settings = ServiceSettings(DR_PROCESSED_EVENTS_RETENTION_HOURS=168)
        assert await prune_processed(pool, settings) == 1
        left = await pool.fetch("SELECT event_id FROM processed_events")
        assert [r["event_id"] for r in left] == [young]
        kept = await pool.fetch("SELECT published_at IS NULL AS pending FROM outbox ORDER BY id")
        assert [r["pending"] for r in kept] == [False, True]
        assert await prune_processed(pool, settings) == 0  # idempotent
