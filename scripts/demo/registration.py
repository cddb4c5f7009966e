"""The demo's registration story: vault, keys, site providers and host agents."""

from __future__ import annotations

import json
import secrets
import time
import uuid
from typing import Any

import httpx

from kit.poll import eventually
from kit.procs import REPO
from scripts.demo.harness import PLATFORM_SERVICES, Demo
from shared import signing, topics
from shared.kafka.producer import KafkaProducer
from shared.schemas.envelope import new_envelope
from shared.schemas.registration import Heartbeat, ProducerKind


async def registration_story(demo: Demo, http: httpx.AsyncClient) -> None:
    """Registration: vault, keys, two site providers and two host agents Connected, one stopped."""

    async def services_healthy() -> str | None:
        for name in PLATFORM_SERVICES:
            demo.start_service(name)
        for name in PLATFORM_SERVICES:
            health = (await http.get(f"{demo.url(name)}/healthz")).json()
            if health["status"] != "ok":
                return f"{name}: {json.dumps(health)}"
        return None

    if not await demo.check(
        f"services started and healthy: {', '.join(PLATFORM_SERVICES)}", services_healthy
    ):
        return

    async def vault() -> str | None:
        resp = await http.post(
            f"{demo.url('registration')}/v1/vaults",
            json={"name": f"contoso-dr-{secrets.token_hex(2)}"},
            headers=demo.admin(),
        )
        if resp.status_code != 201:
            return resp.text
        demo.facts["vault_id"] = resp.json()["vault_id"]
        token = await http.post(
            f"{demo.url('registration')}/v1/vaults/{demo.facts['vault_id']}/tokens",
            json={"name": "operator-1", "role": "operator"},
            headers=demo.admin(),
        )
        demo.facts["operator_token"] = token.json()["token"]
        admin = await http.post(
            f"{demo.url('registration')}/v1/vaults/{demo.facts['vault_id']}/tokens",
            json={"name": "admin-1", "role": "admin"},
            headers=demo.admin(),
        )
        demo.facts["admin_token"] = admin.json()["token"]
        return None

    if not await demo.check("vault created, admin and operator tokens issued", vault):
        return
    vid = demo.facts["vault_id"]

    async def key() -> str | None:
        resp = await http.post(
            f"{demo.url('registration')}/v1/vaults/{vid}/registration-keys",
            json={},
            headers=demo.admin(),
        )
        body = resp.json()
        demo.facts["registration_key"] = body["key"]
        created = body["created_at"][:19]
        expires = body["expires_at"][:19]
        days = (
            time.mktime(time.strptime(expires, "%Y-%m-%dT%H:%M:%S"))
            - time.mktime(time.strptime(created, "%Y-%m-%dT%H:%M:%S"))
        ) / 86400
        return None if round(days) == 5 else f"key valid for {days:.2f} days, expected 5"

    await demo.check("registration key generated, valid 5 days", key)

    edge_env = {
        "REGISTRATION_KEY": demo.facts["registration_key"],
        "REGISTRATION_URL": demo.url("registration"),
        "HEARTBEAT_SECONDS": "1",
    }
    # Host agents are named like the hosts of the site files and use their storage folders,
    # so the VMs they run are the ones the providers discover.
    layout = [
        ("services.site_provider", "DR_PROVIDER_", "vmm-primary", "primary"),
        ("services.site_provider", "DR_PROVIDER_", "vmm-recovery", "recovery"),
        ("services.host_agent", "DR_AGENT_", "hv-p1", "primary"),
        ("services.host_agent", "DR_AGENT_", "hv-r1", "recovery"),
    ]

    async def producers() -> dict[str, Any]:
        resp = await http.get(
            f"{demo.url('registration')}/v1/vaults/{vid}/producers",
            headers={"Authorization": f"Bearer {demo.facts['operator_token']}"},
        )
        return {p["name"]: p for p in resp.json()}

    async def edges_connected() -> str | None:
        for module, prefix, name, site in layout:
            env = {f"{prefix}{k}": v for k, v in edge_env.items()}
            env |= {f"{prefix}NAME": name, f"{prefix}SITE": site}
            if prefix == "DR_PROVIDER_":
                env[f"{prefix}SITE_FILE"] = str(REPO / "deploy" / "sites" / f"{site}.yaml")
                env[f"{prefix}STORAGE_ROOT"] = str(demo.storage_root(site))
                env[f"{prefix}DISCOVERY_INTERVAL_SECONDS"] = "1"
            else:
                env[f"{prefix}STORAGE_DIR"] = str(demo.storage_root(site) / name)
            demo.start_edge(module, prefix, name, env)

        async def connected() -> bool:
            found = await producers()
            return len(found) == 4 and all(
                p["connection_state"] == "Connected" for p in found.values()
            )

        await eventually(
            connected, interval=0.25, timeout=30, what="providers and agents Connected"
        )
        found = await producers()
        demo.facts["producers"] = found
        kinds = sorted(p["kind"] for p in found.values())
        return None if kinds == ["agent", "agent", "provider", "provider"] else str(kinds)

    await demo.check(
        "primary + recovery site providers and 2 host agents Connected", edges_connected
    )

    async def refused_reregistration() -> str | None:
        resp = await http.post(
            f"{demo.url('registration')}/v1/registrations",
            json={
                "kind": "agent",
                "name": "hv-p1",
                "site": "primary",
                "public_key": signing.public_key_hex(signing.new_private_key()),
            },
            headers={"Authorization": f"Bearer {demo.facts['registration_key']}"},
        )
        if resp.status_code != 409 or "force=true" not in resp.text:
            return f"{resp.status_code} {resp.text}"
        return None

    await demo.check(
        "re-registering a registered agent without force is refused (409)", refused_reregistration
    )

    async def forged_heartbeat() -> str | None:
        agent = demo.facts["producers"]["hv-r1"]
        env = new_envelope(
            Heartbeat(kind=ProducerKind.AGENT, sequence=99, interval_seconds=1),
            vault_id=uuid.UUID(vid),
            producer_id=agent["producer_id"],
            signing_key=signing.new_private_key(),
        )
        producer = KafkaProducer(demo.kafka, demo.prefix, "demo")
        await producer.start()
        try:
            await producer.publish(
                env, key=agent["producer_id"], topic=topics.REGISTRATION_HEARTBEATS
            )
        finally:
            await producer.stop()

        async def dead_lettered() -> bool:
            text = (await http.get(f"{demo.url('registration')}/metrics")).text
            return 'reason="bad_signature"' in text

        await eventually(
            dead_lettered, interval=0.25, timeout=20, what="forged heartbeat dead-lettered"
        )
        return None

    await demo.check("a forged heartbeat lands in the DLQ as bad_signature", forged_heartbeat)

    async def agent_disconnects() -> str | None:
        demo.edges["hv-p1"].stop()

        async def disconnected() -> bool:
            return (await producers())["hv-p1"]["connection_state"] == "Disconnected"

        await eventually(disconnected, interval=0.25, timeout=20, what="stopped agent Disconnected")
        others = await producers()
        still = [n for n, p in others.items() if p["connection_state"] == "Connected"]
        return None if len(still) == 3 else f"connected: {still}"

    await demo.check("stopped agent shown Disconnected after missed heartbeats", agent_disconnects)

    async def agent_reconnects() -> str | None:
        demo.edges["hv-p1"].start(extra_env={"DR_AGENT_REGISTRATION_KEY": ""})

        async def connected() -> bool:
            return (await producers())["hv-p1"]["connection_state"] == "Connected"

        await eventually(connected, interval=0.25, timeout=30, what="restarted agent Connected")
        return None

    await demo.check("restarted agent reconnects with its saved credential", agent_reconnects)
