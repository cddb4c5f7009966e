"""Topic names: `<domain>.<stream>.v<N>`, each with a dead-letter twin `<topic>.dlq`.

Keys: registration events by vault id; heartbeats by producer id; discovery by provider id;
deltas by protected item id (one item's cycle stays ordered in one partition).

Besides these, each recovery host agent has a replica feed of its own,
`replica.feed.v1.<agent id>` (`replica_feed`): the replication service forwards there the
verified delta records of the items whose replica the host keeps, keyed by item id, and only
that agent may read it. No DLQ twin: only the replication service writes it.
"""

from __future__ import annotations

REGISTRATION_EVENTS = "registration.events.v1"
REGISTRATION_HEARTBEATS = "registration.heartbeats.v1"
INVENTORY_DISCOVERY = "inventory.discovery.v1"
INVENTORY_EVENTS = "inventory.events.v1"
POLICY_EVENTS = "policy.events.v1"
REPLICATION_DELTAS = "replication.deltas.v1"
REPLICATION_EVENTS = "replication.events.v1"
AGENT_COMMANDS = "agent.commands.v1"
AGENT_EVENTS = "agent.events.v1"
FAILOVER_EVENTS = "failover.events.v1"

# Every recovery host's replica feed starts with this (the replication service creates them).
REPLICA_FEED_PREFIX = "replica.feed.v1."

ALL_TOPICS = (
    REGISTRATION_EVENTS,
    REGISTRATION_HEARTBEATS,
    INVENTORY_DISCOVERY,
    INVENTORY_EVENTS,
    POLICY_EVENTS,
    REPLICATION_DELTAS,
    REPLICATION_EVENTS,
    AGENT_COMMANDS,
    AGENT_EVENTS,
    FAILOVER_EVENTS,
)

# An agent's producer packs several `BlocksShipped` records (each well under 1 MiB) into one
# record batch of up to this many bytes: one produce round trip carries several of them.
DELTA_RECORD_BATCH_BYTES = 4 * 1024 * 1024

# Topic settings, set when `shared.kafka.admin.ensure_topics` creates a topic and on every start
# after (so a topic created before, or declared by another client, gets them too).
CONFIGS: dict[str, dict[str, str]] = {
    REPLICATION_DELTAS: {"max.message.bytes": str(2 * DELTA_RECORD_BATCH_BYTES)},
}


def replica_feed(agent_id: str) -> str:
    """The logical name of recovery host agent `agent_id`'s replica feed."""
    return f"{REPLICA_FEED_PREFIX}{agent_id}"


def configs_of(name: str) -> dict[str, str]:
    """The settings of logical topic `name` (a replica feed takes the deltas' record size)."""
    if name.startswith(REPLICA_FEED_PREFIX):
        return CONFIGS[REPLICATION_DELTAS]
    return CONFIGS.get(name, {})


def agent_command_groups(producer_id: str) -> tuple[str, str]:
    """A host agent's two consumer groups on agent.commands.v1: its main lane, and the lane of
    its recovery-site replica's point applies (so a backlog of points to apply never holds up a
    failover's commands)."""
    return f"agent.{producer_id}", f"agent.{producer_id}.replica"


def dlq_of(topic: str) -> str:
    return f"{topic}.dlq"


def physical(topic: str, prefix: str) -> str:
    """The topic's name on the broker: the configured prefix (test isolation) + logical name."""
    return f"{prefix}{topic}"


def logical(name: str, prefix: str) -> str:
    return name[len(prefix) :] if prefix and name.startswith(prefix) else name


def partition_for(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner gives a keyed record (murmur2 of the key bytes,
    as the Java client and aiokafka compute it; kcat with `-X partitioner=murmur2_random`).
    Per-key order holds only if every producer of a topic partitions this way."""
    from aiokafka.partitioner import murmur2  # the clients' own implementation

    return int((murmur2(key) & 0x7FFFFFFF) % partitions)
