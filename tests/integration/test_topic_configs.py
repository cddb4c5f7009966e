"""`ensure_topics` gives a topic its `topics.CONFIGS` whether it creates the topic or finds it
(created earlier, or declared by another client without them), on the real broker; and the
delta stream's record batches of several block batches are taken by it."""

from __future__ import annotations

import uuid

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from kit.stack import Stack
from shared import topics
from shared.kafka.admin import admin_client, ensure_topics
from shared.kafka.producer import KafkaProducer
from tests.support.kafka import read_all

pytestmark = pytest.mark.integration

WANTED = topics.CONFIGS[topics.REPLICATION_DELTAS]["max.message.bytes"]


async def max_message_bytes(admin: AIOKafkaAdminClient, name: str) -> str:
    (response,) = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name)])
    (resource,) = response.resources
    entries = {entry[0]: entry[1] for entry in resource[4]}
    return str(entries["max.message.bytes"])


async def test_the_delta_topic_gets_its_configs_created_or_found(stack: Stack) -> None:
    fresh, found = f"cfg-{uuid.uuid4().hex[:8]}-", f"cfg-{uuid.uuid4().hex[:8]}-"
    admin = admin_client(stack.kafka)
    await admin.start()
    try:
        plain = topics.physical(topics.REPLICATION_DELTAS, found)
        await admin.create_topics([NewTopic(plain, num_partitions=1, replication_factor=1)])
        assert await max_message_bytes(admin, plain) != WANTED
        await ensure_topics(stack.kafka, fresh, [topics.REPLICATION_DELTAS], partitions=1)
        await ensure_topics(stack.kafka, found, [topics.REPLICATION_DELTAS], partitions=1)
        for prefix in (fresh, found):
            name = topics.physical(topics.REPLICATION_DELTAS, prefix)
            assert await max_message_bytes(admin, name) == WANTED
            dlq = topics.physical(topics.dlq_of(topics.REPLICATION_DELTAS), prefix)
            assert await max_message_bytes(admin, dlq) != WANTED  # the DLQ keeps the default

        # records of ~700 KB queued together go out as record batches beyond 1 MiB
        producer = KafkaProducer(
            stack.kafka,
            fresh,
            "cfg-test",
            linger_ms=0,
            max_batch_bytes=topics.DELTA_RECORD_BATCH_BYTES,
        )
        await producer.start()
        try:
            values = [bytes([n]) * 700_000 for n in range(6)]
            futures = [
                await producer.send(topics.REPLICATION_DELTAS, v, key="item") for v in values
            ]
            for future in futures:
                await future
        finally:
            await producer.stop()
        stored = await read_all(stack.kafka, topics.physical(topics.REPLICATION_DELTAS, fresh))
        assert [r.value for r in stored] == values
    finally:
        for prefix in (fresh, found):
            await admin.delete_topics(
                [
                    topics.physical(t, prefix)
                    for t in (topics.REPLICATION_DELTAS, topics.dlq_of(topics.REPLICATION_DELTAS))
                ]
            )
        await admin.close()
