"""Kafka entrypoint of the policy service: registration, inventory and protection events ->
read models, and the prerequisite verdicts that depend on them (`PrerequisitesEvaluated`)."""

from __future__ import annotations

from datetime import timedelta

import asyncpg

from services.policy import handlers
from services.policy import read_model_repository as reads
from services.policy.config import PolicySettings
from shared import topics
from shared.kafka.consumers import EventConsumer
from shared.kafka.decode import Incoming
from shared.readmodels import registration_handlers, signature_verifier
from shared.runtime import Runtime
from shared.schemas import replication

CONSUMED_TOPICS = (topics.REGISTRATION_EVENTS, topics.INVENTORY_EVENTS, topics.REPLICATION_EVENTS)


async def _on_protection_enabled(conn: asyncpg.Connection, inc: Incoming) -> None:
    ev = inc.payload
    assert isinstance(ev, replication.ProtectionEnabled)
    await reads.upsert_protected_item(
        conn,
        inc.envelope.vault_id,
        ev.vm_id,
        ev.source_cloud_id,
        ev.target_cloud_id,
        ev.pairing_id,
    )
    await handlers.publish_verdicts(
        conn,
        inc.envelope.vault_id,
        [
            ev.vm_id,
            *await reads.vm_ids_paired_into(conn, inc.envelope.vault_id, ev.target_cloud_id),
        ],
    )


async def _on_protection_disabled(conn: asyncpg.Connection, inc: Incoming) -> None:
    ev = inc.payload
    assert isinstance(ev, replication.ProtectionDisabled)
    vault_id = inc.envelope.vault_id
    target = await reads.remove_protected_item(conn, vault_id, ev.vm_id)
    paired = await reads.vm_ids_paired_into(conn, vault_id, target) if target else []
    await handlers.publish_verdicts(conn, vault_id, [ev.vm_id, *paired])


PROTECTION_HANDLERS = {
    "ProtectionEnabled": _on_protection_enabled,
    "ProtectionDisabled": _on_protection_disabled,
}


def read_model_consumer(runtime: Runtime, settings: PolicySettings) -> EventConsumer:
    """Vaults, tokens and site providers (with connection state) from registration events;
    clouds, hosts, VMs and networks from inventory events; protected VMs from replication
    events. Service events only: anything an
    edge producer put on these topics goes to the DLQ."""
    return EventConsumer(
        bootstrap=settings.kafka_bootstrap_servers,
        prefix=settings.topic_prefix,
        group="policy.read-models",
        topic_names=list(CONSUMED_TOPICS),
        pool=runtime.pool,
        producer=runtime.producer,
        handlers={
            **registration_handlers(),
            **handlers.inventory_handlers(),
            **PROTECTION_HANDLERS,
        },
        verifier=signature_verifier(),
        max_age=timedelta(seconds=settings.event_max_age_seconds),
    )
