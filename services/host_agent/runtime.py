"""The host agent's process: the edge runtime (identity, producer, heartbeats) plus the data
plane: host block I/O, workloads, the replicator and the command consumer. Nothing starts
before `start()`; `stop()` closes the journals cleanly (no resync after a clean restart)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from aiokafka.errors import KafkaError

from services.host_agent.commands import CommandHandler
from services.host_agent.config import AgentSettings
from services.host_agent.cycles import KafkaSink, signer_for
from services.host_agent.replica import SiteReplica
from services.host_agent.replica_feed import ReplicaFeed
from services.host_agent.replicator import Replicator
from services.host_agent.tracking import HostIO, agent_lock
from services.host_agent.wiring import Wiring
from services.host_agent.workload import Workloads
from shared import topics
from shared.edge import EdgeRuntime
from shared.kafka.admin import ensure_topics
from shared.kafka.consumers import PlainEventConsumer
from shared.kafka.producer import KafkaProducer
from shared.schemas.envelope import EventPayload
from shared.schemas.registration import ProducerKind

log = logging.getLogger(__name__)


def replica_item_key(command: EventPayload) -> str:
    """The replica lane's order: per item (a command without one, e.g. another agent's type,
    goes in its own order)."""
    return str(getattr(command, "item_id", ""))


AGENT_TOPICS = (topics.AGENT_COMMANDS, topics.AGENT_EVENTS, topics.REPLICATION_DELTAS)


class AgentRuntime(EdgeRuntime):
    def __init__(self, settings: AgentSettings) -> None:
        super().__init__(
            "host-agent",
            settings,
            ProducerKind.AGENT,
            metadata=lambda: {
                "host_os_version": settings.host_os_version,
                "storage_dir": str(settings.storage_dir),
            },
            status=self._status,
        )
        self.agent_settings = settings
        self.host = HostIO()
        self.workloads = Workloads(self.host, settings.storage_dir)
        self.replica = SiteReplica(settings.state_dir)
        self.replicator: Replicator | None = None
        self.consumer: PlainEventConsumer | None = None
        self.delta_producer: KafkaProducer | None = None
        self.replica_feed: ReplicaFeed | None = None
        self._lock = contextlib.ExitStack()

    def _status(self) -> dict[str, Any]:
        items = self.replicator.status() if self.replicator else []
        return {"items": len(items), "replicating": sum(i["state"] == "replicating" for i in items)}

    async def start(self) -> None:
        s = self.agent_settings
        s.storage_dir.mkdir(parents=True, exist_ok=True)
        self._lock.enter_context(agent_lock(s.state_dir))
        await super().start()
        assert self.publisher is not None and self.identity is not None
        kafka = self.kafka
        await _retry(
            lambda: ensure_topics(
                s.kafka_bootstrap_servers,
                s.topic_prefix,
                AGENT_TOPICS,
                partitions=s.topic_partitions,
                security=kafka,
            )
        )
        publisher, agent_key = self.publisher, str(self.identity.producer_id)
        sign = signer_for(self.identity)

        async def emit(payload: EventPayload) -> None:
            """An agent event, retried with backoff until Kafka takes it."""
            delay = 0.5
            while True:
                try:
                    await publisher.publish(payload, key=agent_key)
                    return
                except (TimeoutError, KafkaError, OSError) as exc:
                    log.warning("agent event not sent; retrying", extra={"error": repr(exc)})
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 30)

        # Delta cycles have a producer of their own: its record batches hold several block
        # batches (`topics.DELTA_RECORD_BATCH_BYTES`, which replication.deltas.v1 accepts),
        # one produce round trip for all of them; other topics keep Kafka's usual limit.
        deltas = KafkaProducer(
            s.kafka_bootstrap_servers,
            s.topic_prefix,
            f"{self.name}-deltas",
            linger_ms=0,
            max_batch_bytes=topics.DELTA_RECORD_BATCH_BYTES,
            security=kafka,
        )
        await _retry(deltas.start)
        self.delta_producer = deltas
        wiring = Wiring(
            sign=sign,
            emit=emit,
            sink=lambda item_id, _seq: KafkaSink(deltas, sign, item_id),
        )
        self.replicator = Replicator(
            s.state_dir,
            self.host,
            wiring,
            disk_roots=[s.storage_dir.resolve()],
            export_roots=s.allowed_export_roots(),
        )
        await self.replicator.start()
        self.replica_feed = ReplicaFeed(
            self.replica,
            s.kafka_bootstrap_servers,
            s.topic_prefix,
            s.storage_dir,
            kafka,
            agent_id=str(self.identity.producer_id),
        )
        handler = CommandHandler(
            self.identity,
            emit,
            self.replicator,
            self.workloads,
            s.storage_dir,
            s.state_dir,
            self.replica_feed,
        )
        group, replica_group = topics.agent_command_groups(str(self.identity.producer_id))
        producer = self.publisher.producer

        def lane(
            group: str, handlers: dict[str, Any], dead_letters: bool, **order: Any
        ) -> PlainEventConsumer:
            return PlainEventConsumer(
                bootstrap=s.kafka_bootstrap_servers,
                prefix=s.topic_prefix,
                group=group,
                topic_names=[topics.AGENT_COMMANDS],
                producer=producer,
                handlers=handlers,
                security=kafka,
                dead_letters=dead_letters,
                **order,
            )

        consumer = lane(group, handler.handlers, True)
        # the replica's lane skips what it cannot decode (the main lane dead-letters it) and
        # applies the points of up to `replica_parallel` items at a time, each item's in order
        replica_lane = lane(
            replica_group,
            handler.replica_handlers,
            False,
            order_key=replica_item_key,
            parallel=s.replica_parallel,
        )
        self.consumer = consumer
        self.spawn("commands", consumer.run)
        self.spawn("replica-commands", replica_lane.run)

    async def stop(self) -> None:
        for name in ("commands", "replica-commands"):
            task = self._tasks.pop(name, None)
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.replica_feed is not None:
            await self.replica_feed.close()
        await self.workloads.stop_all()
        if self.replicator is not None:
            await self.replicator.stop()
        if self.delta_producer is not None:
            await self.delta_producer.stop()
        self.host.close()
        await super().stop()
        self._lock.close()


async def _retry(action: Any, tries: int = 30) -> None:
    delay = 0.5
    for attempt in range(tries):
        try:
            await action()
            return
        except Exception as exc:
            if attempt == tries - 1:
                raise
            log.warning("kafka not ready; retrying", extra={"error": repr(exc)})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5)
