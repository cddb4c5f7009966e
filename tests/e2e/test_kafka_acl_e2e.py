"""Kafka authentication and ACLs on the real broker (a stack with KAFKA_SECURITY=tls): a client
without a certificate can neither produce nor consume; the edge principal cannot write
registration.events.v1 or a service's topic, nor read registration events; a service cannot
write another service's topic; each can do what its role needs. The edge reads offset ranges
of replication.deltas.v1 (a recovery host's replica feed) but not its DLQ's writes nor another
service topic's records."""

from __future__ import annotations

import os
import secrets
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAuthorizationFailedError

from kit.procs import kafka_identity
from kit.stack import Stack, delete_prefixed_topics, random_prefix
from shared import topics
from shared.kafka.ranges import RangeUnavailable, read_range
from shared.kafka.security import KafkaSecurity
from tests.support.kafka import read_all

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
async def prefix(stack: Stack) -> AsyncIterator[str]:
    """A fresh topic prefix with its topics and the platform's ACLs (granted as admin)."""
    if os.environ.get("DR_KAFKA_SECURITY", "tls") != "tls":
        pytest.skip("the stack runs Kafka without TLS (KAFKA_SECURITY=plaintext)")
    name = random_prefix("acl")
    kafka_identity({"DR_TOPIC_PREFIX": name, "KAFKA_BOOTSTRAP_SERVERS": stack.kafka}, "edge")
    yield name
    await delete_prefixed_topics(stack.kafka, name)


def security(stack: Stack, prefix: str, principal: str) -> KafkaSecurity:
    env = {"DR_TOPIC_PREFIX": prefix, "KAFKA_BOOTSTRAP_SERVERS": stack.kafka}
    identity = kafka_identity(env, principal)
    return KafkaSecurity(
        "tls",
        os.environ["DR_KAFKA_CA_FILE"],
        identity["DR_KAFKA_CERT_FILE"],
        identity["DR_KAFKA_KEY_FILE"],
    )


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
        ("edge", topics.REGISTRATION_EVENTS),
        ("edge", topics.POLICY_EVENTS),
        ("edge", topics.AGENT_COMMANDS),
        ("inventory", topics.REGISTRATION_EVENTS),
        ("policy", topics.REPLICATION_EVENTS),
    ],
)
async def test_a_principal_cannot_write_a_topic_that_is_not_its_own(
    stack: Stack, prefix: str, principal: str, topic: str
) -> None:
    physical = topics.physical(topic, prefix)
    tag = secrets.token_hex(8).encode()
    with pytest.raises(TopicAuthorizationFailedError):
        await produce(stack, security(stack, prefix, principal), physical, tag)
    assert all(tag not in r.value for r in await read_all(stack.kafka, physical))


async def test_the_edge_cannot_read_registration_events(stack: Stack, prefix: str) -> None:
    consumer = AIOKafkaConsumer(
        topics.physical(topics.REGISTRATION_EVENTS, prefix),
        bootstrap_servers=stack.kafka,
        group_id=f"{prefix}agent.reader",
        auto_offset_reset="earliest",
        **security(stack, prefix, "edge").client_options(),
    )
    with pytest.raises(TopicAuthorizationFailedError):
        try:
            await consumer.start()
            await consumer.getmany(timeout_ms=5_000)
        finally:
            await consumer.stop()


async def test_each_principal_writes_its_own_topics(stack: Stack, prefix: str) -> None:
    for principal, topic in (
        ("edge", topics.REGISTRATION_HEARTBEATS),
        ("edge", topics.REPLICATION_DELTAS),
        ("registration", topics.REGISTRATION_EVENTS),
        ("failover", topics.AGENT_COMMANDS),
    ):
        physical = topics.physical(topic, prefix)
        tag = secrets.token_hex(8).encode()
        await produce(stack, security(stack, prefix, principal), physical, tag)
        assert any(r.value == tag for r in await read_all(stack.kafka, physical)), principal


async def test_the_edge_reads_delta_ranges_and_only_those(stack: Stack, prefix: str) -> None:
    edge = security(stack, prefix, "edge")
    deltas = topics.physical(topics.REPLICATION_DELTAS, prefix)
    tag = secrets.token_hex(8).encode()
    await produce(stack, edge, deltas, tag)
    ours = next(r for r in await read_all(stack.kafka, deltas) if r.value == tag)
    read = [
        record.value
        for records in [
            batch
            async for batch in read_range(
                stack.kafka, deltas, ours.partition, ours.offset, ours.offset, security=edge
            )
        ]
        for record in records
    ]
    assert read == [tag]
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


def test_the_stack_keeps_the_ca_key_to_itself() -> None:
    pki = Path(os.environ["DR_KAFKA_CA_FILE"]).parent
    assert (pki / "ca.key").stat().st_mode & 0o077 == 0
    assert pki.stat().st_mode & 0o077 == 0
