"""Kafka entrypoint of the failover service: one `EventConsumer` over the topics whose events
keep its read models (registration, inventory, policy, replication) and bring the answers to
what it asked for (replication's materialisations, agents' `CommandCompleted`)."""

from __future__ import annotations

from datetime import timedelta

from services.failover.event_handlers import make_event_handlers
from services.failover.handlers import Context
from shared import topics
from shared.kafka.consumers import EventConsumer
from shared.kafka.producer import KafkaProducer
from shared.readmodels import registration_handlers, signature_verifier


def event_consumer(ctx: Context, producer: KafkaProducer) -> EventConsumer:
    s = ctx.settings
    return EventConsumer(
        bootstrap=s.kafka_bootstrap_servers,
        prefix=s.topic_prefix,
        group="failover.events",
        topic_names=[
            topics.REGISTRATION_EVENTS,
            topics.INVENTORY_EVENTS,
            topics.POLICY_EVENTS,
            topics.REPLICATION_EVENTS,
            topics.AGENT_EVENTS,
        ],
        pool=ctx.pool,
        producer=producer,
        handlers={**registration_handlers(), **make_event_handlers(ctx.notifier)},
        verifier=signature_verifier(),
        max_age=timedelta(seconds=s.event_max_age_seconds),
    )
