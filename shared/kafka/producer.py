"""`KafkaProducer`: aiokafka's producer (acks=all, idempotent) on logical topic names."""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from shared import topics
from shared.kafka.security import KafkaSecurity
from shared.schemas.envelope import Envelope


class KafkaProducer:
    def __init__(
        self,
        bootstrap: str,
        prefix: str,
        client_id: str,
        *,
        linger_ms: int = 5,
        max_batch_bytes: int = 16_384,
        security: KafkaSecurity | None = None,
    ) -> None:
        """`linger_ms`: how long a record waits for others to share its batch. aiokafka keeps
        one open batch per partition and a record that does not fit waits for it to go, so
        a producer of ~700 KB records (an agent's block batches) gains nothing from lingering
        and pays it on every record: edges use 0. `max_batch_bytes`: the most one record batch
        holds; aiokafka has one produce request in flight per broker, so records queued
        meanwhile go together in the next (an agent uses `topics.DELTA_RECORD_BATCH_BYTES`;
        the topic's `max.message.bytes` must allow it). `security`: default from the
        environment (`KafkaSecurity.from_env`)."""
        self.prefix = prefix
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            client_id=client_id,
            acks="all",
            enable_idempotence=True,
            linger_ms=linger_ms,
            max_batch_size=max_batch_bytes,
            max_request_size=max(1_048_576, 2 * max_batch_bytes),
            request_timeout_ms=30_000,
            **(security or KafkaSecurity.from_env()).client_options(),
        )
        self.started = False

    async def start(self) -> None:
        await self._producer.start()
        self.started = True

    async def stop(self) -> None:
        self.started = False
        await self._producer.stop()

    async def partition_count(self, topic: str) -> int:
        """Partitions of the logical `topic` (from the broker's metadata)."""
        return len(await self._producer.partitions_for(topics.physical(topic, self.prefix)))

    async def unreachable(self, timeout: float = 2.0) -> str | None:
        """None when a broker answers a metadata request within `timeout` seconds, else why
        not (a started producer says nothing of a broker that stopped answering since)."""
        try:
            await asyncio.wait_for(self._producer.client.fetch_all_metadata(), timeout)
        except TimeoutError:
            return f"no broker answered a metadata request within {timeout:g}s"
        except (KafkaError, OSError) as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    async def send(
        self,
        topic: str,
        value: bytes,
        *,
        key: str | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> asyncio.Future[Any]:
        """Queue a record on the logical `topic`; await the returned future for the ack."""
        future: asyncio.Future[Any] = await self._producer.send(
            topics.physical(topic, self.prefix),
            value,
            key=key.encode() if key is not None else None,
            headers=headers,
        )
        return future

    async def send_and_wait(
        self,
        topic: str,
        value: bytes,
        *,
        key: str | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        await (await self.send(topic, value, key=key, headers=headers))

    async def publish(self, envelope: Envelope, *, key: str, topic: str) -> None:
        await self.send_and_wait(topic, envelope.to_bytes(), key=key)
