"""Kafka entrypoint of the registration service: heartbeats -> connection state."""

from __future__ import annotations

from datetime import timedelta

from services.registration import handlers
from services.registration import repository as repo
from services.registration.config import RegistrationSettings
from shared import topics
from shared.kafka.consumers import EventConsumer
from shared.readmodels import signature_verifier
from shared.runtime import Runtime


def heartbeat_consumer(runtime: Runtime, settings: RegistrationSettings) -> EventConsumer:
    return EventConsumer(
        bootstrap=settings.kafka_bootstrap_servers,
        prefix=settings.topic_prefix,
        group="registration.heartbeats",
        topic_names=[topics.REGISTRATION_HEARTBEATS],
        pool=runtime.pool,
        producer=runtime.producer,
        handlers={"Heartbeat": handlers.handle_heartbeat},
        verifier=signature_verifier(repo.producer_lookup),
        max_age=timedelta(seconds=settings.event_max_age_seconds),
    )
