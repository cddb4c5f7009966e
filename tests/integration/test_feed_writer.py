"""The replication service's forwarding to a recovery host's replica feed (real Kafka): batches
queued by a handler are acknowledged when the cycle completes and named as one partition's
offset range; a cycle of which this process did not forward every staged batch (a restart, or
a partition moved to another instance mid-cycle) is refused as incomplete, so the item resyncs
rather than the recovery host missing blocks."""

from __future__ import annotations

import base64
import hashlib
import uuid
from collections.abc import AsyncIterator

import pytest
from aiokafka import AIOKafkaProducer

from kit.stack import Stack, delete_prefixed_topics, random_prefix
from services.replication.feed import FeedIncomplete, FeedWriter
from services.replication.item import FeedRange
from shared import topics
from shared.kafka.admin import ensure_topics
from shared.kafka.ranges import RangeReader
from shared.kafka.security import KafkaSecurity
from shared.schemas.envelope import new_envelope
from shared.schemas.replication import Block, BlocksShipped, Compression
from shared.settings import CommonSettings
from tests.support.kafka import read_all

pytestmark = pytest.mark.integration


@pytest.fixture
async def writer(stack: Stack) -> AsyncIterator[FeedWriter]:
    prefix = random_prefix("feedw")
    settings = CommonSettings(kafka_bootstrap_servers=stack.kafka, topic_prefix=prefix)
    feed = FeedWriter(settings)
    await feed.start()
    yield feed
    await feed.stop()
    await delete_prefixed_topics(stack.kafka, prefix)


async def test_a_cycles_batches_are_named_by_their_range_once_all_were_forwarded(
    stack: Stack, writer: FeedWriter
) -> None:
    agent, item, other = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    await writer.send(agent, item, 7, [(("d0", 0), b"a"), (("d0", 1), b"b")])
    await writer.send(agent, other, 3, [(("d0", 0), b"x")])  # another item, same host
    await writer.send(agent, item, 7, [(("d1", 0), b"c"), (("d0", 1), b"b")])  # b: again

    with pytest.raises(FeedIncomplete, match="3 of the cycle's 4 batches"):
        await writer.collect(item, 7, 4)
    where = await writer.collect(item, 7, 3)
    assert where.partition is not None and where.first is not None and where.last is not None
    physical = topics.physical(topics.replica_feed(str(agent)), writer.settings.topic_prefix)
    records = await read_all(stack.kafka, physical)
    ours = [r for r in records if r.key == str(item)]
    assert {r.partition for r in ours} == {where.partition}
    assert (min(r.offset for r in ours), max(r.offset for r in ours)) == (where.first, where.last)
    assert sorted(r.value for r in ours) == [b"a", b"b", b"b", b"c"]
    assert not any(r.key == str(item) for r in records if r.value == b"x")

    # a cycle that shipped nothing names no range; one this process never saw is incomplete
    assert await writer.collect(item, 8, 0) == FeedRange(None, None, None)
    with pytest.raises(FeedIncomplete, match="0 of the cycle's 2 batches"):
        await writer.collect(other, 4, 2)

    # an attempt dropped (the cycle restarted) is forgotten: its batches no longer count
    writer.forget(item, up_to=7)
    with pytest.raises(FeedIncomplete):
        await writer.collect(item, 7, 3)
    assert (await writer.collect(other, 3, 1)).first is not None


def _batch(item: uuid.UUID, seq: int, batch_no: int, disk: str = "d0") -> bytes:
    data = bytes([batch_no + 1]) * 4096
    msg = BlocksShipped(
        item_id=item,
        cycle_seq=seq,
        batch_no=batch_no,
        disk_id=disk,
        compression=Compression.NONE,
        blocks=[
            Block(
                index=batch_no,
                sha256=hashlib.sha256(data).hexdigest(),
                data=base64.b64encode(data).decode(),
            )
        ],
    )
    return new_envelope(msg, vault_id=uuid.uuid4(), producer_id=str(uuid.uuid4())).to_bytes()


async def test_a_cycle_is_forwarded_again_from_the_delta_topic(
    stack: Stack, writer: FeedWriter
) -> None:
    """A process that took a cycle over mid-way forwards its batches again, read from the delta
    topic between the cycle's start and completion: only the item's batches of that cycle, as
    they came; a batch missing from the topic is refused as incomplete."""
    prefix = writer.settings.topic_prefix
    await ensure_topics(stack.kafka, prefix, [topics.REPLICATION_DELTAS], partitions=1)
    deltas = topics.physical(topics.REPLICATION_DELTAS, prefix)
    agent, item, other = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    ours = [_batch(item, 5, n) for n in range(3)]
    sent = [
        (item, _batch(item, 4, 0)),  # an earlier cycle of the item
        (item, ours[0]),
        (other, _batch(other, 5, 1)),  # another item's batch in between
        (item, b"not json"),  # not a record of the cycle
        (item, ours[1]),
        (item, ours[2]),
    ]
    producer = AIOKafkaProducer(
        bootstrap_servers=stack.kafka, acks="all", **KafkaSecurity.from_env().client_options()
    )
    await producer.start()
    try:
        offsets = [
            int((await producer.send_and_wait(deltas, v, key=str(k).encode())).offset)
            for k, v in sent
        ]
    finally:
        await producer.stop()
    reader = RangeReader(stack.kafka)
    try:
        await writer.send(agent, item, 5, [(("d0", 0), ours[0])])  # forwarded before a restart
        span = (0, offsets[0], offsets[-1])
        with pytest.raises(FeedIncomplete, match="3 of the cycle's 4 batches"):
            await writer.forward_again(reader, deltas, span, agent, item, 5, 4)
        where = await writer.forward_again(reader, deltas, span, agent, item, 5, 3)
    finally:
        await reader.close()
    assert where.first is not None and where.last is not None
    feed = topics.physical(topics.replica_feed(str(agent)), prefix)
    records = [r for r in await read_all(stack.kafka, feed) if r.key == str(item)]
    in_range = [r.value for r in records if where.first <= r.offset <= where.last]
    assert in_range == ours, "the cycle's batches, in order, as they came"
