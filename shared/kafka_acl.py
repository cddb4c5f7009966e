"""Who may do what on Kafka: the platform's principals and the ACLs that confine them.

A principal is the CN of a client certificate (the broker's `ssl.principal.mapping.rules`).
The broker runs Kafka's StandardAuthorizer with `allow.everyone.if.no.acl.found=false`, so a
principal can do only what an ACL below allows; `admin` (topic tooling, operators, tests) and
`broker` are super users. The table `ACCESS` is the whole policy:

- each service WRITEs only its own topics (and the DLQ twins of the topics it consumes, where
  its consumer dead-letters), READs only what it consumes, and uses only consumer groups
  named after itself;
- every registered edge (site provider, host agent) is its own principal
  `edge-<producer id>-g<generation>` (its certificate from the registration service,
  `shared.edge_pki`), whose ACLs the registration service creates at registration and
  deletes at re-registration, unregistration and revocation (`edge_acls`, `delete_acls`):
  a provider writes heartbeats and discovery; an agent writes heartbeats, agent events and
  deltas, reads agent commands in its own two consumer groups `agent.<producer id>` and
  `agent.<producer id>.replica` (the replica's lane) only, and reads offset ranges of its
  own replica feed `replica.feed.v1.<producer id>` without a consumer group (a recovery
  host agent feeding its replicas); no edge may read the delta topic, which holds every
  vault's block data;
- an upstream publisher (a system publishing with kcat) registers the same way, as one of
  those kinds (`python -m scripts.publisher_register`), and gets exactly that kind's ACLs:
  there is no shared edge principal;
- `registration` may alter the cluster's ACLs (to grant and remove the edges'): whoever holds
  its key can grant any principal anything, as whoever holds the platform CA key can mint any
  principal;
- only `registration` writes registration.events.v1; only `replication` and `failover` write
  agent.commands.v1; only `replication` writes (and creates) the replica feeds.

So a record on a service's topic was written by that service's principal, and a consumer's
trust of an unsigned `service:<name>` producer id rests on that ACL: `SERVICE_PRODUCER_IDS`
lists which producer id each topic's writers use.

ACLs name physical topics: `<DR_TOPIC_PREFIX><logical name>` (LITERAL) and consumer groups
`<prefix><group>` (PREFIXED). A deployment grants them once for its prefix; a test run or
demo with a random prefix grants them for that prefix before its services start:

    python -m shared.kafka_acl [--prefix PREFIX]

(with the admin certificate from the environment, as `make up` writes in stack.env). It also
creates the prefix's topics, so no edge principal needs the right to create one.

ACLs travel as Kafka's CreateAcls / DeleteAcls requests (v1) through aiokafka's admin client:
aiokafka 0.14's `AIOKafkaAdminClient` has the protocol structs but no `create_acls` /
`delete_acls` method (aio-libs/aiokafka#955), and the only alternatives (kafka-python's admin
client, the Java `kafka-acls` tool) would add a second Kafka client library or a JVM per
registration; the two request classes below are the whole difference.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from aiokafka.protocol.admin import (
    CreateAclsRequest,
    CreateAclsRequest_v1,
    DeleteAclsRequest,
    DeleteAclsRequest_v1,
)

from shared import topics
from shared.kafka.admin import admin_client, ensure_topics
from shared.kafka.security import KafkaSecurity
from shared.settings import CommonSettings


class Resource(IntEnum):
    ANY = 1
    TOPIC = 2
    GROUP = 3
    CLUSTER = 4


class Operation(IntEnum):
    ANY = 1
    ALL = 2
    READ = 3
    WRITE = 4
    CREATE = 5
    ALTER = 7
    DESCRIBE = 8
    DESCRIBE_CONFIGS = 10
    ALTER_CONFIGS = 11


class Pattern(IntEnum):
    ANY = 1
    LITERAL = 3
    PREFIXED = 4


ALLOW = 3
ANY_PERMISSION = 1
ANY_HOST = "*"
CLUSTER = "kafka-cluster"


@dataclass(frozen=True)
class Access:
    """What one principal may do (logical topic names; groups and owned names are what
    follows the topic prefix)."""

    writes: tuple[str, ...]
    reads: tuple[str, ...]
    groups: tuple[str, ...]
    # may create, write and read any topic whose name starts with one of these (faust's
    # internal topics under its app id; the replica feeds)
    owned_prefixes: tuple[str, ...] = ()
    # may create its topics and set their configs (services; edges may not)
    creates: bool = True
    # may read these without a consumer group (partition and offsets it names itself) and
    # without writing their DLQ: it never dead-letters there
    range_reads: tuple[str, ...] = ()
    # consumer groups named exactly (LITERAL) rather than by prefix
    exact_groups: tuple[str, ...] = ()
    # may create and delete ACLs (the cluster's ALTER): the registration service's edges
    alters_acls: bool = False


ACCESS: dict[str, Access] = {
    "registration": Access(
        writes=(topics.REGISTRATION_EVENTS,),
        reads=(topics.REGISTRATION_HEARTBEATS,),
        groups=("registration.",),
        alters_acls=True,
    ),
    "inventory": Access(
        writes=(topics.INVENTORY_EVENTS,),
        reads=(topics.REGISTRATION_EVENTS, topics.INVENTORY_DISCOVERY),
        groups=("inventory.",),
    ),
    "policy": Access(
        writes=(topics.POLICY_EVENTS,),
        reads=(topics.REGISTRATION_EVENTS, topics.INVENTORY_EVENTS, topics.REPLICATION_EVENTS),
        groups=("policy.",),
    ),
    "replication": Access(
        writes=(topics.REPLICATION_EVENTS, topics.AGENT_COMMANDS),
        reads=(
            topics.REPLICATION_DELTAS,
            topics.REGISTRATION_EVENTS,
            topics.INVENTORY_EVENTS,
            topics.POLICY_EVENTS,
            topics.AGENT_EVENTS,
            topics.FAILOVER_EVENTS,
        ),
        groups=("replication.", "replication-deltas"),
        owned_prefixes=("replication-deltas", topics.REPLICA_FEED_PREFIX),
    ),
    "failover": Access(
        writes=(topics.FAILOVER_EVENTS, topics.AGENT_COMMANDS),
        reads=(
            topics.REGISTRATION_EVENTS,
            topics.INVENTORY_EVENTS,
            topics.POLICY_EVENTS,
            topics.REPLICATION_EVENTS,
            topics.AGENT_EVENTS,
        ),
        groups=("failover.",),
    ),
}

# Principals of earlier versions, whose ACLs (of every prefix) `grant_platform` deletes:
# `edge`, a tools certificate shared by every upstream publisher, which now registers for a
# principal of its own.
RETIRED_PRINCIPALS: tuple[str, ...] = ("edge",)

# The unsigned `service:` producer ids written on each service-owned topic; the topic's ACL
# lets only the matching principal write there.
SERVICE_PRODUCER_IDS: dict[str, tuple[str, ...]] = {
    topics.REGISTRATION_EVENTS: ("service:registration",),
    topics.INVENTORY_EVENTS: ("service:inventory",),
    topics.POLICY_EVENTS: ("service:policy",),
    topics.REPLICATION_EVENTS: ("service:replication",),
    topics.FAILOVER_EVENTS: ("service:failover",),
    topics.AGENT_COMMANDS: ("service:replication", "service:failover"),
}


@dataclass(frozen=True)
class Acl:
    resource: Resource
    name: str
    pattern: Pattern
    principal: str
    operation: Operation


def acls_for(principal: str, access: Access, prefix: str) -> list[Acl]:
    """The ACLs that give `principal` (a CN) `access` under topic prefix `prefix`."""
    user = f"User:{principal}"
    out: list[Acl] = []

    def topic(name: str, *ops: Operation) -> None:
        physical = topics.physical(name, prefix)
        out.extend(Acl(Resource.TOPIC, physical, Pattern.LITERAL, user, op) for op in ops)

    create = (Operation.CREATE,) if access.creates else ()
    configs = (Operation.DESCRIBE_CONFIGS, Operation.ALTER_CONFIGS) if access.creates else ()
    for name in access.writes:
        topic(name, Operation.WRITE, Operation.DESCRIBE, *create, *configs)
        topic(topics.dlq_of(name), Operation.DESCRIBE, *create, *configs)
    for name in access.reads:
        topic(name, Operation.READ, Operation.DESCRIBE, *create, *configs)
        # its consumer dead-letters there
        topic(topics.dlq_of(name), Operation.WRITE, Operation.DESCRIBE, *create, *configs)
    for name in access.range_reads:
        topic(name, Operation.READ, Operation.DESCRIBE)
    for group in access.groups:
        for op in (Operation.READ, Operation.DESCRIBE):
            out.append(Acl(Resource.GROUP, f"{prefix}{group}", Pattern.PREFIXED, user, op))
    for group in access.exact_groups:
        for op in (Operation.READ, Operation.DESCRIBE):
            out.append(Acl(Resource.GROUP, f"{prefix}{group}", Pattern.LITERAL, user, op))
    for owned in access.owned_prefixes:
        out.append(Acl(Resource.TOPIC, f"{prefix}{owned}", Pattern.PREFIXED, user, Operation.ALL))
    if access.alters_acls:
        for op in (Operation.ALTER, Operation.DESCRIBE):
            out.append(Acl(Resource.CLUSTER, CLUSTER, Pattern.LITERAL, user, op))
    return out


def edge_access(kind: str, producer_id: str) -> Access:
    """What one registered edge (a site provider, a host agent, or an upstream publisher
    registered as one of them) may do: `kind` "provider" writes heartbeats and discovery;
    "agent" writes heartbeats, agent events and deltas, reads its commands and reads ranges of
    its own replica feed."""
    if kind == "provider":
        return Access(
            writes=(topics.REGISTRATION_HEARTBEATS, topics.INVENTORY_DISCOVERY),
            reads=(),
            groups=(),
            creates=False,
        )
    return Access(
        writes=(topics.REGISTRATION_HEARTBEATS, topics.AGENT_EVENTS, topics.REPLICATION_DELTAS),
        reads=(topics.AGENT_COMMANDS,),
        groups=(),
        exact_groups=topics.agent_command_groups(producer_id),
        creates=False,
        range_reads=(topics.replica_feed(producer_id),),
    )


def edge_acls(principal: str, kind: str, producer_id: str, prefix: str) -> list[Acl]:
    """The ACLs of one registered edge's principal under topic prefix `prefix`."""
    return acls_for(principal, edge_access(kind, producer_id), prefix)


def retired_edge_acls(principal: str, kind: str, prefix: str) -> list[Acl]:
    """ACLs that earlier versions gave an edge and this one does not: an agent's READ of the
    whole delta topic (recovery hosts now read their own replica feed)."""
    if kind != "agent":
        return []
    physical = topics.physical(topics.REPLICATION_DELTAS, prefix)
    return [Acl(Resource.TOPIC, physical, Pattern.LITERAL, f"User:{principal}", Operation.READ)]


def _entries(acls: Iterable[Acl]) -> list[tuple[Any, ...]]:
    """ACLs as CreateAcls v1 creations and DeleteAcls v1 filters take them (any host, allow)."""
    return [
        (a.resource, a.name, a.pattern, a.principal, ANY_HOST, a.operation, ALLOW) for a in acls
    ]


def _require_v1(request_struct_class: Any, what: str) -> None:
    if request_struct_class.API_VERSION < 1:
        raise RuntimeError(f"the broker does not take {what}")


class _CreateAcls(CreateAclsRequest):  # type: ignore[misc]
    """aiokafka's CreateAcls request carries one ACL; this one carries many (v1: patterns)."""

    def __init__(self, acls: Iterable[Acl]) -> None:
        self._acls = list(acls)

    def build(self, request_struct_class: Any) -> CreateAclsRequest_v1:
        _require_v1(request_struct_class, "prefixed ACLs (CreateAcls v1)")
        return CreateAclsRequest_v1(_entries(self._acls))


async def create_acls(bootstrap: str, acls: list[Acl], security: KafkaSecurity) -> None:
    """Create `acls` (idempotent: an ACL that exists is kept) as the client's principal,
    which must be allowed to alter ACLs (a super user)."""
    admin = admin_client(bootstrap, security, request_timeout_ms=30_000)
    await admin.start()
    try:
        response = await admin._send_to_controller(_CreateAcls(acls))
        errors = [(code, msg) for code, msg in response.creation_responses if code]
        if errors:
            raise RuntimeError(f"CreateAcls refused: {errors[:3]}")
    finally:
        await admin.close()


class _DeleteAcls(DeleteAclsRequest):  # type: ignore[misc]
    """Every ACL of one principal (any resource, pattern, operation and host)."""

    def __init__(self, principal: str) -> None:
        self._principal = principal

    def build(self, request_struct_class: Any) -> DeleteAclsRequest_v1:
        _require_v1(request_struct_class, "pattern filters (DeleteAcls v1)")
        return DeleteAclsRequest_v1(
            [
                (
                    Resource.ANY,
                    None,
                    Pattern.ANY,
                    f"User:{self._principal}",
                    None,
                    Operation.ANY,
                    ANY_PERMISSION,
                )
            ]
        )


class _DeleteExactAcls(DeleteAclsRequest):  # type: ignore[misc]
    """Exactly these ACLs (each its resource, name, pattern, principal and operation)."""

    def __init__(self, acls: Iterable[Acl]) -> None:
        self._acls = list(acls)

    def build(self, request_struct_class: Any) -> DeleteAclsRequest_v1:
        _require_v1(request_struct_class, "pattern filters (DeleteAcls v1)")
        return DeleteAclsRequest_v1(_entries(self._acls))


async def delete_exact_acls(bootstrap: str, acls: list[Acl], security: KafkaSecurity) -> int:
    """Delete exactly `acls` (those that exist); returns how many were deleted."""
    if not acls:
        return 0
    admin = admin_client(bootstrap, security, request_timeout_ms=30_000)
    await admin.start()
    try:
        response = await admin._send_to_controller(_DeleteExactAcls(acls))
        return _deleted(response)
    finally:
        await admin.close()


def _deleted(response: Any) -> int:
    deleted = 0
    for code, message, matching in response.filter_responses:
        if code:
            raise RuntimeError(f"DeleteAcls refused: {code} {message}")
        deleted += len(matching)
    return deleted


async def delete_acls(bootstrap: str, principal: str, security: KafkaSecurity) -> int:
    """Delete every ACL of `principal` (a CN); returns how many. From the broker's answer on,
    the principal may do nothing (its connections stay open but every request is refused)."""
    admin = admin_client(bootstrap, security, request_timeout_ms=30_000)
    await admin.start()
    try:
        response = await admin._send_to_controller(_DeleteAcls(principal))
        return _deleted(response)
    finally:
        await admin.close()


async def grant_platform(
    bootstrap: str, prefix: str, security: KafkaSecurity, partitions: int = 4
) -> int:
    """Create the prefix's topics and every principal's ACLs for it, and delete those of the
    retired principals; returns how many ACLs were granted."""
    await ensure_topics(
        bootstrap, prefix, topics.ALL_TOPICS, partitions=partitions, security=security
    )
    acls = [a for p, access in ACCESS.items() for a in acls_for(p, access, prefix)]
    await create_acls(bootstrap, acls, security)
    for retired in RETIRED_PRINCIPALS:
        await delete_acls(bootstrap, retired, security)
    return len(acls)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Create the topics and the ACLs of every platform principal for a topic"
        " prefix (run with the admin certificate)."
    )
    parser.add_argument("--prefix", default=None, help="topic prefix (default: DR_TOPIC_PREFIX)")
    args = parser.parse_args(argv)
    settings = CommonSettings()
    security = KafkaSecurity.from_settings(settings)
    if security.protocol == "plaintext":
        print("DR_KAFKA_SECURITY=plaintext: the broker has no ACLs; nothing to do")
        return 0
    prefix = settings.topic_prefix if args.prefix is None else args.prefix
    count = asyncio.run(
        grant_platform(
            settings.kafka_bootstrap_servers, prefix, security, settings.topic_partitions
        )
    )
    print(f"{count} ACLs for topic prefix {prefix!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
