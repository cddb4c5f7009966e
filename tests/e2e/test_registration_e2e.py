"""The registration story over HTTP and Kafka, services and edge processes as real processes,
with its failure paths."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import pytest

from shared import signing, topics
from shared.edge import Identity, SignedPublisher
from shared.kafka import KafkaProducer
from shared.schemas.envelope import new_envelope
from shared.schemas.registration import Heartbeat, ProducerKind
from tests.support.kafka import Record, produce, wait_for_records
from tests.support.platform import Platform
from tests.support.poll import eventually

pytestmark = pytest.mark.e2e


async def producers(http: httpx.AsyncClient, plat: Platform, vault_id: str) -> dict[str, Any]:
    resp = await http.get(
        f"{plat.url('registration')}/v1/vaults/{vault_id}/producers", headers=plat.admin()
    )
    assert resp.status_code == 200, resp.text
    return {p["name"]: p for p in resp.json()}


async def register(
    http: httpx.AsyncClient, plat: Platform, key: str, **body: Any
) -> httpx.Response:
    return await http.post(
        f"{plat.url('registration')}/v1/registrations",
        json={"kind": "agent", "site": "primary", **body},
        headers={"Authorization": f"Bearer {key}"},
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
    changes = await wait_for_records(
        platform.stack.kafka,
        platform.prefix + topics.REGISTRATION_EVENTS,
        lambda r: (
            r.json()["type"] == "ProducerConnectionChanged"
            and r.json()["payload"]["producer_id"] == agent_id
        ),
        count=2,
    )
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


async def test_forced_reregistration_replaces_the_credential(
    platform: Platform, http: httpx.AsyncClient
) -> None:
    platform.start("registration")
    vault = await platform.new_vault(http)
    key = (await platform.new_key(http, vault["vault_id"]))["key"]
    first = await register(http, platform, key, name="hv-7", heartbeat_interval_seconds=30)
    assert first.status_code == 201, first.text
    again = await register(http, platform, key, name="hv-7")
    assert again.status_code == 409
    assert "force=true" in again.json()["error"]["message"]
    # forcing needs an admin token of the vault besides the key: the key alone can't cut the
    # registered agent off, nor can another vault's admin
    other = await platform.new_vault(http)
    for admin in (None, await platform.new_token(http, other["vault_id"], "admin")):
        refused = await http.post(
            f"{platform.url('registration')}/v1/registrations",
            json={"kind": "agent", "site": "primary", "name": "hv-7", "force": True},
            headers={"Authorization": f"Bearer {key}"}
            | ({"X-DR-Admin-Token": admin} if admin else {}),
        )
        assert refused.status_code == 403, refused.text
    assert (await http.get(
        f"{platform.url('registration')}/v1/self",
        headers={"Authorization": f"Bearer {first.json()['credential']}"},
    )).is_success  # fmt: skip
    vault_admin = await platform.new_token(http, vault["vault_id"], "admin")
    forced = await http.post(
        f"{platform.url('registration')}/v1/registrations",
        json={"kind": "agent", "site": "primary", "name": "hv-7", "force": True},
        headers={"Authorization": f"Bearer {key}", "X-DR-Admin-Token": vault_admin},
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

    # A heartbeat signed with the old credential is rejected to the DLQ; state unchanged.
    old_identity = Identity(
        producer_id=old["producer_id"],
        vault_id=vault["vault_id"],
        kind=ProducerKind.AGENT,
        name="hv-7",
        site="primary",
        generation=old["generation"],
        credential=old["credential"],
    )
    event_id = await publish_heartbeat(platform, old_identity)
    dlq = await wait_for_records(
        platform.stack.kafka,
        platform.prefix + topics.dlq_of(topics.REGISTRATION_HEARTBEATS),
        lambda r: r.json().get("event_id") == str(event_id),
    )
    assert dlq[0].headers["dlq.reason"] == "bad_signature"
    found = await producers(http, platform, vault["vault_id"])
    assert found["hv-7"]["connection_state"] == "Disconnected"

    # The new credential works: the consumer went on past the rejected record.
    await publish_heartbeat(
        platform, old_identity.model_copy(update={"credential": new["credential"]})
    )

    async def connected() -> bool:
        return (await producers(http, platform, vault["vault_id"]))["hv-7"][
            "connection_state"
        ] == "Connected"

    await eventually(connected, timeout=20, what="re-registered agent Connected")


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
    reg = (await register(http, platform, key, name="hv-bad", heartbeat_interval_seconds=30)).json()
    producer_id = reg["producer_id"]
    signing_key = signing.derive_signing_key(reg["credential"])
    topic = platform.prefix + topics.REGISTRATION_HEARTBEATS
    beat = Heartbeat(kind=ProducerKind.AGENT, sequence=1, interval_seconds=30)

    def envelope(vault_id: str, key: str | None, pid: str = producer_id) -> Any:
        return new_envelope(beat, vault_id=uuid.UUID(vault_id), producer_id=pid, signing_key=key)

    forged = envelope(vault["vault_id"], signing.derive_signing_key("drc_forged"))
    unsigned = envelope(vault["vault_id"], None)
    other = envelope(other_vault["vault_id"], signing_key)
    stranger = envelope(vault["vault_id"], signing_key, pid=str(uuid.uuid4()))
    cases = {
        b"{not json": "malformed_json",
        json.dumps({"type": "Heartbeat"}).encode(): "invalid_envelope",
        forged.to_bytes(): "bad_signature",
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
    found = await producers(http, platform, vault["vault_id"])
    assert found["hv-bad"]["connection_state"] == "Disconnected"
    assert found["hv-bad"]["last_heartbeat_at"] is None

    # Replaying a valid heartbeat applies it once; the replay is skipped as a duplicate.
    valid = envelope(vault["vault_id"], signing_key)
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
