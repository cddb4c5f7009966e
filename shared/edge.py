"""What every edge process (site provider, host agent) shares at run time: signed publishing,
the heartbeat loop and a runtime with health for the HTTP edge. Its identity (registration,
the identity file, Kafka security) is `shared.edge_identity`; the renewal of its Kafka
certificate while it runs, `shared.edge_renewal`.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

from prometheus_client import Counter, Gauge

from shared import topics
from shared.edge_identity import EdgeSettings, Identity, kafka_security, obtain_identity
from shared.edge_renewal import CertificateRenewal
from shared.kafka.producer import KafkaProducer
from shared.kafka.security import KafkaSecurity
from shared.runtime import DependencyWatch
from shared.schemas.envelope import EventPayload, new_envelope
from shared.schemas.registration import Heartbeat, ProducerKind
from shared.schemas.registry import topic_of

log = logging.getLogger(__name__)

HEARTBEATS_SENT = Counter("dr_edge_heartbeats_total", "Heartbeats published", ["result"])
EDGE_REGISTERED = Gauge("dr_edge_registered", "1 when this edge process holds a credential")


class SignedPublisher:
    """Publishes payloads in envelopes signed with this producer's Ed25519 private key."""

    def __init__(self, producer: KafkaProducer, identity: Identity) -> None:
        self.producer = producer
        self.identity = identity
        self._key = identity.signing_key

    async def publish(self, payload: EventPayload, *, key: str) -> uuid.UUID:
        envelope = new_envelope(
            payload,
            vault_id=self.identity.vault_id,
            producer_id=str(self.identity.producer_id),
            signing_key=self._key,
        )
        await self.producer.publish(envelope, key=key, topic=topic_of(type(payload)))
        return envelope.event_id


async def heartbeat_loop(
    publisher: SignedPublisher,
    interval: float,
    status: Callable[[], dict[str, Any]] = dict,
    software_version: str = "0.1.0",
) -> None:
    sequence = 0
    identity = publisher.identity
    while True:
        beat = Heartbeat(
            kind=identity.kind,
            sequence=sequence,
            interval_seconds=interval,
            software_version=software_version,
            status=status(),
        )
        try:
            await publisher.publish(beat, key=str(identity.producer_id))
            HEARTBEATS_SENT.labels("ok").inc()
            sequence += 1
        except Exception as exc:
            HEARTBEATS_SENT.labels("error").inc()
            log.warning("heartbeat publish failed", extra={"error": repr(exc)})
        await asyncio.sleep(interval)


TaskFactory = Callable[["EdgeRuntime"], Coroutine[Any, Any, None]]


class EdgeRuntime:
    """Lifecycle of an edge process: identity, Kafka producer, heartbeats, supervised tasks."""

    def __init__(
        self,
        name: str,
        settings: EdgeSettings,
        kind: ProducerKind,
        *,
        metadata: Callable[[], dict[str, Any]] = dict,
        status: Callable[[], dict[str, Any]] = dict,
        topics_used: tuple[str, ...] = (topics.REGISTRATION_HEARTBEATS,),
    ) -> None:
        self.name = name
        self.settings = settings
        self.kind = kind
        self.metadata = metadata
        self.status = status
        self.topics_used = topics_used
        self.identity: Identity | None = None
        self.kafka: KafkaSecurity | None = None
        self.publisher: SignedPublisher | None = None
        self._producer: KafkaProducer | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.broker = DependencyWatch("Kafka")  # reachability, for /healthz
        self.renewal: CertificateRenewal | None = None

    async def start(self) -> None:
        self.identity = await obtain_identity(self.settings, self.kind, self.metadata())
        EDGE_REGISTERED.set(1)
        s = self.settings
        self.kafka = kafka_security(s, self.identity)
        self._producer = KafkaProducer(
            s.kafka_bootstrap_servers, s.topic_prefix, self.name, linger_ms=0, security=self.kafka
        )
        await self._producer.start()
        self.publisher = SignedPublisher(self._producer, self.identity)
        publisher = self.publisher
        self.spawn(
            "heartbeat",
            lambda: heartbeat_loop(publisher, s.heartbeat_seconds, self.status),
        )
        producer = self._producer
        self.spawn("kafka-probe", lambda: self.broker.watch(producer.unreachable))
        if self.identity.kafka_certificate is not None and self.kafka.context is not None:
            self.renewal = CertificateRenewal(s, self.identity, self.kafka, self._renewed)
            self.spawn("kafka-certificate", self.renewal.run)

    def _renewed(self, identity: Identity) -> None:
        self.identity = identity

    def spawn(self, name: str, factory: Callable[[], Coroutine[Any, Any, None]]) -> None:
        async def supervised() -> None:
            delay = 0.5
            while True:
                try:
                    await factory()
                    return
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("edge task crashed; restarting", extra={"task": name})
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 10)

        self._tasks[name] = asyncio.create_task(supervised(), name=name)

    async def health(self) -> dict[str, Any]:
        checks = {
            "registered": "ok" if self.identity else "down",
            "kafka_producer": "ok" if self._producer and self._producer.started else "down",
            "kafka": self.broker.check(),
        }
        if self.renewal is not None:
            checks["kafka_certificate"] = self.renewal.check()
        for name, task in self._tasks.items():
            checks[f"task:{name}"] = "stopped" if task.done() else "running"
        healthy = all(v in ("ok", "running") or v.startswith("warning:") for v in checks.values())
        return {
            "service": self.name,
            "status": "ok" if healthy else "degraded",
            "checks": checks,
            "producer_id": str(self.identity.producer_id) if self.identity else None,
        }

    async def stop(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        if self._producer is not None:
            await self._producer.stop()
