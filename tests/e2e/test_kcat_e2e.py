"""The documented way for an upstream system to publish (docs/publishing-events.md), run for
real: the publisher registers with `scripts/publisher_register.py` (its own key pairs, a CSR,
the vault's registration key) and gets a Kafka certificate of its own (principal
`edge-<producer id>-g1`, its kind's ACLs); a heartbeat signed with `scripts/sign_event.py` and
produced with kcat with that certificate makes it Connected; a malformed record and a wrongly
signed one land in the DLQ with their reasons (read back with `kcat -C -f '%h'` as `admin`);
`--renew` gets a new certificate for the same principal that the same kcat options publish with.
Kafka refuses the publisher's record on a topic its kind may not write (registration.events.v1,
another kind's topic), and every record after `drctl site revoke`; without a certificate the
TLS handshake is refused."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shlex
import shutil
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509.oid import NameOID

from kit.platform import Platform
from kit.poll import eventually
from kit.procs import REPO, kafka_identity
from kit.stack import Stack
from shared import edge_pki, topics
from shared.kafka.producer import KafkaProducer
from tests.support.cli import run_drctl
from tests.support.kafka import read_all, wait_for_records
from tests.support.own_platform import own_platform

pytestmark = pytest.mark.e2e


@pytest.fixture(autouse=True)
def _tls_only() -> None:
    if os.environ.get("DR_KAFKA_SECURITY", "tls") != "tls":
        pytest.skip("the stack runs Kafka without TLS (KAFKA_SECURITY=plaintext)")


@pytest.fixture(scope="module")
async def platform(
    stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Platform]:
    """Its own prefix: the malformed records below must not reach other modules' readers."""
    plat = await own_platform(stack, "kcat", tmp_path_factory.mktemp("kcat-platform"))
    try:
        yield plat
    finally:
        await plat.close()


def kcat() -> str:
    found = shutil.which("kcat")
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("kcat is not installed (Debian package: kcat); CI must have it")
    pytest.skip("kcat is not installed (Debian package: kcat)")


def tls(principal: str, env: dict[str, str]) -> list[str]:
    """kcat's `-X` options for a platform principal's certificate (the operator: `admin`)."""
    identity = kafka_identity(env, principal)
    return [
        "-X", "security.protocol=ssl",
        "-X", f"ssl.ca.location={os.environ['DR_KAFKA_CA_FILE']}",
        "-X", f"ssl.certificate.location={identity['DR_KAFKA_CERT_FILE']}",
        "-X", f"ssl.key.location={identity['DR_KAFKA_KEY_FILE']}",
    ]  # fmt: skip


async def run(
    *args: str,
    stdin: bytes | None = None,
    timeout: float = 60,
    env: Mapping[str, str] | None = None,
) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *args,
        cwd=REPO,
        env=None if env is None else {**os.environ, **env},
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), timeout=timeout)
    return proc.returncode or 0, out.decode(), err.decode()


async def new_key_pair(private_key_file: Path) -> str:
    """`sign_event --new-key`, as the guide says: the private key into a 0600 file; returns
    the public key."""
    rc, out, err = await run(sys.executable, "-m", "scripts.sign_event", "--new-key")
    assert rc == 0, err
    pair = json.loads(out)
    fd = os.open(private_key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(pair["private_key"])
    return str(pair["public_key"])


def check_identity_files(folder: Path) -> dict[str, Any]:
    """The publisher's files are the owner's only; its certificate's CN is its principal (not
    the name it asked for) and it certifies the key in kafka.key, which was never sent."""
    identity: dict[str, Any] = json.loads((folder / "identity.json").read_text())
    for file in ("identity.json", "kafka.key", "kafka.pem"):
        assert (folder / file).stat().st_mode & 0o777 == 0o600, file
    assert folder.stat().st_mode & 0o077 == 0
    cert = x509.load_pem_x509_certificate((folder / "kafka.pem").read_bytes())
    principal = edge_pki.principal_of(identity["producer_id"], 1)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == principal
    key_pem = (folder / "kafka.key").read_text()
    assert key_pem == identity["kafka_key"] and "PRIVATE KEY" in key_pem
    assert cert.public_key() == load_pem_private_key(key_pem.encode(), None).public_key()
    return identity


async def register_publisher(
    platform: Platform, http: httpx.AsyncClient, folder: Path, kind: str, label: str
) -> tuple[dict[str, Any], list[str]]:
    """A vault and a publisher of `kind` registered in it with `scripts.publisher_register`,
    as the guide says; its identity file and kcat's options the tool printed."""
    registration = platform.start("registration")
    vault = await platform.new_vault(http, label)
    key = await platform.new_key(http, vault["vault_id"])
    name = f"{label}-{secrets.token_hex(3)}.contoso.local"
    rc, out, err = await run(
        sys.executable, "-m", "scripts.publisher_register", "--out", str(folder),
        "--name", name, "--kind", kind, "--site", "primary", "--heartbeat-seconds", "30",
        env={"DR_REGISTRATION_URL": registration.url, "DR_REGISTRATION_KEY": key["key"]},
    )  # fmt: skip
    assert rc == 0, err
    assert "Traceback" not in err, err
    identity = check_identity_files(folder)
    assert identity["vault_id"] == vault["vault_id"] and identity["kind"] == kind
    options = shlex.split(out.strip())
    assert f"ssl.certificate.location={folder / 'kafka.pem'}" in options
    assert f"ssl.key.location={folder / 'kafka.key'}" in options
    assert f"ssl.ca.location={os.environ['DR_KAFKA_CA_FILE']}" in options
    # registering again into the same folder is refused (the identity is kept)
    rc, _, err = await run(
        sys.executable, "-m", "scripts.publisher_register", "--out", str(folder),
        "--name", name, "--kind", kind,
        env={"DR_REGISTRATION_URL": registration.url, "DR_REGISTRATION_KEY": key["key"]},
    )  # fmt: skip
    assert rc == 1 and "already holds producer" in err, err
    assert check_identity_files(folder) == identity
    return identity, options


async def sign(identity_file: Path, type_name: str, payload: Path) -> str:
    """`sign_event --identity`: one signed envelope line."""
    rc, line, err = await run(
        sys.executable, "-m", "scripts.sign_event", "--identity", str(identity_file),
        "--type", type_name, "--payload", str(payload),
    )  # fmt: skip
    assert rc == 0, err
    assert line.count("\n") == 1 and json.loads(line)["signature"]
    return line


async def kcat_produce(
    platform: Platform, options: list[str], topic: str, key: str, records: str
) -> tuple[int, str, str]:
    return await run(
        kcat(), "-P", "-b", platform.stack.kafka, *options, "-X", "partitioner=murmur2_random",
        "-X", "message.timeout.ms=10000", "-t", topic, "-k", key, stdin=records.encode(),
    )  # fmt: skip


def refused(err: str) -> bool:
    """kcat's answer to a record the broker's ACLs refuse."""
    return "topic authorization failed" in err.lower()


async def test_publish_with_kcat(
    platform: Platform, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    binary = kcat()
    folder = tmp_path / "publisher"
    identity, publisher = await register_publisher(platform, http, folder, "agent", "hv-kcat")
    vault_id, producer_id = identity["vault_id"], identity["producer_id"]
    registration = platform.start("registration")
    heartbeats = topics.physical(topics.REGISTRATION_HEARTBEATS, platform.prefix)
    brokers = platform.stack.kafka
    operator = tls("admin", platform.env)

    # 1. a correctly signed heartbeat, built as the guide says, produced with kcat with the
    # publisher's own certificate
    payload = tmp_path / "heartbeat.json"
    payload.write_text(json.dumps({"kind": "agent", "sequence": 1, "interval_seconds": 30}))
    line = await sign(folder / "identity.json", "Heartbeat", payload)
    rc, _, err = await kcat_produce(platform, publisher, heartbeats, producer_id, line)
    assert rc == 0, err
    # the partition the platform's own producers (murmur2) would have chosen for that key
    sent = await wait_for_records(brokers, heartbeats, lambda r: r.value == line.strip().encode())
    probe = KafkaProducer(brokers, platform.prefix, "partition-probe")
    await probe.start()
    try:
        count = await probe.partition_count(topics.REGISTRATION_HEARTBEATS)
    finally:
        await probe.stop()
    assert sent[0].partition == topics.partition_for(producer_id.encode(), count)

    async def connected() -> bool:
        r = await http.get(
            f"{registration.url}/v1/vaults/{vault_id}/producers/{producer_id}",
            headers=platform.admin(),
        )
        return r.status_code == 200 and r.json()["connection_state"] == "Connected"

    await eventually(connected, timeout=30, what="the agent Connected by the kcat heartbeat")

    # 2. a malformed record and a record signed with another key -> DLQ with reasons
    tag = secrets.token_hex(4)
    other_key = tmp_path / "other.key"
    await new_key_pair(other_key)
    rc, forged, err = await run(
        sys.executable, "-m", "scripts.sign_event", "--private-key-file", str(other_key),
        "--vault", vault_id, "--producer", producer_id, "--type", "Heartbeat",
        "--payload", str(payload),
    )  # fmt: skip
    assert rc == 0, err
    records = f'{{"type": "Heartbeat", "oops-{tag}": \n{forged}'
    rc, _, err = await kcat_produce(platform, publisher, heartbeats, producer_id, records)
    assert rc == 0, err

    dlq = topics.dlq_of(heartbeats)
    found = await wait_for_records(
        brokers, dlq, lambda r: tag.encode() in r.value or r.value == forged.strip().encode(),
        count=2, timeout=30,
    )  # fmt: skip
    reasons = {r.headers["dlq.reason"] for r in found}
    assert "malformed_json" in reasons
    assert reasons == {"malformed_json", "bad_signature"}, reasons
    for r in found:
        assert r.headers["dlq.source.topic"] == topics.REGISTRATION_HEARTBEATS
        assert r.headers["dlq.consumer.group"].startswith(platform.prefix)

    # and the same headers as an operator reads them with kcat
    rc, out, err = await run(
        binary, "-C", "-b", brokers, *operator, "-t", dlq, "-o", "beginning", "-e", "-q",
        "-f", "%h\\n",
    )  # fmt: skip
    assert rc == 0, err
    assert "dlq.reason=malformed_json" in out

    # 3. renewal: a new key pair's certificate for the same principal, by the credential alone;
    # the same kcat options publish with it
    before = x509.load_pem_x509_certificate((folder / "kafka.pem").read_bytes())
    old_key = (folder / "kafka.key").read_text()
    rc, out, err = await run(
        sys.executable, "-m", "scripts.publisher_register", "--out", str(folder), "--renew",
        env={"DR_REGISTRATION_URL": registration.url, "DR_REGISTRATION_KEY": ""},
    )  # fmt: skip
    assert rc == 0, err
    assert shlex.split(out.strip()) == publisher
    renewed = check_identity_files(folder)
    after = x509.load_pem_x509_certificate((folder / "kafka.pem").read_bytes())
    assert after.serial_number != before.serial_number and after.subject == before.subject
    assert renewed["kafka_key"] != old_key and renewed["credential"] == identity["credential"]
    payload.write_text(json.dumps({"kind": "agent", "sequence": 2, "interval_seconds": 30}))
    line = await sign(folder / "identity.json", "Heartbeat", payload)
    rc, _, err = await kcat_produce(platform, publisher, heartbeats, producer_id, line)
    assert rc == 0, err
    await wait_for_records(brokers, heartbeats, lambda r: r.value == line.strip().encode())


async def test_a_publisher_writes_only_what_its_kind_may_and_nothing_once_revoked(
    platform: Platform, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    """A publisher registered as a site provider: its heartbeat is taken; Kafka refuses its
    records on registration.events.v1 and on an agent's topic (deltas) and, after
    `drctl site revoke`, on its own heartbeat topic; none of them reaches a topic."""
    folder = tmp_path / "publisher"
    identity, publisher = await register_publisher(platform, http, folder, "provider", "feed")
    vault_id, producer_id = identity["vault_id"], identity["producer_id"]
    registration = platform.start("registration")
    heartbeats = topics.physical(topics.REGISTRATION_HEARTBEATS, platform.prefix)
    payload = tmp_path / "heartbeat.json"
    payload.write_text(json.dumps({"kind": "provider", "sequence": 1, "interval_seconds": 30}))
    line = await sign(folder / "identity.json", "Heartbeat", payload)
    rc, _, err = await kcat_produce(platform, publisher, heartbeats, producer_id, line)
    assert rc == 0, err
    await wait_for_records(
        platform.stack.kafka, heartbeats, lambda r: r.value == line.strip().encode()
    )

    for topic in (topics.REGISTRATION_EVENTS, topics.REPLICATION_DELTAS):
        physical = topics.physical(topic, platform.prefix)
        tag = secrets.token_hex(6)
        rc, out, err = await kcat_produce(
            platform, publisher, physical, producer_id, f'{{"forged": "{tag}"}}\n'
        )
        assert refused(err), (topic, rc, out, err)
        assert all(
            tag.encode() not in r.value for r in await read_all(platform.stack.kafka, physical)
        )

    token = await platform.new_token(http, vault_id, "admin")
    env = {
        "PATH": os.environ.get("PATH", ""),
        "DR_REGISTRATION_URL": registration.url,
        "DR_TOKEN": token,
        "DR_VAULT": vault_id,
    }
    code, out, err = await run_drctl(
        env, "site", "revoke", producer_id, "--reason", "feed retired", "--json"
    )
    assert code == 0, err
    assert json.loads(out)["acls_deleted"] > 0

    tags: list[str] = []

    async def publish_refused() -> bool:
        tag = secrets.token_hex(6)
        tags.append(tag)
        _, _, err = await kcat_produce(
            platform, publisher, heartbeats, producer_id, f'{{"after-revoke": "{tag}"}}\n'
        )
        return refused(err)

    await eventually(publish_refused, timeout=30, what="Kafka refusing the revoked publisher")
    held = await read_all(platform.stack.kafka, heartbeats)
    assert all(tags[-1].encode() not in r.value for r in held)


async def test_kcat_without_a_certificate_is_refused(platform: Platform, tmp_path: Path) -> None:
    """The same publish with TLS but no client certificate: the broker refuses the
    handshake, kcat fails, and nothing reaches the topic."""
    binary = kcat()
    if os.environ.get("DR_KAFKA_SECURITY", "tls") != "tls":
        pytest.skip("the stack runs Kafka without TLS (KAFKA_SECURITY=plaintext)")
    platform.start("registration")  # the prefix's topics and ACLs exist
    heartbeats = topics.physical(topics.REGISTRATION_HEARTBEATS, platform.prefix)
    tag = secrets.token_hex(6)
    rc, out, err = await run(
        binary, "-P", "-b", platform.stack.kafka, "-t", heartbeats, "-k", tag,
        "-X", "security.protocol=ssl", "-X", f"ssl.ca.location={os.environ['DR_KAFKA_CA_FILE']}",
        "-X", "message.timeout.ms=5000",
        stdin=f'{{"uncredentialed": "{tag}"}}\n'.encode(),
    )  # fmt: skip
    assert rc != 0 or "failed" in err.lower(), (rc, out, err)
    rc, out, err = await run(
        binary, "-C", "-b", platform.stack.kafka, *tls("admin", platform.env), "-t", heartbeats,
        "-o", "beginning", "-e", "-q",
    )  # fmt: skip
    assert rc == 0, err
    assert tag not in out
