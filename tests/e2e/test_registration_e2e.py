"""The registration story over HTTP and Kafka, services and edge processes as real processes,
with its failure paths."""

from __future__ import annotations

import hmac
import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kit.platform import Platform
from kit.poll import eventually
from shared import signing, topics
from shared.edge import SignedPublisher
from shared.edge_identity import Identity, identity_from
from shared.kafka.producer import KafkaProducer
from shared.schemas.envelope import Envelope, new_envelope
from shared.schemas.registration import Heartbeat, ProducerKind
from tests.support.kafka import Record, produce, wait_for_records

pytestmark = pytest.mark.e2e


async def producers(http: httpx.AsyncClient, plat: Platform, vault_id: str) -> dict[str, Any]:
    resp = await http.get(
        f"{plat.url('registration')}/v1/vaults/{vault_id}/producers", headers=plat.admin()
    )
    assert resp.status_code == 200, resp.text
    return {p["name"]: p for p in resp.json()}


async def register(
    http: httpx.AsyncClient,
    plat: Platform,
    key: str,
    *,
    private_key: Ed25519PrivateKey | None = None,
    admin: str | None = None,
    **body: Any,
) -> httpx.Response:
    """POST /v1/registrations with the public key of `private_key` (a new one if None), and
    `admin` (an admin token, needed to force) in the X-DR-Admin-Token header."""
    public_key = signing.public_key_hex(private_key or signing.new_private_key())
    return await http.post(
        f"{plat.url('registration')}/v1/registrations",
        json={"kind": "agent", "site": "primary", "public_key": public_key, **body},
        headers={"Authorization": f"Bearer {key}"} | ({"X-DR-Admin-Token": admin} if admin else {}),
    )


async def registration_events(
    plat: Platform, type_name: str, producer_id: str, count: int = 1
) -> list[Record]:
    """`type_name` events about `producer_id` on registration.events.v1, as anyone reads them."""
    return await wait_for_records(
        plat.stack.kafka,
        plat.prefix + topics.REGISTRATION_EVENTS,
        lambda r: (
            r.json()["type"] == type_name and r.json()["payload"]["producer_id"] == producer_id
        ),
        count=count,
    )


def event_types(records: list[Record]) -> list[str]:
    return [r.json()["type"] for r in records]


async def test_sites_and_agents_connect_and_a_stopped_agent_disconnects(
    platform: Platform, http: httpx.AsyncClient
) -> None:
    platform.start("registration")
    vault = await platform.new_vault(http)
    key = (await platform.new_key(http, vault["vault_id"]))["key"]
    common = {"REGISTRATION_KEY": key, "REGISTRATION_URL": platform.url("registration")}
    edges = []
    for module, prefix, name, site in (
        ("services.site_provider", "DR_PROVIDER_", "vmm-primary", "primary"),
        ("services.site_provider", "DR_PROVIDER_", "vmm-recovery", "recovery"),
        ("services.host_agent", "DR_AGENT_", "hv-primary-1", "primary"),
        ("services.host_agent", "DR_AGENT_", "hv-recovery-1", "recovery"),
    ):
        env = {f"{prefix}{k}": v for k, v in common.items()}
        env |= {f"{prefix}NAME": name, f"{prefix}SITE": site, f"{prefix}HEARTBEAT_SECONDS": "0.5"}
        edges.append(platform.edge(module, prefix, name, env).start())

    async def all_connected() -> dict[str, Any] | None:
        found = await producers(http, platform, vault["vault_id"])
        states = {n: p["connection_state"] for n, p in found.items()}
        return found if len(states) == 4 and set(states.values()) == {"Connected"} else None

    found = await eventually(all_connected, timeout=30, what="4 producers Connected")
    assert {p["kind"] for p in found.values()} == {"provider", "agent"}
    assert found["vmm-recovery"]["site"] == "recovery"

    agent = edges[2]
    # Graceful shutdown on SIGTERM (uvicorn re-raises the signal once it has shut down).
    assert agent.stop() in (0, -15), agent.tail()
    assert "Application shutdown complete" in agent.tail()

    async def agent_disconnected() -> bool:
        found = await producers(http, platform, vault["vault_id"])
        return found["hv-primary-1"]["connection_state"] == "Disconnected"

    await eventually(agent_disconnected, timeout=20, what="stopped agent Disconnected")
    still = await producers(http, platform, vault["vault_id"])
    assert still["hv-recovery-1"]["connection_state"] == "Connected"

    agent_id = found["hv-primary-1"]["producer_id"]
    changes = await registration_events(platform, "ProducerConnectionChanged", agent_id, 2)
    assert [r.json()["payload"]["state"] for r in changes] == ["Connected", "Disconnected"]

    # The agent comes back with its saved identity (no key needed) and reconnects.
    agent.start(extra_env={"DR_AGENT_REGISTRATION_KEY": ""})

    async def reconnected() -> bool:
        found = await producers(http, platform, vault["vault_id"])
        return found["hv-primary-1"]["connection_state"] == "Connected"

    await eventually(reconnected, timeout=20, what="restarted agent Connected again")


async def test_registration_keys_expire_and_can_be_revoked(
    platform: Platform, http: httpx.AsyncClient
) -> None:
    platform.start("registration")
    vault = await platform.new_vault(http)
    short = await platform.new_key(http, vault["vault_id"], valid_hours=0.0005)  # 1.8 s

    async def expired() -> httpx.Response | None:
        resp = await register(http, platform, short["key"], name=f"h-{uuid.uuid4().hex[:6]}")
        return resp if resp.status_code == 401 else None

    resp = await eventually(expired, timeout=15, what="key to expire")
    assert "expired" in resp.json()["error"]["message"]

    key = await platform.new_key(http, vault["vault_id"])
    assert key["expires_at"] > key["created_at"]
    revoke = await http.delete(
        f"{platform.url('registration')}/v1/vaults/{vault['vault_id']}/registration-keys/"
        f"{key['key_id']}",
        headers=platform.admin(),
    )
    assert revoke.status_code == 200 and revoke.json()["revoked_at"]
    resp = await register(http, platform, key["key"], name="after-revoke")
    assert resp.status_code == 401
    assert "revoked" in resp.json()["error"]["message"]

    resp = await register(http, platform, "drk_not-a-key", name="x")
    assert resp.status_code == 401
    assert "unknown registration key" in resp.json()["error"]["message"]

    listed = await http.get(
        f"{platform.url('registration')}/v1/vaults/{vault['vault_id']}/registration-keys",
        headers=platform.admin(),
    )
    assert all("key" not in k for k in listed.json()), "keys are shown once only"


async def test_forced_reregistration_replaces_the_credential_and_key_pair(
    platform: Platform, http: httpx.AsyncClient
) -> None:
    platform.start("registration")
    vault = await platform.new_vault(http)
    key = (await platform.new_key(http, vault["vault_id"]))["key"]
    old_key, new_key = signing.new_private_key(), signing.new_private_key()
    missing = await http.post(
        f"{platform.url('registration')}/v1/registrations",
        json={"kind": "agent", "site": "primary", "name": "hv-7"},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert missing.status_code == 422 and "public_key" in missing.json()["error"]["message"]
    not_a_key = await register(http, platform, key, name="hv-7", public_key="ab" * 16)
    assert not_a_key.status_code == 422 and "public_key" in not_a_key.json()["error"]["message"]
    first = await register(
        http, platform, key, name="hv-7", heartbeat_interval_seconds=30, private_key=old_key
    )
    assert first.status_code == 201, first.text
    again = await register(http, platform, key, name="hv-7")
    assert again.status_code == 409
    assert "force=true" in again.json()["error"]["message"]
    # forcing needs an admin token of the vault besides the key: the key alone can't cut the
    # registered agent off, nor can another vault's admin
    other = await platform.new_vault(http)
    for admin in (None, await platform.new_token(http, other["vault_id"], "admin")):
        refused = await register(
            http, platform, key, name="hv-7", force=True, private_key=new_key, admin=admin
        )
        assert refused.status_code == 403, refused.text
    assert (await http.get(
        f"{platform.url('registration')}/v1/self",
        headers={"Authorization": f"Bearer {first.json()['credential']}"},
    )).is_success  # fmt: skip
    vault_admin = await platform.new_token(http, vault["vault_id"], "admin")
    forced = await register(
        http, platform, key, name="hv-7", force=True, private_key=new_key, admin=vault_admin
    )
    assert forced.status_code == 201, forced.text
    old, new = first.json(), forced.json()
    assert new["producer_id"] == old["producer_id"]
    assert new["generation"] == old["generation"] + 1
    assert new["credential"] != old["credential"]

    me = f"{platform.url('registration')}/v1/self"
    assert (await http.get(me, headers={"Authorization": f"Bearer {new['credential']}"})).is_success
    stale = await http.get(me, headers={"Authorization": f"Bearer {old['credential']}"})
    assert stale.status_code == 401
    assert "re-registration" in stale.json()["error"]["message"]

    # registration.events.v1 carries each registration's public key and nothing to sign with
    registered = await registration_events(platform, "ProducerRegistered", old["producer_id"], 2)
    published = [r.json()["payload"] for r in registered]
    assert [p["public_key"] for p in published] == [
        signing.public_key_hex(old_key),
        signing.public_key_hex(new_key),
    ]
    assert all(
        set(p) & {"verification_key", "credential", "private_key"} == set() for p in published
    )

    # A heartbeat signed with the old private key is rejected to the DLQ; state unchanged.
    old_identity = identity_from(old, old_key)
    event_id = await publish_heartbeat(platform, old_identity)
    dlq = await wait_for_records(
        platform.stack.kafka,
        platform.prefix + topics.dlq_of(topics.REGISTRATION_HEARTBEATS),
        lambda r: r.event_id == str(event_id),
    )
    assert dlq[0].headers["dlq.reason"] == "bad_signature"
    found = await producers(http, platform, vault["vault_id"])
    assert found["hv-7"]["connection_state"] == "Disconnected"

    # The new key pair works: the consumer went on past the rejected record.
    await publish_heartbeat(platform, identity_from(new, new_key))

    async def connected() -> bool:
        return (await producers(http, platform, vault["vault_id"]))["hv-7"][
            "connection_state"
        ] == "Connected"

    await eventually(connected, timeout=20, what="re-registered agent Connected")


def write_legacy_identity(state: Path, reg: dict[str, Any]) -> None:
    """An identity file as edge processes saved it before Ed25519: credential, no key."""
    state.mkdir(parents=True)
    legacy = {k: reg[k] for k in ("producer_id", "vault_id", "kind", "name", "site")}
    legacy |= {"generation": reg["generation"], "credential": reg["credential"]}
    (state / "identity.json").write_text(json.dumps(legacy))


async def test_an_identity_from_before_ed25519_is_refused_or_re_registered(
    platform: Platform, http: httpx.AsyncClient
) -> None:
    """An agent whose identity file holds a credential and no private key (the retired HMAC
    scheme) refuses to start without its registration key, saying why; with the key it makes
    a key pair, re-registers (forced, same producer id) and connects."""
    platform.start("registration")
    vault = await platform.new_vault(http)
    key = (await platform.new_key(http, vault["vault_id"]))["key"]
    first = await register(http, platform, key, name="hv-legacy")
    assert first.status_code == 201, first.text
    reg = first.json()
    env = {
        "DR_AGENT_REGISTRATION_URL": platform.url("registration"),
        "DR_AGENT_NAME": "hv-legacy",
        "DR_AGENT_SITE": "primary",
        "DR_AGENT_HEARTBEAT_SECONDS": "0.5",
    }
    agent = platform.edge("services.host_agent", "DR_AGENT_", "hv-legacy", env)
    state = Path(agent.env["DR_AGENT_STATE_DIR"])
    write_legacy_identity(state, reg)

    agent.start(wait=False)

    async def exited() -> bool:
        return agent.popen is not None and agent.popen.poll() is not None

    await eventually(exited, timeout=30, what="agent with a legacy identity to stop")
    assert agent.popen is not None and agent.popen.returncode != 0
    assert "saved before Ed25519 event signatures" in agent.tail(80)
    found = await producers(http, platform, vault["vault_id"])
    assert found["hv-legacy"]["generation"] == 1

    agent.start(extra_env={"DR_AGENT_REGISTRATION_KEY": key})

    async def reconnected() -> dict[str, Any] | None:
        found = (await producers(http, platform, vault["vault_id"]))["hv-legacy"]
        return found if found["connection_state"] == "Connected" else None

    now = await eventually(reconnected, timeout=30, what="re-registered agent Connected")
    assert now["producer_id"] == reg["producer_id"] and now["generation"] == 2
    saved = json.loads((state / "identity.json").read_text())
    assert saved["generation"] == 2 and len(saved["private_key"]) == 64
    assert (state / "identity.json").stat().st_mode & 0o777 == 0o600


async def publish_heartbeat(platform: Platform, identity: Identity) -> uuid.UUID:
    producer = KafkaProducer(platform.stack.kafka, platform.prefix, "test")
    await producer.start()
    try:
        publisher = SignedPublisher(producer, identity)
        beat = Heartbeat(kind=identity.kind, sequence=1, interval_seconds=30)
        return await publisher.publish(beat, key=str(identity.producer_id))
    finally:
        await producer.stop()


async def test_bad_heartbeats_go_to_the_dlq_with_their_reason(
    platform: Platform, http: httpx.AsyncClient
) -> None:
    platform.start("registration")
    vault = await platform.new_vault(http)
    other_vault = await platform.new_vault(http, "other")
    key = (await platform.new_key(http, vault["vault_id"]))["key"]
    own_key, other_key = signing.new_private_key(), signing.new_private_key()
    reg = await register(
        http, platform, key, name="hv-bad", heartbeat_interval_seconds=30, private_key=own_key
    )
    reg = reg.json()
    neighbour = await register(http, platform, key, name="hv-neighbour", private_key=other_key)
    assert neighbour.status_code == 201, neighbour.text
    producer_id = reg["producer_id"]
    topic = platform.prefix + topics.REGISTRATION_HEARTBEATS
    beat = Heartbeat(kind=ProducerKind.AGENT, sequence=1, interval_seconds=30)

    def envelope(vault_id: str, key: Ed25519PrivateKey | None, pid: str = producer_id) -> Envelope:
        return new_envelope(beat, vault_id=uuid.UUID(vault_id), producer_id=pid, signing_key=key)

    # What anyone reading registration.events.v1 has: the producer's public key. Used as a
    # private key it signs nothing that verifies.
    registered = await registration_events(platform, "ProducerRegistered", producer_id)
    published_key = registered[0].json()["payload"]["public_key"]
    assert published_key == signing.public_key_hex(own_key)
    from_the_topic = envelope(vault["vault_id"], signing.load_private_key(published_key))
    # The retired HMAC scheme: a 64-digit signature over the same canonical JSON.
    unsigned = envelope(vault["vault_id"], None)
    hmac_signed = {
        **unsigned.model_dump(mode="json"),
        "signature": hmac.new(
            bytes.fromhex(published_key), signing.canonical_json(unsigned.signed_fields()), "sha256"
        ).hexdigest(),
    }
    forged = envelope(vault["vault_id"], signing.new_private_key())
    neighbours_key = envelope(vault["vault_id"], other_key)
    other = envelope(other_vault["vault_id"], own_key)
    stranger = envelope(vault["vault_id"], own_key, pid=str(uuid.uuid4()))
    cases = {
        b"{not json": "malformed_json",
        json.dumps({"type": "Heartbeat"}).encode(): "invalid_envelope",
        forged.to_bytes(): "bad_signature",
        neighbours_key.to_bytes(): "bad_signature",
        from_the_topic.to_bytes(): "bad_signature",
        json.dumps(hmac_signed).encode(): "invalid_envelope",
        unsigned.to_bytes(): "unsigned",
        other.to_bytes(): "vault_mismatch",
        stranger.to_bytes(): "unknown_producer",
    }
    marker = f"k-{uuid.uuid4().hex[:8]}"
    for value in cases:
        await produce(platform.stack.kafka, topic, value, key=marker)
    dlq = await wait_for_records(
        platform.stack.kafka, topics.dlq_of(topic), lambda r: r.key == marker, count=len(cases)
    )
    assert sorted(r.headers["dlq.reason"] for r in dlq) == sorted(cases.values())
    for record in dlq:
        assert record.headers["dlq.source.topic"] == topics.REGISTRATION_HEARTBEATS
        assert cases[record.value] == record.headers["dlq.reason"]
        if record.value == json.dumps(hmac_signed).encode():
            assert "retired HMAC scheme" in record.headers["dlq.detail"]
    found = await producers(http, platform, vault["vault_id"])
    assert found["hv-bad"]["connection_state"] == "Disconnected"
    assert found["hv-bad"]["last_heartbeat_at"] is None

    # Replaying a valid heartbeat applies it once; the replay is skipped as a duplicate.
    valid = envelope(vault["vault_id"], own_key)
    for _ in range(2):
        await produce(platform.stack.kafka, topic, valid.to_bytes(), key=producer_id)

    async def connected() -> bool:
        return (await producers(http, platform, vault["vault_id"]))["hv-bad"][
            "connection_state"
        ] == "Connected"

    await eventually(connected, timeout=20, what="valid heartbeat applied after bad ones")
    metrics = (await http.get(f"{platform.url('registration')}/metrics")).text
    assert (
        'dr_dlq_messages_total{reason="bad_signature",topic="registration.heartbeats.v1"}'
        in metrics
    )


async def test_http_refusals_say_what_to_fix(platform: Platform, http: httpx.AsyncClient) -> None:
    base = platform.start("registration").url
    vault = await platform.new_vault(http)
    vid = vault["vault_id"]
    other = await platform.new_vault(http, "other")
    reader = await platform.new_token(http, vid, "reader")
    operator = await platform.new_token(http, vid, "operator")
    admin = await platform.new_token(http, vid, "admin")
    foreign_admin = await platform.new_token(http, other["vault_id"], "admin")

    def bearer(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    no_token = await http.get(f"{base}/v1/vaults/{vid}/producers")
    assert no_token.status_code == 401
    assert "Authorization: Bearer" in no_token.json()["error"]["message"]
    bad_token = await http.get(f"{base}/v1/vaults/{vid}/producers", headers=bearer("drt_nope"))
    assert bad_token.status_code == 401

    assert (await http.get(f"{base}/v1/vaults/{vid}/producers", headers=bearer(reader))).is_success
    for token in (reader, operator):
        resp = await http.post(
            f"{base}/v1/vaults/{vid}/registration-keys", json={}, headers=bearer(token)
        )
        assert resp.status_code == 403
        assert "needs admin" in resp.json()["error"]["message"]
    resp = await http.get(f"{base}/v1/vaults/{vid}/producers", headers=bearer(foreign_admin))
    assert resp.status_code == 403
    assert "another vault" in resp.json()["error"]["message"]
    resp = await http.post(f"{base}/v1/vaults", json={"name": "nope"}, headers=bearer(admin))
    assert resp.status_code == 403

    url = f"{base}/v1/vaults/{vid}/tokens"
    resp = await http.post(
        url,
        content=b'{"name": "x", "role": ',
        headers={**bearer(admin), "content-type": "application/json"},
    )
    assert resp.status_code == 400
    assert "malformed JSON" in resp.json()["error"]["message"]
    resp = await http.post(
        url, json={"name": "x", "role": "reader", "scope": "all"}, headers=bearer(admin)
    )
    assert resp.status_code == 422
    assert "unknown field 'scope'" in resp.json()["error"]["message"]
    resp = await http.post(url, json={"name": "x", "role": "superuser"}, headers=bearer(admin))
    assert resp.status_code == 422
    assert "role" in resp.json()["error"]["message"]
    resp = await http.post(url, content=b"name=x", headers=bearer(admin))
    assert resp.status_code == 415
    resp = await http.post(
        url,
        content=b'{"name": "' + b"x" * 2_000_000 + b'"}',
        headers={**bearer(admin), "content-type": "application/json"},
    )
    assert resp.status_code == 413
    assert "too large" in resp.json()["error"]["message"]

    # A revoked token stops working at once.
    created = await http.post(url, json={"name": "temp", "role": "reader"}, headers=bearer(admin))
    temp = created.json()
    assert (await http.get(f"{base}/v1/vaults/{vid}", headers=bearer(temp["token"]))).is_success
    await http.delete(f"{url}/{temp['token_id']}", headers=bearer(admin))
    assert (
        await http.get(f"{base}/v1/vaults/{vid}", headers=bearer(temp["token"]))
    ).status_code == 401
    listed = await http.get(url, headers=bearer(admin))
    assert all("token" not in t for t in listed.json()), "tokens are shown once only"

    spec = (await http.get(f"{base}/openapi.json")).json()
    assert "/v1/registrations" in spec["paths"]
    health = (await http.get(f"{base}/healthz")).json()
    assert health["status"] == "ok"
