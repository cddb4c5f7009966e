"""Runs of records in one transaction (`EventConsumer` with `run_handlers`), against the real
PostgreSQL and Kafka: a run has exactly the effects of its records handled one by one, each
exactly once, and a run with anything wrong in it is handled one by one (the bad record to the
DLQ with its reason, the others applied)."""

from __future__ import annotations

import base64
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kit.stack import Stack, migrated_pool
from shared import signing, topics
from shared.kafka.consumers import RUN_MEMO, EventConsumer
from shared.kafka.decode import Incoming, Rejected
from shared.kafka.producer import KafkaProducer
from shared.merkle import block_hash
from shared.readmodels import known_producer, signature_verifier
from shared.schemas import replication as ev
from shared.schemas.envelope import new_envelope
from tests.support.kafka import wait_for_records

pytestmark = pytest.mark.integration

MIGRATION = """
CREATE TABLE applied (
    event_id uuid NOT NULL,
    batch_no integer NOT NULL,
    via      text NOT NULL,
    producer_lookups integer NOT NULL
);
"""


@dataclass
class FakeRecord:
    """What the pipeline reads of a Kafka record (faust's and aiokafka's have these)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@pytest.fixture(scope="module")
async def pool(
    database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[asyncpg.Pool]:
    folder: Path = tmp_path_factory.mktemp("runs-migrations")
    (folder / "001_applied.sql").write_text(MIGRATION)
    async with migrated_pool(database_url, "runs", folder) as p:
        yield p


@pytest.fixture
async def producer(stack: Stack, topic_prefix: str) -> AsyncIterator[KafkaProducer]:
    p = KafkaProducer(stack.kafka, topic_prefix, "runs-test")
    await p.start()
    yield p
    await p.stop()


class Agent:
    def __init__(self, vault: uuid.UUID) -> None:
        self.vault = vault
        self.producer_id = uuid.uuid4()
        self.key = signing.new_private_key()
        self.item = uuid.uuid4()

    def batch(
        self, batch_no: int, *, key: Ed25519PrivateKey | None = None
    ) -> tuple[uuid.UUID, bytes]:
        data = os.urandom(1024)
        payload = ev.BlocksShipped(
            item_id=self.item,
            cycle_seq=1,
            batch_no=batch_no,
            disk_id="d0",
            blocks=[
                ev.Block(
                    index=batch_no,
                    sha256=block_hash(data).hex(),
                    data=base64.b64encode(data).decode(),
                )
            ],
        )
        env = new_envelope(
            payload,
            vault_id=self.vault,
            producer_id=str(self.producer_id),
            signing_key=key if key is not None else self.key,
        )
        return env.event_id, env.to_bytes()


async def setup(
    pool: asyncpg.Pool, producer: KafkaProducer, stack: Stack, topic_prefix: str
) -> tuple[EventConsumer, Agent]:
    agent = Agent(uuid.uuid4())
    async with pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO known_producers (producer_id, vault_id, kind, name, site, generation,"
            " public_key) VALUES ($1, $2, 'agent', 'hv', 'primary', 1, $3)",
            agent.producer_id,
            agent.vault,
            signing.public_key_hex(agent.key),
        )
    lookups = 0

    async def counting_lookup(conn: asyncpg.Connection, producer_id: str) -> dict | None:  # type: ignore[type-arg]
        nonlocal lookups
        memo = RUN_MEMO.get()
        if memo is None or ("producer", producer_id) not in memo:
            lookups += 1
        return await known_producer(conn, producer_id)

    async def apply(conn: asyncpg.Connection, inc: Incoming, via: str) -> None:
        msg = inc.payload
        assert isinstance(msg, ev.BlocksShipped)
        if msg.batch_no == 13:
            raise Rejected("unlucky_batch", "batch 13 is refused")
        await conn.execute(
            "INSERT INTO applied VALUES ($1, $2, $3, $4)",
            inc.envelope.event_id,
            msg.batch_no,
            via,
            lookups,
        )

    async def one(conn: asyncpg.Connection, inc: Incoming) -> None:
        await apply(conn, inc, "one")

    async def run(conn: asyncpg.Connection, incs: list[Incoming]) -> None:
        for inc in incs:
            await apply(conn, inc, "run")

    consumer = EventConsumer(
        bootstrap=stack.kafka,
        prefix=topic_prefix,
        group=f"runs-{uuid.uuid4().hex[:8]}",
        topic_names=[topics.REPLICATION_DELTAS],
        pool=pool,
        producer=producer,
        handlers={"BlocksShipped": one},
        run_handlers={"BlocksShipped": run},
        verifier=signature_verifier(counting_lookup),
        max_age=None,
    )
    return consumer, agent


def records(agent: Agent, values: list[bytes], first_offset: int = 0) -> list[FakeRecord]:
    return [
        FakeRecord(topics.REPLICATION_DELTAS, 0, first_offset + n, str(agent.item).encode(), v)
        for n, v in enumerate(values)
    ]


async def applied(pool: asyncpg.Pool, ids: list[uuid.UUID]) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT event_id, batch_no, via, producer_lookups FROM applied"
        " WHERE event_id = ANY($1::uuid[]) ORDER BY batch_no",
        ids,
    )


async def test_a_run_is_one_transaction_with_each_record_applied_once(
    pool: asyncpg.Pool, producer: KafkaProducer, stack: Stack, topic_prefix: str
) -> None:
    consumer, agent = await setup(pool, producer, stack, topic_prefix)
    batches = [agent.batch(n) for n in range(5)]
    ids = [i for i, _ in batches]
    values = [v for _, v in batches]
    # batch 2 twice in the run (a re-sent record), and batch 0 again later (redelivery)
    await consumer.process_many(records(agent, [*values[:3], values[2], *values[3:]]))
    rows = await applied(pool, ids)
    assert [(r["batch_no"], r["via"]) for r in rows] == [(n, "run") for n in range(5)]
    # the producer was looked up once for the whole run, in its transaction
    assert {r["producer_lookups"] for r in rows} == {1}
    await consumer.process_many(records(agent, [values[0], values[4]], first_offset=10))
    assert len(await applied(pool, ids)) == 5
    assert consumer.applied == 5


async def test_a_run_with_a_bad_record_is_handled_one_by_one(
    pool: asyncpg.Pool, producer: KafkaProducer, stack: Stack, topic_prefix: str
) -> None:
    consumer, agent = await setup(pool, producer, stack, topic_prefix)
    good = [agent.batch(n) for n in (0, 1)]
    refused = agent.batch(13)
    forged = agent.batch(5, key=signing.new_private_key())
    after = [agent.batch(n) for n in (6, 7)]
    run = [*good, refused, forged, *after]
    await consumer.process_many(records(agent, [v for _, v in run]))
    rows = await applied(pool, [i for i, _ in run])
    # the good ones applied once each, one by one (the run as a whole was not kept)
    assert [(r["batch_no"], r["via"]) for r in rows] == [
        (0, "one"),
        (1, "one"),
        (6, "one"),
        (7, "one"),
    ]
    dlq = topic_prefix + topics.dlq_of(topics.REPLICATION_DELTAS)
    for (event_id, _), reason in ((refused, "unlucky_batch"), (forged, "bad_signature")):
        found = await wait_for_records(stack.kafka, dlq, lambda r, e=event_id: r.event_id == str(e))
        assert found[0].headers["dlq.reason"] == reason
    # the de-duplication rows are those of the one-by-one handling: the applied records only
    done = await pool.fetch(
        "SELECT event_id FROM processed_events WHERE event_id = ANY($1::uuid[])",
        [i for i, _ in run],
    )
    assert {r["event_id"] for r in done} == {i for i, _ in good + after}
    assert RUN_MEMO.get() is None  # the memo lives only within a run
