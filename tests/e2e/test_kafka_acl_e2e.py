"""Kafka authentication and ACLs on the real broker (a stack with KAFKA_SECURITY=tls): a client
without a certificate can neither produce nor consume; an edge principal (a host agent's or a
site provider's, as the registration service issues and grants them) cannot write
registration.events.v1 or a service's topic, nor another kind's edge topics, nor read
registration events; a service cannot write another service's topic; each can do what its role
needs. An agent reads offset ranges of its own replica feed (which only the replication service
writes and creates), never another agent's feed, the delta topic (every vault's blocks) or
another service topic's records. The retired shared `edge` principal may do nothing."""

from __future__ import annotations

import os
import secrets
import ssl
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAuthorizationFailedError
from cryptography import x509

from kit.poll import eventually
from kit.procs import kafka_identity
from kit.stack import Stack, delete_prefixed_topics, random_prefix
from services.registration.edge_certs import EdgeCertificates
from shared import edge_pki, topics
from shared.kafka.admin import ensure_topics
from shared.kafka.ranges import RangeUnavailable, read_range
from shared.kafka.security import KafkaSecurity
from shared.kafka_acl import Access, acls_for, create_acls, edge_access, grant_platform
from tests.support.kafka import read_all

pytestmark = pytest.mark.e2e

EDGE_KINDS = ("agent", "provider")
EDGE_IDS: dict[str, str] = {}  # kind -> producer id of the `edges` fixture's principals


@pytest.fixture(scope="module")
async def prefix(stack: Stack) -> AsyncIterator[str]:
    """A fresh topic prefix with its topics and the platform's ACLs (granted as admin)."""
    if os.environ.get("DR_KAFKA_SECURITY", "tls") != "tls":
        pytest.skip("the stack runs Kafka without TLS (KAFKA_SECURITY=plaintext)")
    name = random_prefix("acl")
    kafka_identity({"DR_TOPIC_PREFIX": name, "KAFKA_BOOTSTRAP_SERVERS": stack.kafka}, "admin")
    yield name
    await delete_prefixed_topics(stack.kafka, name)


@pytest.fixture(scope="module")
def certificates(stack: Stack, prefix: str) -> EdgeCertificates:
    """The registration service's own code that certifies edges and keeps their ACLs."""
    pki = Path(os.environ["DR_KAFKA_PKI_DIR"])
    return EdgeCertificates(
        edge_pki.EdgeIssuer.from_files(pki / "edge-ca.pem", pki / "edge-ca.key"),
        timedelta(hours=1),
        stack.kafka,
        prefix,
        KafkaSecurity.from_env(),
    )


def certified(
    certificates: EdgeCertificates, kind: str, folder: Path
) -> tuple[str, str, x509.CertificateSigningRequest, KafkaSecurity]:
    """A new edge of `kind`: (producer id, principal, CSR, its client security), its
    certificate signed; no ACL granted yet."""
    key = edge_pki.new_key()
    csr = x509.load_pem_x509_csr(edge_pki.csr_pem(key, f"{kind}.acl.local").encode())
    producer_id = str(uuid.uuid4())
    principal = edge_pki.principal_of(producer_id, 1)
    issued = certificates.issuer.issue(csr, principal, certificates.valid)
    cert, key_file = edge_pki.write_client_files(folder, issued.pem, edge_pki.key_pem(key))
    sec = KafkaSecurity("tls", os.environ["DR_KAFKA_CA_FILE"], str(cert), str(key_file))
    return producer_id, principal, csr, sec


@pytest.fixture(scope="module")
async def edges(
    certificates: EdgeCertificates, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, KafkaSecurity]:
    """An agent's and a provider's principal of this prefix, certified by the edge CA and
    granted their kind's ACLs by the registration service's own code (`EdgeCertificates`)."""
    out: dict[str, KafkaSecurity] = {}
    for kind in EDGE_KINDS:
        producer_id, principal, csr, sec = certified(
            certificates, kind, tmp_path_factory.mktemp(kind)
        )
        await certificates.grant(csr, principal, kind, producer_id)
        EDGE_IDS[kind] = producer_id
        out[kind] = sec
    return out


def security(stack: Stack, prefix: str, principal: str) -> KafkaSecurity:
    """A platform principal's certificate (from the stack's pki folder)."""
    env = {"DR_TOPIC_PREFIX": prefix, "KAFKA_BOOTSTRAP_SERVERS": stack.kafka}
    identity = kafka_identity(env, principal)
    return KafkaSecurity(
        "tls",
        os.environ["DR_KAFKA_CA_FILE"],
        identity["DR_KAFKA_CERT_FILE"],
        identity["DR_KAFKA_KEY_FILE"],
    )


def principal_security(
    stack: Stack, prefix: str, edges: dict[str, KafkaSecurity], principal: str
) -> KafkaSecurity:
    return edges[principal] if principal in edges else security(stack, prefix, principal)


async def produce(stack: Stack, sec: KafkaSecurity, topic: str, value: bytes) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=stack.kafka, request_timeout_ms=10_000, **sec.client_options()
    )
    await producer.start()
    try:
        await producer.send_and_wait(topic, value)
    finally:
        await producer.stop()


def no_certificate() -> ssl.SSLContext:
    """Trusts the broker, presents no certificate of its own."""
    return ssl.create_default_context(cafile=os.environ["DR_KAFKA_CA_FILE"])


async def test_a_client_without_a_certificate_can_neither_produce_nor_consume(
    stack: Stack, prefix: str
) -> None:
    topic = topics.physical(topics.REGISTRATION_EVENTS, prefix)
    producer = AIOKafkaProducer(
        bootstrap_servers=stack.kafka,
        security_protocol="SSL",
        ssl_context=no_certificate(),
        request_timeout_ms=5_000,
    )
    with pytest.raises(KafkaConnectionError):
        await producer.start()
    await producer.stop()
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=stack.kafka,
        security_protocol="SSL",
        ssl_context=no_certificate(),
        request_timeout_ms=5_000,
    )
    with pytest.raises(KafkaConnectionError):
        await consumer.start()
    await consumer.stop()
    plain = AIOKafkaProducer(bootstrap_servers=stack.kafka, request_timeout_ms=5_000)
    with pytest.raises(KafkaError):
        await plain.start()
    await plain.stop()


@pytest.mark.parametrize(
    "principal, topic",
    [
        ("agent", topics.REGISTRATION_EVENTS),
        ("agent", topics.POLICY_EVENTS),
        ("agent", topics.AGENT_COMMANDS),
        ("agent", topics.INVENTORY_DISCOVERY),
        ("provider", topics.REGISTRATION_EVENTS),
        ("provider", topics.REPLICATION_DELTAS),
        ("provider", topics.AGENT_EVENTS),
        ("inventory", topics.REGISTRATION_EVENTS),
        ("policy", topics.REPLICATION_EVENTS),
    ],
)
async def test_a_principal_cannot_write_a_topic_that_is_not_its_own(
    stack: Stack, prefix: str, edges: dict[str, KafkaSecurity], principal: str, topic: str
) -> None:
    physical = topics.physical(topic, prefix)
    tag = secrets.token_hex(8).encode()
    with pytest.raises(TopicAuthorizationFailedError):
        await produce(stack, principal_security(stack, prefix, edges, principal), physical, tag)
    assert all(tag not in r.value for r in await read_all(stack.kafka, physical))


@pytest.mark.parametrize("kind", EDGE_KINDS)
async def test_an_edge_cannot_read_registration_events(
    stack: Stack, prefix: str, edges: dict[str, KafkaSecurity], kind: str
) -> None:
    consumer = AIOKafkaConsumer(
        topics.physical(topics.REGISTRATION_EVENTS, prefix),
        bootstrap_servers=stack.kafka,
        group_id=f"{prefix}agent.reader",
        auto_offset_reset="earliest",
        **edges[kind].client_options(),
    )
    with pytest.raises(TopicAuthorizationFailedError):
        try:
            await consumer.start()
            await consumer.getmany(timeout_ms=5_000)
        finally:
            await consumer.stop()


async def test_each_principal_writes_its_own_topics(
    stack: Stack, prefix: str, edges: dict[str, KafkaSecurity]
) -> None:
    for principal, topic in (
        ("agent", topics.REGISTRATION_HEARTBEATS),
        ("agent", topics.AGENT_EVENTS),
        ("agent", topics.REPLICATION_DELTAS),
        ("provider", topics.REGISTRATION_HEARTBEATS),
        ("provider", topics.INVENTORY_DISCOVERY),
        ("registration", topics.REGISTRATION_EVENTS),
        ("failover", topics.AGENT_COMMANDS),
    ):
        physical = topics.physical(topic, prefix)
        tag = secrets.token_hex(8).encode()
        await produce(stack, principal_security(stack, prefix, edges, principal), physical, tag)
        assert any(r.value == tag for r in await read_all(stack.kafka, physical)), principal


async def test_granting_the_platform_deletes_the_retired_edge_principals_acls(
    stack: Stack, prefix: str, tmp_path: Path
) -> None:
    """A certificate with CN=edge (the shared tools principal of earlier versions, as an old
    pki folder holds one) with a write ACL as earlier versions granted it: it publishes; once
    the platform's ACLs are granted again (`python -m shared.kafka_acl`, as an upgraded
    deployment does), Kafka refuses it."""
    pki = Path(os.environ["DR_KAFKA_PKI_DIR"])
    ca = edge_pki.EdgeIssuer.from_files(pki / "ca.pem", pki / "ca.key")
    key = edge_pki.new_key()
    csr = x509.load_pem_x509_csr(edge_pki.csr_pem(key, "edge").encode())
    issued = ca.issue(csr, "edge", timedelta(hours=1))
    cert, key_file = edge_pki.write_client_files(tmp_path, issued.pem, edge_pki.key_pem(key))
    old = KafkaSecurity("tls", os.environ["DR_KAFKA_CA_FILE"], str(cert), str(key_file))
    heartbeats = topics.physical(topics.REGISTRATION_HEARTBEATS, prefix)
    admin = KafkaSecurity.from_env()
    earlier = Access(writes=(topics.REGISTRATION_HEARTBEATS,), reads=(), groups=(), creates=False)
    await create_acls(stack.kafka, acls_for("edge", earlier, prefix), admin)

    async def publishes() -> bool:  # once the broker's authorizer has the new ACL
        try:
            await produce(stack, old, heartbeats, b"before")
        except TopicAuthorizationFailedError:
            return False
        return True

    await eventually(publishes, timeout=20, what="the edge principal's ACL taking effect")

    await grant_platform(stack.kafka, prefix, admin)
    tag = secrets.token_hex(8).encode()
    with pytest.raises(TopicAuthorizationFailedError):
        await produce(stack, old, heartbeats, tag)
    assert all(tag not in r.value for r in await read_all(stack.kafka, heartbeats))


async def read_one(
    stack: Stack, topic: str, partition: int, offset: int, sec: KafkaSecurity
) -> list[bytes]:
    """The record at `offset` as principal `sec` reads it (a range of one)."""
    return [
        record.value
        async for batch in read_range(
            stack.kafka, topic, partition, offset, offset, timeout=5, security=sec
        )
        for record in batch
    ]


async def test_an_agent_reads_its_own_replica_feed_and_no_other_block_data(
    stack: Stack, prefix: str, edges: dict[str, KafkaSecurity]
) -> None:
    edge = edges["agent"]
    replication = security(stack, prefix, "replication")
    feed = topics.replica_feed(EDGE_IDS["agent"])
    other = topics.replica_feed(str(uuid.uuid4()))  # another recovery host's
    await ensure_topics(
        stack.kafka, prefix, [feed, other], partitions=1, security=replication, dlq=False
    )
    tag = secrets.token_hex(8).encode()
    at = {}
    for name in (feed, other):
        physical = topics.physical(name, prefix)
        await produce(stack, replication, physical, tag)
        record = next(r for r in await read_all(stack.kafka, physical) if r.value == tag)
        at[name] = (physical, record.partition, record.offset)
    assert await read_one(stack, *at[feed], edge) == [tag]
    with pytest.raises((RangeUnavailable, TopicAuthorizationFailedError)):
        await read_one(stack, *at[other], edge)
    with pytest.raises((RangeUnavailable, TopicAuthorizationFailedError)):  # a provider: none
        await read_one(stack, *at[feed], edges["provider"])
    with pytest.raises(TopicAuthorizationFailedError):  # only the replication service writes
        await produce(stack, edge, at[feed][0], tag)

    # the delta topic: an agent writes its cycles there, and reads nothing of it
    deltas = topics.physical(topics.REPLICATION_DELTAS, prefix)
    await produce(stack, edge, deltas, tag)
    shipped = next(r for r in await read_all(stack.kafka, deltas) if r.value == tag)
    with pytest.raises((RangeUnavailable, TopicAuthorizationFailedError)):
        await read_one(stack, deltas, shipped.partition, shipped.offset, edge)
    with pytest.raises(TopicAuthorizationFailedError):
        await produce(stack, edge, topics.dlq_of(deltas), tag)
    events = topics.physical(topics.REPLICATION_EVENTS, prefix)
    await produce(stack, security(stack, prefix, "replication"), events, tag)
    theirs = next(r for r in await read_all(stack.kafka, events) if r.value == tag)
    got: list[object] = []
    with pytest.raises(RangeUnavailable):  # the broker gives the edge no record of it
        async for batch in read_range(
            stack.kafka,
            events,
            theirs.partition,
            theirs.offset,
            theirs.offset,
            timeout=5,
            security=edge,
        ):
            got.extend(batch)
    assert got == []


async def test_an_agent_granted_by_an_earlier_version_loses_the_delta_topic_on_refresh(
    stack: Stack, prefix: str, certificates: EdgeCertificates, tmp_path: Path
) -> None:
    """Agents registered before replica feeds could read the whole delta topic; the
    registration service's refresh at start gives them their feed and takes that away."""
    producer_id, principal, _, edge = certified(certificates, "agent", tmp_path)
    earlier = edge_access("agent", producer_id)
    earlier = Access(
        writes=earlier.writes,
        reads=earlier.reads,
        groups=(),
        exact_groups=earlier.exact_groups,
        creates=False,
        range_reads=(topics.REPLICATION_DELTAS,),
    )
    admin = KafkaSecurity.from_env()
    await create_acls(stack.kafka, acls_for(principal, earlier, prefix), admin)
    deltas = topics.physical(topics.REPLICATION_DELTAS, prefix)
    tag = secrets.token_hex(8).encode()
    await produce(stack, admin, deltas, tag)
    shipped = next(r for r in await read_all(stack.kafka, deltas) if r.value == tag)

    async def reads_deltas() -> bool:
        try:
            return await read_one(stack, deltas, shipped.partition, shipped.offset, edge) == [tag]
        except (RangeUnavailable, TopicAuthorizationFailedError):
            return False

    await eventually(reads_deltas, timeout=20, what="the earlier version's ACLs taking effect")

    assert await certificates.refresh([(principal, "agent", producer_id)]) == 1

    async def refused() -> bool:
        return not await reads_deltas()

    await eventually(refused, timeout=20, what="the retired read of the delta topic removed")
    feed = topics.replica_feed(producer_id)
    await ensure_topics(stack.kafka, prefix, [feed], partitions=1, security=admin, dlq=False)
    physical = topics.physical(feed, prefix)
    await produce(stack, admin, physical, tag)
    ours = next(r for r in await read_all(stack.kafka, physical) if r.value == tag)
    assert await read_one(stack, physical, ours.partition, ours.offset, edge) == [tag]
    assert await certificates.refresh([(principal, "agent", producer_id)]) == 0  # idempotent


def test_the_stack_keeps_the_ca_key_to_itself() -> None:
    pki = Path(os.environ["DR_KAFKA_CA_FILE"]).parent
    assert (pki / "ca.key").stat().st_mode & 0o077 == 0
    assert pki.stat().st_mode & 0o077 == 0
