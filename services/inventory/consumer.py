"""Kafka entrypoints of the inventory service: registration events -> read models (vaults,
tokens, producers), and discovery records -> inventory. Two consumers, so a discovery record
waiting for its producer's registration never holds up the registration events it waits for."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import asyncpg

from services.inventory import handlers
from services.inventory.config import InventorySettings
from shared import readmodels, topics
from shared.kafka.consumers import EventConsumer
from shared.runtime import Runtime
from shared.schemas.envelope import Envelope


class RegistrationPending(TimeoutError):
    """The producer's registration may not have reached this service yet. A `TimeoutError`, so
    the consumer retries the record with backoff instead of skipping it."""


def discovery_verifier(
    grace: timedelta,
) -> Callable[[asyncpg.Connection, Envelope, bool], Awaitable[None]]:
    """`shared.readmodels.signature_verifier`, patient for `grace` after an event occurred when
    its producer is unknown or its signature doesn't verify with the known key: the
    ProducerRegistered event (new producer, or re-registration with a new key pair) may still
    be on its way. After that the event is dead-lettered with the verifier's reason."""
    verify = readmodels.signature_verifier()

    async def check(conn: asyncpg.Connection, env: Envelope, signed: bool) -> None:
        young = datetime.now(UTC) - env.occurred_at < grace
        if signed and env.signature is not None and young:
            known = await readmodels.known_producer(conn, env.producer_id)
            if known is None or (
                known["vault_id"] == env.vault_id
                and (known["public_key"] is None or not env.signature_valid(known["public_key"]))
            ):
                raise RegistrationPending(f"producer {env.producer_id} not (yet) verifiable")
        await verify(conn, env, signed)

    return check


def registration_consumer(runtime: Runtime, settings: InventorySettings) -> EventConsumer:
    return EventConsumer(
        bootstrap=settings.kafka_bootstrap_servers,
        prefix=settings.topic_prefix,
        group="inventory.registration",
        topic_names=[topics.REGISTRATION_EVENTS],
        pool=runtime.pool,
        producer=runtime.producer,
        handlers={
            **readmodels.registration_handlers(),
            "ProducerUnregistered": handlers.handle_provider_unregistered,
        },
        verifier=readmodels.signature_verifier(),
    )


def discovery_consumer(runtime: Runtime, settings: InventorySettings) -> EventConsumer:
    return EventConsumer(
        bootstrap=settings.kafka_bootstrap_servers,
        prefix=settings.topic_prefix,
        group="inventory.discovery",
        topic_names=[topics.INVENTORY_DISCOVERY],
        pool=runtime.pool,
        producer=runtime.producer,
        handlers={
            "DiscoverySnapshot": handlers.handle_snapshot,
            "DiscoveryChange": handlers.handle_change,
        },
        verifier=discovery_verifier(timedelta(seconds=settings.verify_grace_seconds)),
        max_age=timedelta(seconds=settings.event_max_age_seconds),
        max_records=20,
    )
