"""Per-edge Kafka certificates on the real TLS broker: an edge registers with a CSR, gets its own
certificate and principal, and publishes with it; a re-registration cuts the old certificate
off; `drctl site revoke` makes Kafka refuse the revoked edge at once, its signed events go to
the DLQ with the reason and its credential re-registers nothing, while another edge keeps
working. Bad CSRs get a 4xx JSON error saying what to fix. A running edge renews its
certificate before it expires and opens new connections with the renewed one."""

from __future__ import annotations

import json
import os
import secrets
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka.errors import KafkaError, TopicAuthorizationFailedError
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import SecretStr

from kit.platform import Platform
from kit.poll import eventually
from kit.stack import Stack, stack_command
from shared import edge_pki, signing, topics
from shared.edge import SignedPublisher
from shared.edge_identity import (
    EdgeSettings,
    Identity,
    kafka_security,
    load_identity,
    register,
    renew_kafka_certificate,
)
from shared.kafka.producer import KafkaProducer
from shared.kafka.security import KafkaSecurity
from shared.schemas.envelope import new_envelope
from shared.schemas.registration import Heartbeat, ProducerKind
from tests.support.cli import run_drctl
from tests.support.kafka import produce, wait_for_records
from tests.support.own_platform import own_platform

pytestmark = pytest.mark.e2e


@pytest.fixture(autouse=True)
def _tls_only() -> None:
    if os.environ.get("DR_KAFKA_SECURITY", "tls") != "tls":
        pytest.skip("the stack runs Kafka without TLS (KAFKA_SECURITY=plaintext)")


def edge_settings(plat: Platform, key: str, name: str, state: Path, **extra: Any) -> EdgeSettings:
    return EdgeSettings(
        registration_url=plat.url("registration"),
        registration_key=SecretStr(key),
        name=name,
        site="primary",
        state_dir=state,
        heartbeat_seconds=60,
        kafka_bootstrap_servers=plat.stack.kafka,
        topic_prefix=plat.prefix,
        kafka_security="tls",
        kafka_ca_file=os.environ["DR_KAFKA_CA_FILE"],
        kafka_cert_file="",
        kafka_key_file="",
        **extra,
    )


class Edge:
    """A registered edge's own Kafka producer and signed publisher (the edge runtime's code)."""

    def __init__(self, settings: EdgeSettings, identity: Identity) -> None:
        self.settings = settings
        self.identity = identity
        self.producer = KafkaProducer(
            settings.kafka_bootstrap_servers,
            settings.topic_prefix,
            f"test-{identity.name}",
            linger_ms=0,
            security=kafka_security(settings, identity),
        )
        self.publisher = SignedPublisher(self.producer, identity)
        self.sequence = 0

    async def heartbeat(self) -> None:
        self.sequence += 1
        beat = Heartbeat(kind=self.identity.kind, sequence=self.sequence, interval_seconds=60)
        await self.publisher.publish(beat, key=str(self.identity.producer_id))


async def new_edge(plat: Platform, key: str, tmp: Path, kind: ProducerKind) -> Edge:
    name = f"{kind.value}-{secrets.token_hex(4)}.example"
    settings = edge_settings(plat, key, name, tmp / name)
    edge = Edge(settings, await register(settings, kind, {}))
    await edge.producer.start()
    return edge


async def producer_row(http: httpx.AsyncClient, plat: Platform, vault: str, pid: str) -> Any:
    resp = await http.get(
        f"{plat.url('registration')}/v1/vaults/{vault}/producers/{pid}", headers=plat.admin()
    )
    return resp.json() if resp.status_code == 200 else None


@pytest.fixture
async def vault(platform: Platform, http: httpx.AsyncClient) -> dict[str, Any]:
    platform.start("registration")
    v = await platform.new_vault(http, "certs")
    key = await platform.new_key(http, v["vault_id"])
    return {"vault_id": v["vault_id"], "key": key["key"]}


async def test_an_edge_gets_its_own_certificate_and_publishes_with_it(
    platform: Platform, http: httpx.AsyncClient, vault: dict[str, Any], tmp_path: Path
) -> None:
    agent = await new_edge(platform, vault["key"], tmp_path, ProducerKind.AGENT)
    provider = await new_edge(platform, vault["key"], tmp_path, ProducerKind.PROVIDER)
    try:
        assert agent.identity.kafka_certificate is not None
        leaf = x509.load_pem_x509_certificates(agent.identity.kafka_certificate.encode())[0]
        principal = edge_pki.principal_of(agent.identity.producer_id, 1)
        assert leaf.subject.rfc4514_string() == f"CN={principal}"
        await agent.heartbeat()
        await provider.heartbeat()

        async def connected() -> bool:
            rows = [
                await producer_row(http, platform, vault["vault_id"], str(e.identity.producer_id))
                for e in (agent, provider)
            ]
            return all(r and r["connection_state"] == "Connected" for r in rows)

        await eventually(connected, timeout=30, what="both edges Connected by their heartbeats")
        row = await producer_row(http, platform, vault["vault_id"], str(agent.identity.producer_id))
        assert row["kafka_principal"] == principal

        # as narrow as Kafka's ACLs go: an agent writes no discovery, no service topic; a
        # provider writes no deltas
        envelope = new_envelope(
            Heartbeat(kind=ProducerKind.AGENT, sequence=99, interval_seconds=60),
            vault_id=agent.identity.vault_id,
            producer_id=str(agent.identity.producer_id),
            signing_key=agent.identity.signing_key,
        ).to_bytes()
        for edge, topic in (
            (agent, topics.INVENTORY_DISCOVERY),
            (agent, topics.REGISTRATION_EVENTS),
            (provider, topics.REPLICATION_DELTAS),
        ):
            with pytest.raises(TopicAuthorizationFailedError):
                await edge.producer.send_and_wait(topic, envelope, key="x")

        # renewal: a new key pair and certificate for the same principal, by the credential
        renewed = await renew_kafka_certificate(agent.settings, agent.identity)
        assert renewed.kafka_key != agent.identity.kafka_key
        assert renewed.kafka_certificate is not None
        leaf = x509.load_pem_x509_certificates(renewed.kafka_certificate.encode())[0]
        assert leaf.subject.rfc4514_string() == f"CN={principal}"
        again = Edge(
            agent.settings.model_copy(update={"state_dir": agent.settings.state_dir / "r"}),
            renewed,
        )
        await again.producer.start()
        try:
            await again.heartbeat()
        finally:
            await again.producer.stop()
    finally:
        await agent.producer.stop()
        await provider.producer.stop()


async def test_a_re_registration_cuts_the_old_certificate_off(
    platform: Platform, http: httpx.AsyncClient, vault: dict[str, Any], tmp_path: Path
) -> None:
    old = await new_edge(platform, vault["key"], tmp_path, ProducerKind.AGENT)
    try:
        await old.heartbeat()
        forced = old.settings.model_copy(update={"force_register": True})
        renewed = await register(
            forced, ProducerKind.AGENT, {}, force=True, credential=old.identity.credential
        )
        assert renewed.generation == 2
        new = Edge(
            old.settings.model_copy(update={"state_dir": old.settings.state_dir / "g2"}), renewed
        )
        await new.producer.start()
        try:
            await new.heartbeat()

            async def old_refused() -> bool:
                try:
                    await old.heartbeat()
                except TopicAuthorizationFailedError:
                    return True
                return False

            await eventually(old_refused, timeout=20, what="Kafka refusing the old certificate")
            await new.heartbeat()
        finally:
            await new.producer.stop()
    finally:
        await old.producer.stop()


async def test_a_revoked_edge_is_refused_by_kafka_and_its_events_are_dead_lettered(
    platform: Platform, http: httpx.AsyncClient, vault: dict[str, Any], tmp_path: Path
) -> None:
    stolen = await new_edge(platform, vault["key"], tmp_path, ProducerKind.AGENT)
    other = await new_edge(platform, vault["key"], tmp_path, ProducerKind.AGENT)
    try:
        await stolen.heartbeat()
        await other.heartbeat()
        token = await platform.new_token(http, vault["vault_id"], "admin")
        env = {
            "PATH": os.environ.get("PATH", ""),
            "DR_REGISTRATION_URL": platform.url("registration"),
            "DR_TOKEN": token,
            "DR_VAULT": vault["vault_id"],
        }
        pid = str(stolen.identity.producer_id)
        code, out, err = await run_drctl(
            env, "site", "revoke", pid, "--reason", "host stolen", "--json"
        )
        assert code == 0, err
        answer = json.loads(out)
        assert answer["revoked_reason"] == "host stolen"
        assert answer["acls_deleted"] > 0

        # Kafka refuses the revoked edge's open connection ...
        async def refused() -> bool:
            try:
                await stolen.heartbeat()
            except TopicAuthorizationFailedError:
                return True
            return False

        await eventually(refused, timeout=20, what="Kafka refusing the revoked edge")
        # ... and a new one
        fresh = Edge(stolen.settings, stolen.identity)
        with pytest.raises(KafkaError):
            await fresh.producer.start()
            await fresh.heartbeat()
        await fresh.producer.stop()

        # a signed event of the revoked edge that reaches the topic anyway is dead-lettered
        tag = uuid.uuid4()
        envelope = new_envelope(
            Heartbeat(
                kind=ProducerKind.AGENT, sequence=7, interval_seconds=60, status={"t": str(tag)}
            ),
            vault_id=stolen.identity.vault_id,
            producer_id=pid,
            signing_key=stolen.identity.signing_key,
        )
        heartbeats = topics.physical(topics.REGISTRATION_HEARTBEATS, platform.prefix)
        await produce(platform.stack.kafka, heartbeats, envelope.to_bytes(), key=pid)
        [dead] = await wait_for_records(
            platform.stack.kafka,
            topics.physical(topics.dlq_of(topics.REGISTRATION_HEARTBEATS), platform.prefix),
            lambda r: str(tag).encode() in r.value,
        )
        assert dead.headers["dlq.reason"] == "producer_revoked"

        # its credential neither re-registers nor renews a certificate
        forced = stolen.settings.model_copy(update={"force_register": True})
        with pytest.raises(Exception, match=r"403.*revoked"):
            await register(
                forced, ProducerKind.AGENT, {}, force=True, credential=stolen.identity.credential
            )
        resp = await http.post(
            f"{platform.url('registration')}/v1/self/kafka-certificate",
            json={"kafka_csr": edge_pki.csr_pem(edge_pki.new_key(), stolen.identity.name)},
            headers={"Authorization": f"Bearer {stolen.identity.credential}"},
        )
        assert resp.status_code == 401, resp.text

        # the other edge keeps working, and revoking twice says so
        await other.heartbeat()
        code, out, err = await run_drctl(env, "site", "revoke", pid, "--reason", "again")
        assert code != 0 and "404" in out + err
    finally:
        await stolen.producer.stop()
        await other.producer.stop()


def _big_rsa_csr(name: str) -> str:
    return edge_pki.csr_pem(rsa.generate_private_key(65537, 5120), name)


@pytest.mark.parametrize(
    "csr, says",
    [
        (lambda name: "garbage", "not a PEM certificate signing request"),
        (lambda name: edge_pki.csr_pem(edge_pki.new_key(), "someone-else"), "CN="),
        (_big_rsa_csr, "5120 bits refused"),
        (lambda name: "A" * (edge_pki.MAX_CSR_CHARS + 1), "kafka_csr"),
    ],
    ids=["garbage", "wrong-cn", "too-large-key", "too-large-body"],
)
async def test_a_bad_csr_gets_a_4xx_saying_what_to_fix(
    platform: Platform, http: httpx.AsyncClient, vault: dict[str, Any], csr: Any, says: str
) -> None:
    name = f"agent-{secrets.token_hex(4)}.example"
    resp = await http.post(
        f"{platform.url('registration')}/v1/registrations",
        json={
            "kind": "agent",
            "name": name,
            "site": "primary",
            "public_key": signing.public_key_hex(signing.new_private_key()),
            "kafka_csr": csr(name),
        },
        headers={"Authorization": f"Bearer {vault['key']}"},
    )
    assert resp.status_code == 422, resp.text
    assert says in json.dumps(resp.json()["error"])
    listed = await http.get(
        f"{platform.url('registration')}/v1/vaults/{vault['vault_id']}/producers",
        headers=platform.admin(),
    )
    assert name not in {p["name"] for p in listed.json()}


SHORT_VALIDITY = timedelta(seconds=45)


def _leaf(identity: Identity) -> x509.Certificate:
    assert identity.kafka_certificate is not None
    return x509.load_pem_x509_certificate(identity.kafka_certificate.encode())


async def test_a_running_edge_renews_its_certificate_and_connects_with_it_after_expiry(
    stack: Stack, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    """A host agent whose certificate is valid 45 s renews it while it runs (new serial, known
    to the registration service), and once the first certificate has expired, a broker restart
    (every connection new) finds the agent publishing heartbeats again: its new connections
    present the renewed certificate, which the first one could no longer do."""
    plat = await own_platform(stack, "renew", tmp_path)
    try:
        plat.start(
            "registration",
            {"DR_REGISTRATION_EDGE_CERT_VALID_HOURS": str(SHORT_VALIDITY.total_seconds() / 3600)},
        )
        vault = await plat.new_vault(http, "renew")
        key = (await plat.new_key(http, vault["vault_id"]))["key"]
        label = f"hv-{secrets.token_hex(3)}"
        proc = plat.edge(
            "services.host_agent",
            "DR_AGENT_",
            label,
            {
                "DR_AGENT_REGISTRATION_KEY": key,
                "DR_AGENT_REGISTRATION_URL": plat.url("registration"),
                "DR_AGENT_NAME": label,
                "DR_AGENT_STORAGE_DIR": str(tmp_path / "storage"),
                "DR_AGENT_HEARTBEAT_SECONDS": "0.5",
            },
        ).start()
        state = Path(proc.env["DR_AGENT_STATE_DIR"])
        first = load_identity(state)
        assert first is not None and first.kafka_certificate is not None
        first_leaf = _leaf(first)
        first_expiry = first_leaf.not_valid_after_utc
        assert first_expiry - datetime.now(UTC) <= SHORT_VALIDITY
        due = edge_pki.renewal_due(first.kafka_certificate)
        pid = str(first.producer_id)

        async def renewed() -> tuple[Identity, datetime] | None:
            now = load_identity(state)
            assert now is not None
            return (now, datetime.now(UTC)) if _leaf(now) != first_leaf else None

        second, seen = await eventually(
            renewed, timeout=SHORT_VALIDITY.total_seconds() * 2, what="a renewed certificate"
        )
        print(f"renewal seen {(seen - due).total_seconds():.2f} s after it was due")
        second_leaf = _leaf(second)
        assert second_leaf.serial_number != first_leaf.serial_number
        assert second_leaf.subject == first_leaf.subject  # same principal, same ACLs
        assert second.kafka_key != first.kafka_key and second.credential == first.credential
        row = await producer_row(http, plat, vault["vault_id"], pid)
        latest = load_identity(state)
        assert latest is not None
        # the registration service's record: the renewed certificate's end
        recorded = datetime.fromisoformat(row["certificate_not_after"])
        assert any(
            abs((recorded - c.not_valid_after_utc).total_seconds()) < 1
            for c in (second_leaf, _leaf(latest))
        ), row
        assert recorded > first_expiry

        # wait past the first certificate's expiry: from now on it opens no connection
        async def first_expired() -> bool:
            return datetime.now(UTC) > first_expiry + timedelta(seconds=1)

        await eventually(first_expired, timeout=SHORT_VALIDITY.total_seconds() * 2)
        old = tmp_path / "old"
        old_cert, old_key = edge_pki.write_client_files(
            old, first.kafka_certificate, first.kafka_key or ""
        )
        expired = KafkaProducer(
            stack.kafka,
            plat.prefix,
            "expired",
            security=KafkaSecurity(
                "tls", os.environ["DR_KAFKA_CA_FILE"], str(old_cert), str(old_key)
            ),
        )
        with pytest.raises(KafkaError):
            await expired.start()
        await expired.stop()

        # every connection of the agent is new after a broker restart
        await stack_command("kafka-restart")
        restarted = datetime.now(UTC)
        heartbeats = topics.physical(topics.REGISTRATION_HEARTBEATS, plat.prefix)
        await wait_for_records(
            stack.kafka,
            heartbeats,
            lambda r: (
                r.json()["producer_id"] == pid
                and datetime.fromisoformat(r.json()["occurred_at"]) > restarted
            ),
            timeout=180,
        )
        assert proc.alive()
        health = (await http.get(f"{proc.url}/healthz")).json()
        assert health["checks"]["task:kafka-certificate"] == "running", health
        assert health["checks"]["kafka_certificate"] == "ok", health
        in_use = load_identity(state)
        assert in_use is not None and _leaf(in_use).serial_number != first_leaf.serial_number
    finally:
        await plat.close()
