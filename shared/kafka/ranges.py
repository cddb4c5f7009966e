"""An offset range of one partition read without a consumer group (e.g. a replica's feed)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from aiokafka import AIOKafkaConsumer, TopicPartition

from shared.kafka.decode import RawRecord
from shared.kafka.security import KafkaSecurity


class RangeUnavailable(Exception):
    """Records of an offset range are no longer (or not yet) readable."""


async def read_range(
    bootstrap: str,
    topic: str,
    partition: int,
    first: int,
    last: int,
    *,
    timeout: float = 60.0,
    security: KafkaSecurity | None = None,
) -> AsyncIterator[list[RawRecord]]:
    """Records `first`..`last` (inclusive) of one partition of `topic` (physical name), as
    fetched (a few MiB at a time, so a large range is never all in memory), read without a
    consumer group. RangeUnavailable when the first is gone (retention) or the range is not
    all read within `timeout` seconds of no progress. `security`: default from the
    environment."""
    tp = TopicPartition(topic, partition)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        **(security or KafkaSecurity.from_env()).client_options(),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=2 * 1_048_576,
    )
    await consumer.start()
    try:
        consumer.assign([tp])
        consumer.seek(tp, first)
        expected = first
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            batch = await consumer.getmany(tp, timeout_ms=500)
            records: list[RawRecord] = []
            for record in batch.get(tp, []):
                if expected == first and record.offset != first:
                    raise RangeUnavailable(
                        f"{topic}[{partition}] offset {first} is gone (first readable "
                        f"{record.offset})"
                    )
                if record.offset > last:
                    break
                records.append(record)
                expected = record.offset + 1
            if records:
                yield records
                deadline = time.monotonic() + timeout
            if expected > last:
                return
        raise RangeUnavailable(f"{topic}[{partition}] {first}..{last} not read in {timeout:.0f} s")
    finally:
        await consumer.stop()
