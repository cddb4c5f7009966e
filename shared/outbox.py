"""Transactional outbox: an event about a service's own state is written to its `outbox` table
in the same transaction as the state change, and a relay publishes it to Kafka afterwards.

A crash between the commit and the publish loses nothing: the relay publishes on restart. A
crash between the publish and marking the row published re-publishes it; consumers de-duplicate
by event id, so the effect stays exactly-once.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

import asyncpg
from prometheus_client import Counter, Gauge

from shared.faults import crash_point
from shared.kafka.producer import KafkaProducer
from shared.schemas.envelope import Envelope, EventPayload, new_envelope
from shared.schemas.registry import payload_model

log = logging.getLogger(__name__)

OUTBOX_PUBLISHED = Counter("dr_outbox_published_total", "Events published from the outbox")
OUTBOX_PENDING = Gauge("dr_outbox_pending", "Outbox events not yet published")


async def enqueue(conn: asyncpg.Connection, envelope: Envelope, *, key: str) -> None:
    """Write `envelope` to the outbox, inside the caller's transaction."""
    et = payload_model(envelope.type, envelope.schema_version)
    if et is None:
        raise ValueError(f"unregistered event type {envelope.type} v{envelope.schema_version}")
    await conn.execute(
        "INSERT INTO outbox (topic, key, value, event_id, event_type) VALUES ($1,$2,$3,$4,$5)",
        et.topic,
        key,
        envelope.to_bytes(),
        envelope.event_id,
        envelope.type,
    )


async def emit(
    conn: asyncpg.Connection,
    payload: EventPayload,
    *,
    vault_id: uuid.UUID,
    key: str,
    producer_id: str,
) -> uuid.UUID:
    """Wrap `payload` in a new envelope from `producer_id` and write it to the outbox, inside
    the caller's transaction; returns the event id."""
    envelope = new_envelope(payload, vault_id=vault_id, producer_id=producer_id)
    await enqueue(conn, envelope, key=key)
    return envelope.event_id


class OutboxRelay:
    """Publishes unpublished outbox rows in id order, then marks them published."""

    def __init__(
        self, pool: asyncpg.Pool, producer: KafkaProducer, *, poll_ms: int, batch: int = 200
    ) -> None:
        self.pool = pool
        self.producer = producer
        self.poll_seconds = poll_ms / 1000
        self.batch = batch

    async def publish_pending(self) -> int:
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "SELECT id, topic, key, value FROM outbox WHERE published_at IS NULL"
                " ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
                self.batch,
            )
            if not rows:
                OUTBOX_PENDING.set(0)
                return 0
            crash_point("outbox.before_publish")
            futures = [await self.producer.send(r["topic"], r["value"], key=r["key"]) for r in rows]
            await asyncio.gather(*futures)
            crash_point("outbox.after_publish")
            await conn.execute(
                "UPDATE outbox SET published_at = now() WHERE id = ANY($1::bigint[])",
                [r["id"] for r in rows],
            )
        OUTBOX_PUBLISHED.inc(len(rows))
        return len(rows)

    async def prune(self, keep_hours: int = 24) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(
                "DELETE FROM outbox WHERE published_at < now() - make_interval(hours => $1)",
                keep_hours,
            )

    async def run(self) -> None:
        backoff = self.poll_seconds
        cycles = 0
        while True:
            try:
                published = await self.publish_pending()
                backoff = self.poll_seconds
                cycles += 1
                if cycles % 3000 == 0:
                    await self.prune()
                if published:
                    continue
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("outbox publish failed; retrying", exc_info=True)
                backoff = min(backoff * 2, 5.0)
            await asyncio.sleep(backoff)


async def prune_published(pool: asyncpg.Pool, older_than_s: float) -> None:
    """Delete the rows published more than `older_than_s` seconds ago."""
    await pool.execute(
        "DELETE FROM outbox WHERE published_at < now() - make_interval(secs => $1)", older_than_s
    )
