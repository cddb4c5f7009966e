"""The recovery hosts' replica feeds: each verified `BlocksShipped` record of an item is
forwarded, as it came (the source agent's signed envelope, unchanged), to the replica feed of
the recovery host agent that keeps the item's replica (`topics.replica_feed`, keyed by item
id). The point's `ReplicaPointApplyRequested` then names the partition and the first and last
offsets its batches went to.

Why a feed per host rather than the agents reading the delta topic: Kafka's ACLs stop at the
topic, so a principal that may read the delta topic reads every vault's block data. An agent
may read only its own feed, which holds only what its replicas need.

Off the critical path: a batch's handler only queues its record on the producer (after the
record was verified); the acknowledgements are awaited when the cycle completes, by which time
they have long arrived, so the pipeline does not wait for a second produce round trip per
batch. What was queued is known to this process only: a cycle whose batches were not all
forwarded by it (a restart or a partition moved to another instance mid-cycle, or Kafka
refused a record) is found out at its completion by counting them against the batches staged
in PostgreSQL, and the item resyncs (only differing blocks travel, and they are forwarded
again). A record queued twice (a transaction rolled back and the record handled again) is on
the feed twice; both copies carry the same blocks."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import dataclass, field
from typing import Any

from services.replication.item import FeedRange
from shared import topics
from shared.kafka.admin import ensure_topics
from shared.kafka.decode import Rejected, decode_event
from shared.kafka.producer import KafkaProducer
from shared.kafka.ranges import RangeReader
from shared.kafka.security import KafkaSecurity
from shared.schemas.replication import BlocksShipped
from shared.settings import CommonSettings


class FeedIncomplete(Exception):
    """Not every batch of the cycle reached the recovery host's feed from this process."""


@dataclass
class _Cycle:
    # (disk id, batch number) -> the acknowledgements of the record's copies
    batches: dict[tuple[str, int], list[asyncio.Future[Any]]] = field(default_factory=dict)


class FeedWriter:
    """Forwards verified delta records to the recovery hosts' feeds (creating each feed
    topic the first time this process writes to it)."""

    def __init__(self, settings: CommonSettings, security: KafkaSecurity | None = None) -> None:
        self.settings = settings
        self.security = security or KafkaSecurity.from_settings(settings)
        # records of up to ~1 MiB each, as the agents produce them: no linger, large batches
        self.producer = KafkaProducer(
            settings.kafka_bootstrap_servers,
            settings.topic_prefix,
            "replication-feed",
            linger_ms=0,
            max_batch_bytes=topics.DELTA_RECORD_BATCH_BYTES,
            security=self.security,
        )
        self._ready: set[str] = set()
        self._lock = asyncio.Lock()
        self._cycles: dict[tuple[uuid.UUID, int], _Cycle] = {}

    async def start(self) -> None:
        await self.producer.start()

    async def stop(self) -> None:
        await self.producer.stop()

    async def _ensure(self, topic: str) -> None:
        if topic in self._ready:
            return
        async with self._lock:
            if topic not in self._ready:
                await ensure_topics(
                    self.settings.kafka_bootstrap_servers,
                    self.settings.topic_prefix,
                    [topic],
                    partitions=self.settings.topic_partitions,
                    security=self.security,
                    dlq=False,
                )
                self._ready.add(topic)

    async def send(
        self,
        agent_id: uuid.UUID,
        item_id: uuid.UUID,
        seq: int,
        records: list[tuple[tuple[str, int], bytes]],
    ) -> None:
        """Queue `records` ((disk id, batch number), value), in order, on `agent_id`'s feed,
        keyed by `item_id`, as batches of cycle `seq`; `collect` awaits them."""
        topic = topics.replica_feed(str(agent_id))
        await self._ensure(topic)
        cycle = self._cycles.setdefault((item_id, seq), _Cycle())
        for batch, value in records:
            future = await self.producer.send(topic, value, key=str(item_id))
            cycle.batches.setdefault(batch, []).append(future)

    async def settle(self, item_id: uuid.UUID, seq: int) -> None:
        """Wait until what was queued for cycle `seq` is acknowledged or refused (`collect`
        says which), so the producer holds no more than what was queued since."""
        cycle = self._cycles.get((item_id, seq))
        if cycle is not None:
            futures = [f for copies in cycle.batches.values() for f in copies]
            await asyncio.gather(*futures, return_exceptions=True)

    async def collect(self, item_id: uuid.UUID, seq: int, staged_batches: int) -> FeedRange:
        """Where cycle `seq`'s batches went, once every one is acknowledged. FeedIncomplete
        when this process did not forward each of the `staged_batches` batches, or Kafka
        refused one."""
        cycle = self._cycles.get((item_id, seq), _Cycle())
        if len(cycle.batches) != staged_batches:
            raise FeedIncomplete(
                f"{len(cycle.batches)} of the cycle's {staged_batches} batches were forwarded"
                " to the recovery host by this process"
            )
        if not staged_batches:
            return FeedRange(None, None, None)
        futures = [f for copies in cycle.batches.values() for f in copies]
        results = await asyncio.gather(*futures, return_exceptions=True)
        acks = [r for r in results if not isinstance(r, BaseException)]
        if len(acks) != len(results):
            failure = next(r for r in results if isinstance(r, BaseException))
            raise FeedIncomplete(f"Kafka refused a forwarded batch: {failure!r}")
        offsets = [int(a.offset) for a in acks]
        return FeedRange(int(acks[0].partition), min(offsets), max(offsets))

    def forget(self, item_id: uuid.UUID, up_to: int | None = None) -> None:
        """Drop what was queued for the item's cycles up to `up_to` (all: None)."""
        for key in [k for k in self._cycles if k[0] == item_id]:
            if up_to is None or key[1] <= up_to:
                del self._cycles[key]

    async def forward_again(
        self,
        reader: RangeReader,
        delta_topic: str,
        span: tuple[int, int, int],
        agent_id: uuid.UUID,
        item_id: uuid.UUID,
        seq: int,
        staged_batches: int,
    ) -> FeedRange:
        """Cycle `seq`'s batches forwarded again, read back from the delta topic (`delta_topic`,
        physical name; `span`: partition, first and last offset, between the cycle's start and
        its completion): for a cycle whose batches this process did not all forward itself (it
        restarted, or took the partition over, mid-cycle). The records go as they came, the
        source agent's signed envelopes, which the recovery host checks as it checks the
        forwarded ones. Where they went, as `collect` says; FeedIncomplete if a batch is not
        there, RangeUnavailable if the range is no longer readable."""
        self.forget(item_id, up_to=seq)
        key = str(item_id).encode()
        partition, first, last = span
        if last >= first:
            async with contextlib.aclosing(
                reader.read(delta_topic, partition, first, last)
            ) as fetched:
                async for records in fetched:
                    out = []
                    for record in records:
                        if record.key != key or record.value is None:
                            continue
                        try:
                            _, payload = decode_event(record.value)
                        except Rejected:
                            continue
                        if (
                            isinstance(payload, BlocksShipped)
                            and payload.item_id == item_id
                            and payload.cycle_seq == seq
                        ):
                            out.append(((payload.disk_id, payload.batch_no), record.value))
                    if out:
                        await self.send(agent_id, item_id, seq, out)
                        await self.settle(item_id, seq)  # memory: one fetch at a time
        return await self.collect(item_id, seq, staged_batches)
