"""The record pipeline's order: one by one by default; with `order_key` and `parallel`, in
order per key and up to `parallel` keys at a time (the agent's replica lane)."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

from services.host_agent.runtime import replica_item_key
from shared.kafka.consumers import PlainEventConsumer
from shared.kafka.decode import Incoming, decode_event
from shared.kafka.producer import KafkaProducer
from shared.kafka.security import KafkaSecurity
from shared.schemas.agent import ReplicaDeleteRequested
from shared.schemas.envelope import EventPayload, new_envelope

VAULT = uuid.uuid4()
AGENT = uuid.uuid4()


@dataclass
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


def records(items: list[uuid.UUID], per_item: int) -> list[Record]:
    """`per_item` commands of each item, interleaved (a, b, c, a, b, c, ...)."""
    out = []
    for _ in range(per_item):
        for item in items:
            payload = ReplicaDeleteRequested(command_id=uuid.uuid4(), agent_id=AGENT, item_id=item)
            env = new_envelope(payload, vault_id=VAULT, producer_id="service:replication")
            out.append(
                Record("agent.commands.v1", 0, len(out), str(AGENT).encode(), env.to_bytes())
            )
    out.insert(2, Record("agent.commands.v1", 0, 99, None, b"not json"))  # skipped, no DLQ
    return out


class Recorder:
    def __init__(self) -> None:
        self.seen: list[tuple[uuid.UUID, uuid.UUID]] = []  # (item, command) in handling order
        self.running = 0
        self.most = 0

    async def handle(self, incoming: Incoming) -> None:
        command = incoming.payload
        assert isinstance(command, ReplicaDeleteRequested)
        self.running += 1
        self.most = max(self.most, self.running)
        await asyncio.sleep(0.005)  # a disk flush's wait: lets the other keys run
        self.running -= 1
        self.seen.append((command.item_id, command.command_id))


def consumer(recorder: Recorder, **order: object) -> PlainEventConsumer:
    return PlainEventConsumer(
        bootstrap="127.0.0.1:1",
        prefix="",
        group="g",
        topic_names=["agent.commands.v1"],
        producer=KafkaProducer("127.0.0.1:1", "", "test", security=KafkaSecurity()),
        security=KafkaSecurity(),  # never connects: the batch is handed in
        handlers={"ReplicaDeleteRequested": recorder.handle},
        dead_letters=False,
        **order,  # type: ignore[arg-type]
    )


def sent_order(batch: list[Record]) -> list[tuple[uuid.UUID, uuid.UUID]]:
    out = []
    for r in batch:
        if r.value and r.value.startswith(b"{"):
            _, payload = decode_event(r.value)
            assert isinstance(payload, ReplicaDeleteRequested)
            out.append((payload.item_id, payload.command_id))
    return out


async def run(rec: Recorder, batch: list[Record], **order: object) -> None:
    c = consumer(rec, **order)
    try:
        await c.process_many(batch)
    finally:
        await c.producer.stop()  # never started: closes the client object


async def test_by_default_records_are_handled_one_by_one_in_order() -> None:
    batch = records([uuid.uuid4() for _ in range(3)], 4)
    rec = Recorder()
    await run(rec, batch)
    assert rec.seen == sent_order(batch)
    assert rec.most == 1


async def test_with_an_order_key_each_key_keeps_its_order_and_keys_run_side_by_side() -> None:
    items = [uuid.uuid4() for _ in range(5)]
    batch = records(items, 4)
    rec = Recorder()
    await run(rec, batch, order_key=replica_item_key, parallel=3)
    expected = sent_order(batch)
    assert sorted(rec.seen) == sorted(expected)  # each exactly once
    for item in items:
        assert [c for i, c in rec.seen if i == item] == [c for i, c in expected if i == item]
    assert rec.most == 3  # bounded by `parallel`, and reached


def test_the_replica_lane_orders_by_item() -> None:
    item = uuid.uuid4()
    command: EventPayload = ReplicaDeleteRequested(
        command_id=uuid.uuid4(), agent_id=AGENT, item_id=item
    )
    assert replica_item_key(command) == str(item)
