"""Topic administration: an admin client, and the platform's topics created and configured."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import TopicAlreadyExistsError

from shared import topics
from shared.kafka.security import KafkaSecurity


def admin_client(
    bootstrap: str, security: KafkaSecurity | None = None, **options: Any
) -> AIOKafkaAdminClient:
    """An aiokafka admin client with `security` (default: from the environment)."""
    return AIOKafkaAdminClient(
        bootstrap_servers=bootstrap,
        **(security or KafkaSecurity.from_env()).client_options(),
        **options,
    )


async def ensure_topics(
    bootstrap: str,
    prefix: str,
    names: Iterable[str],
    *,
    partitions: int,
    security: KafkaSecurity | None = None,
    dlq: bool = True,
) -> None:
    """Create each logical topic and (`dlq`) its DLQ twin if missing, with its
    `topics.configs_of`, and set those configs on the ones that exist (idempotent). A topic
    the client's principal may not describe looks missing and its creation is refused: the
    broker's answer is not an error here (the topic is someone else's to create)."""
    admin = admin_client(bootstrap, security)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted: list[NewTopic] = []
        configured: list[ConfigResource] = []
        for name in names:
            for t in (name, topics.dlq_of(name)) if dlq else (name,):
                physical = topics.physical(t, prefix)
                configs = topics.configs_of(t)
                if physical not in existing:
                    parts = partitions if not t.endswith(".dlq") else 1
                    wanted.append(
                        NewTopic(
                            physical,
                            num_partitions=parts,
                            replication_factor=1,
                            topic_configs=configs,
                        )
                    )
                elif configs:
                    configured.append(ConfigResource(ConfigResourceType.TOPIC, physical, configs))
        if configured:
            await admin.alter_configs(configured)
        if wanted:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(wanted)
    finally:
        await admin.close()
