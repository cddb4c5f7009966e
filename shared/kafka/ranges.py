"""Offset ranges of one partition read without a consumer group (e.g. a replica's feed).

`RangeReader` keeps one started consumer for any number of reads (assigned and sought per
read, one read at a time): a recovery host applying point after point pays the TLS handshake
and the metadata round trips once, not per point. `read_range` is a one-off read."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator

from aiokafka import AIOKafkaConsumer, TopicPartition

from shared.kafka.decode import RawRecord
from shared.kafka.security import KafkaSecurity

FETCH_BYTES = 2 * 1_048_576  # per partition and fetch: a large range is never all in memory
# The broker holds a fetch at the partition's end this long for new records (Kafka's
# fetch.max.wait.ms, 500 by default). A range is already written, so nothing is worth waiting
# for; and a fetch still held for the previous read's partition delays the next read's first
# fetch by as much.
FETCH_WAIT_MS = 10


class RangeUnavailable(Exception):
    """Records of an offset range are no longer (or not yet) readable."""


class RangeReader:
    """Reads offset ranges through one consumer without a group, started at the first read.
    Reads take turns (a lock); a read that fails or is left unfinished drops the consumer and
    the next read starts a new one. `close()` stops it (a later read would start another).
    `starts`: consumers started so far. `security`: default from the environment."""

    def __init__(self, bootstrap: str, *, security: KafkaSecurity | None = None) -> None:
        self.bootstrap = bootstrap
        self.security = security
        self._consumer: AIOKafkaConsumer | None = None
        self._lock = asyncio.Lock()
        self.starts = 0

    async def _started(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap,
                **(self.security or KafkaSecurity.from_env()).client_options(),
                group_id=None,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                max_partition_fetch_bytes=FETCH_BYTES,
                fetch_max_wait_ms=FETCH_WAIT_MS,
            )
            await consumer.start()
            self._consumer = consumer
            self.starts += 1
        return self._consumer

    async def _drop(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            with contextlib.suppress(Exception):
                await consumer.stop()

    async def read(
        self, topic: str, partition: int, first: int, last: int, *, timeout: float = 60.0
    ) -> AsyncGenerator[list[RawRecord], None]:
        """Records `first`..`last` (inclusive) of one partition of `topic` (physical name), as
        fetched. RangeUnavailable when the first is gone (retention) or the range is not all
        read within `timeout` seconds of no progress. Close the iterator if you stop early
        (`contextlib.aclosing`): the next read waits for it."""
        async with self._lock:
            done = False
            try:
                consumer = await self._started()
                batches = _records(consumer, topic, partition, first, last, timeout)
                async with contextlib.aclosing(batches):
                    async for records in batches:
                        yield records
                done = True
            finally:
                if not done:
                    await self._drop()

    async def close(self) -> None:
        async with self._lock:
            await self._drop()


async def _records(
    consumer: AIOKafkaConsumer, topic: str, partition: int, first: int, last: int, timeout: float
) -> AsyncGenerator[list[RawRecord], None]:
    tp = TopicPartition(topic, partition)
    consumer.assign([tp])
    consumer.resume(tp)
    consumer.seek(tp, first)
    expected = first
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            batch = await consumer.getmany(tp, timeout_ms=500)
            records: list[RawRecord] = []
            for record in batch.get(tp, []):
                if expected == first and record.offset != first:  # reset to the earliest
                    state = "is gone" if record.offset > first else "is past the end"
                    raise RangeUnavailable(
                        f"{topic}[{partition}] offset {first} {state} "
                        f"(first readable {record.offset})"
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
        consumer.pause(tp)  # between reads the consumer fetches nothing (no idle polling)


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
    """One read of a `RangeReader` of its own (see `RangeReader.read`), its consumer stopped
    after."""
    reader = RangeReader(bootstrap, security=security)
    try:
        async with contextlib.aclosing(
            reader.read(topic, partition, first, last, timeout=timeout)
        ) as batches:
            async for records in batches:
                yield records
    finally:
        await reader.close()
