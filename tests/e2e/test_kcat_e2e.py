"""The documented way for an upstream system to publish (docs/publishing-events.md), run for
real: an agent registered through the registration service, a heartbeat signed with
`scripts/sign_event.py` and produced with kcat makes it Connected; a malformed record and a
wrongly signed one produced with kcat land in the DLQ with their reasons (read back with
`kcat -C -f '%h'`). kcat authenticates with a client certificate as the guide shows (the
publisher as `edge`, the operator reading the DLQ as `admin`); without one it is refused."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from kit.platform import Platform
from kit.poll import eventually
from kit.procs import REPO, kafka_identity
from kit.stack import Stack
from shared import topics
from shared.kafka.producer import KafkaProducer
from tests.support.kafka import wait_for_records
from tests.support.own_platform import own_platform

pytestmark = pytest.mark.e2e


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
    """kcat's `-X` options for `principal`'s certificate (none on a plaintext stack)."""
    identity = kafka_identity(env, principal)
    if not identity:
        return []
    return [
        "-X", "security.protocol=ssl",
        "-X", f"ssl.ca.location={os.environ['DR_KAFKA_CA_FILE']}",
        "-X", f"ssl.certificate.location={identity['DR_KAFKA_CERT_FILE']}",
        "-X", f"ssl.key.location={identity['DR_KAFKA_KEY_FILE']}",
    ]  # fmt: skip


async def run(*args: str, stdin: bytes | None = None, timeout: float = 60) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *args,
        cwd=REPO,
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


async def test_publish_with_kcat(
    platform: Platform, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    binary = kcat()
    registration = platform.start("registration")
    vault = await platform.new_vault(http, "kcat")
    vault_id = vault["vault_id"]
    key = await platform.new_key(http, vault_id)
    name = f"hv-kcat-{secrets.token_hex(3)}.contoso.local"
    # the publisher makes its key pair, keeps the private key and registers the public one
    private_key = tmp_path / "publisher.key"
    public_key = await new_key_pair(private_key)
    resp = await http.post(
        f"{registration.url}/v1/registrations",
        json={
            "kind": "agent",
            "name": name,
            "site": "primary",
            "heartbeat_interval_seconds": 30,
            "public_key": public_key,
        },
        headers={"Authorization": f"Bearer {key['key']}"},
    )
    assert resp.status_code == 201, resp.text
    agent = resp.json()
    producer_id = agent["producer_id"]
    assert agent["connection_state"] == "Disconnected"

    heartbeats = topics.physical(topics.REGISTRATION_HEARTBEATS, platform.prefix)
    brokers = platform.stack.kafka
    publisher, operator = tls("edge", platform.env), tls("admin", platform.env)

    # 1. a correctly signed heartbeat, built as the guide says, produced with kcat
    payload = tmp_path / "heartbeat.json"
    payload.write_text(json.dumps({"kind": "agent", "sequence": 1, "interval_seconds": 30}))
    rc, line, err = await run(
        sys.executable, "-m", "scripts.sign_event", "--private-key-file", str(private_key),
        "--vault", vault_id, "--producer", producer_id, "--type", "Heartbeat",
        "--payload", str(payload),
    )  # fmt: skip
    assert rc == 0, err
    assert line.count("\n") == 1 and json.loads(line)["signature"]
    rc, _, err = await run(
        binary, "-P", "-b", brokers, *publisher, "-X", "partitioner=murmur2_random",
        "-t", heartbeats, "-k", producer_id, stdin=line.encode(),
    )  # fmt: skip
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
    rc, _, err = await run(
        binary,
        "-P",
        "-b",
        brokers,
        *publisher,
        "-t",
        heartbeats,
        "-k",
        f"{producer_id}",
        stdin=records.encode(),
    )
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
