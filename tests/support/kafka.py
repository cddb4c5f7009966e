"""Reading and writing topics directly, as an upstream system or an auditor would."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from shared.kafka.security import KafkaSecurity


@dataclass(frozen=True)
class Record:
    key: str | None
    value: bytes
    headers: dict[str, str]
    partition: int
    offset: int

    def json(self) -> Any:
        return json.loads(self.value)

    @property
    def event_id(self) -> str | None:
        """The envelope's event id; None for a record that is no JSON object (the DLQs hold
        malformed records that other tests sent)."""
        try:
            found = json.loads(self.value)
        except ValueError:
            return None
        return found.get("event_id") if isinstance(found, dict) else None


async def read_all(bootstrap: str, topic: str) -> list[Record]:
    """Every record currently in `topic` (all partitions, from the beginning)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        **KafkaSecurity.from_env().client_options(),
    )
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in partitions]
        if not tps:
            return []
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        out: list[Record] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            positions = [await consumer.position(tp) for tp in tps]
            if all(pos >= ends[tp] for pos, tp in zip(positions, tps, strict=True)):
                break
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                for r in records:
                    out.append(
                        Record(
                            key=r.key.decode() if r.key else None,
                            value=r.value or b"",
                            headers={k: v.decode(errors="replace") for k, v in r.headers},
                            partition=r.partition,
                            offset=r.offset,
                        )
                    )
        return out
    finally:
        await consumer.stop()


async def wait_for_records(
    bootstrap: str,
    topic: str,
    match: Callable[[Record], bool],
    *,
    count: int = 1,
    timeout: float = 30.0,
) -> list[Record]:
    """Poll `topic` until `count` records satisfy `match`; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    found: list[Record] = []
    while time.monotonic() < deadline:
        found = [r for r in await read_all(bootstrap, topic) if match(r)]
        if len(found) >= count:
            return found
        await asyncio.sleep(0.3)
    raise AssertionError(
        f"expected {count} matching record(s) on {topic} within {timeout}s, found {len(found)}"
    )


async def produce(bootstrap: str, topic: str, value: bytes, key: str | None = None) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", **KafkaSecurity.from_env().client_options()
    )
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=key.encode() if key else None)
    finally:
        await producer.stop()
