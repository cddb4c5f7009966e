"""Offset ranges read through one `RangeReader` (real Kafka): consecutive reads, in any order
and of any topic, return exactly their records through one started consumer; an offset that
retention removed, or that is not there, is RangeUnavailable, and the reader goes on after it
with a new consumer."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import RecordsToDelete

from kit.stack import Stack, random_prefix
from shared import topics
from shared.kafka.admin import admin_client, ensure_topics
from shared.kafka.ranges import RangeReader, RangeUnavailable
from shared.kafka.security import KafkaSecurity

pytestmark = pytest.mark.integration


@pytest.fixture
async def topic(stack: Stack) -> AsyncIterator[str]:
    prefix = random_prefix("ranges")
    await ensure_topics(stack.kafka, prefix, [topics.REPLICATION_DELTAS], partitions=1)
    yield topics.physical(topics.REPLICATION_DELTAS, prefix)


async def produce(stack: Stack, topic: str, values: list[bytes]) -> list[int]:
    producer = AIOKafkaProducer(
        bootstrap_servers=stack.kafka, acks="all", **KafkaSecurity.from_env().client_options()
    )
    await producer.start()
    try:
        return [int((await producer.send_and_wait(topic, v)).offset) for v in values]
    finally:
        await producer.stop()


async def values(reader: RangeReader, topic: str, first: int, last: int) -> list[bytes]:
    got: list[bytes] = []
    async with contextlib.aclosing(reader.read(topic, 0, first, last, timeout=10)) as batches:
        async for records in batches:
            got.extend(r.value for r in records)
    return got


async def test_consecutive_reads_share_one_consumer(stack: Stack, topic: str) -> None:
    sent = [f"r{i}".encode() for i in range(12)]
    offsets = await produce(stack, topic, sent)
    reader = RangeReader(stack.kafka)
    try:
        assert await values(reader, topic, offsets[2], offsets[5]) == sent[2:6]
        assert await values(reader, topic, offsets[6], offsets[11]) == sent[6:]
        assert await values(reader, topic, offsets[0], offsets[1]) == sent[:2]  # back again
        assert await values(reader, topic, offsets[4], offsets[4]) == [sent[4]]
        assert reader.starts == 1
    finally:
        await reader.close()


async def test_a_pruned_or_absent_offset_is_unavailable(stack: Stack, topic: str) -> None:
    sent = [f"p{i}".encode() for i in range(6)]
    offsets = await produce(stack, topic, sent)
    admin = admin_client(stack.kafka)
    await admin.start()
    try:  # retention's doing, at once: the log starts at the fourth record
        await admin.delete_records({TopicPartition(topic, 0): RecordsToDelete(offsets[3])})
    finally:
        await admin.close()
    reader = RangeReader(stack.kafka)
    try:
        assert await values(reader, topic, offsets[3], offsets[5]) == sent[3:]
        with pytest.raises(RangeUnavailable, match=f"offset {offsets[1]} is gone"):
            await values(reader, topic, offsets[1], offsets[4])
        with pytest.raises(RangeUnavailable, match="past the end"):  # not written (yet)
            await values(reader, topic, offsets[5] + 10, offsets[5] + 12)
        assert await values(reader, topic, offsets[4], offsets[5]) == sent[4:]
        assert reader.starts == 3  # a new consumer after each failed read
    finally:
        await reader.close()
