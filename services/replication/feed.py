"""The recovery hosts' replica feeds: each verified `BlocksShipped` record of an item is
forwarded, as it came (the source agent's signed envelope, unchanged), to the replica feed of
the recovery host agent that keeps the item's replica (`topics.replica_feed`, keyed by item
id), in the transaction that stages it; the cycle's row notes the partition and the first and
last offsets forwarded, which the point's `ReplicaPointApplyRequested` names.

Why a feed per host rather than the agents reading the delta topic: Kafka's ACLs stop at the
topic, so a principal that may read the delta topic reads every vault's block data. An agent
may read only its own feed, which holds only what its replicas need.

At least once: a record forwarded by a transaction that then rolls back (or a process killed
before its commit) is forwarded again when it is handled again; the range then holds both
copies, which carry the same blocks (the recovery host stages by block, each checked against
its SHA-256, and the point's roots decide)."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

from shared import topics
from shared.kafka.admin import ensure_topics
from shared.kafka.producer import KafkaProducer
from shared.kafka.security import KafkaSecurity
from shared.settings import CommonSettings


@dataclass(frozen=True)
class Forwarded:
    """Where a run of records went on a feed: one partition (one key), offsets first..last."""

    partition: int
    first: int
    last: int


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

    async def forward(
        self, agent_id: uuid.UUID, item_id: uuid.UUID, values: list[bytes]
    ) -> Forwarded:
        """Produce `values` (in order) to `agent_id`'s feed keyed by `item_id`; returns where
        they went once Kafka acknowledged every one."""
        topic = topics.replica_feed(str(agent_id))
        await self._ensure(topic)
        key = str(item_id)
        futures = [await self.producer.send(topic, value, key=key) for value in values]
        metadata = await asyncio.gather(*futures)
        offsets = [m.offset for m in metadata]
        return Forwarded(metadata[0].partition, min(offsets), max(offsets))
