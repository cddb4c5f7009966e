"""`make demo`: brings the platform up locally (no Docker) on the stack `make up` started, runs
the scripted DR scenario and prints what it verified, one `PASS <check>` or
`FAIL <check>: <why>` line per check, then exits non-zero if any check failed.

Every run uses a fresh database and topic prefix, so it can be repeated; logs of every process
go to `.state/demo/<run>/`.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from scripts import procs
from scripts.procs import REPO, Proc
from shared import signing, topics
from shared.kafka import KafkaProducer
from shared.schemas.envelope import new_envelope
from shared.schemas.registration import Heartbeat, ProducerKind

Check = Callable[[], Awaitable[str | None]]


def stack_env() -> dict[str, str]:
    env: dict[str, str] = {}
    path = Path(os.environ.get("DR_STATE_DIR", REPO / ".state")) / "stack.env"
    if path.exists():
        for line in path.read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep:
                env[key] = value
    for key in ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL"):
        if os.environ.get(key):
            env[key] = os.environ[key]
    return env


async def until(probe: Callable[[], Awaitable[Any]], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = await probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.25)


@dataclass
class Demo:
    kafka: str
    database_url: str
    run_dir: Path
    prefix: str = field(default_factory=lambda: f"demo{secrets.token_hex(3)}.")
    admin_token: str = field(default_factory=lambda: f"adm_{secrets.token_urlsafe(16)}")
    services: dict[str, Proc] = field(default_factory=dict)
    edges: dict[str, Proc] = field(default_factory=dict)
    results: list[tuple[str, str | None]] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        return {
            "KAFKA_BOOTSTRAP_SERVERS": self.kafka,
            "DATABASE_URL": self.database_url,
            "DR_TOPIC_PREFIX": self.prefix,
            "DR_ADMIN_TOKEN": self.admin_token,
            "DR_REGISTRATION_SWEEP_INTERVAL_SECONDS": "0.5",
        }

    async def check(self, what: str, step: Check) -> bool:
        """Run one check; it returns None (pass) or raises/returns why it failed."""
        try:
            why = await step()
        except Exception as exc:  # a demo check reports, it does not crash the demo
            why = f"{type(exc).__name__}: {exc}"
            (self.run_dir / "errors.log").open("a").write(traceback.format_exc())
        self.results.append((what, why))
        print(f"PASS {what}" if why is None else f"FAIL {what}: {why}", flush=True)
        return why is None

    def start_service(self, name: str) -> Proc:
        proc = procs.service(name, self.env, self.run_dir)
        self.services[name] = proc.start()
        return proc

    def start_edge(self, module: str, prefix: str, label: str, env: dict[str, str]) -> Proc:
        proc = procs.edge(module, prefix, {**self.env, **env}, self.run_dir, label)
        self.edges[label] = proc.start()
        return proc

    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    def url(self, service: str) -> str:
        return self.services[service].url

    def stop(self) -> None:
        for proc in [*self.edges.values(), *self.services.values()]:
            proc.stop()


async def registration_story(demo: Demo, http: httpx.AsyncClient) -> None:
    """Issue 2: vault, keys, two site providers and two host agents Connected, one stopped."""

    async def services_healthy() -> str | None:
        demo.start_service("registration")
        health = (await http.get(f"{demo.url('registration')}/healthz")).json()
        return None if health["status"] == "ok" else json.dumps(health)

    if not await demo.check("registration service started and healthy", services_healthy):
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
        return None

    if not await demo.check("vault created, operator token issued", vault):
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
    layout = [
        ("services.site_provider", "DR_PROVIDER_", "vmm-primary", "primary"),
        ("services.site_provider", "DR_PROVIDER_", "vmm-recovery", "recovery"),
        ("services.host_agent", "DR_AGENT_", "hv-primary-01", "primary"),
        ("services.host_agent", "DR_AGENT_", "hv-recovery-01", "recovery"),
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
            demo.start_edge(
                module, prefix, name, env | {f"{prefix}NAME": name, f"{prefix}SITE": site}
            )

        async def connected() -> bool:
            found = await producers()
            return len(found) == 4 and all(
                p["connection_state"] == "Connected" for p in found.values()
            )

        await until(connected, 30, "providers and agents Connected")
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
            json={"kind": "agent", "name": "hv-primary-01", "site": "primary"},
            headers={"Authorization": f"Bearer {demo.facts['registration_key']}"},
        )
        if resp.status_code != 409 or "force=true" not in resp.text:
            return f"{resp.status_code} {resp.text}"
        return None

    await demo.check(
        "re-registering a registered agent without force is refused (409)", refused_reregistration
    )

    async def forged_heartbeat() -> str | None:
        agent = demo.facts["producers"]["hv-recovery-01"]
        env = new_envelope(
            Heartbeat(kind=ProducerKind.AGENT, sequence=99, interval_seconds=1),
            vault_id=uuid.UUID(vid),
            producer_id=agent["producer_id"],
            signing_key=signing.derive_signing_key("drc_forged"),
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

        await until(dead_lettered, 20, "forged heartbeat dead-lettered")
        return None

    await demo.check("a forged heartbeat lands in the DLQ as bad_signature", forged_heartbeat)

    async def agent_disconnects() -> str | None:
        demo.edges["hv-primary-01"].stop()

        async def disconnected() -> bool:
            return (await producers())["hv-primary-01"]["connection_state"] == "Disconnected"

        await until(disconnected, 20, "stopped agent Disconnected")
        others = await producers()
        still = [n for n, p in others.items() if p["connection_state"] == "Connected"]
        return None if len(still) == 3 else f"connected: {still}"

    await demo.check("stopped agent shown Disconnected after missed heartbeats", agent_disconnects)


async def run() -> int:
    env = stack_env()
    if not env.get("KAFKA_BOOTSTRAP_SERVERS") or not env.get("DATABASE_URL"):
        print("FAIL stack: no .state/stack.env, no KAFKA_BOOTSTRAP_SERVERS/DATABASE_URL: `make up`")
        return 1
    run_id = time.strftime("%Y%m%d-%H%M%S")
    run_dir = REPO / ".state" / "demo" / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    db_name = f"demo_{run_id.replace('-', '_')}_{secrets.token_hex(2)}"
    try:
        conn = await asyncpg.connect(env["DATABASE_URL"], timeout=10)
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"FAIL stack: PostgreSQL at {env['DATABASE_URL']} unreachable ({exc}): run `make up`")
        return 1
    try:
        await conn.execute(f'CREATE DATABASE "{db_name}"')
    finally:
        await conn.close()
    base = env["DATABASE_URL"].rsplit("/", 1)[0]
    demo = Demo(
        kafka=env["KAFKA_BOOTSTRAP_SERVERS"], database_url=f"{base}/{db_name}", run_dir=run_dir
    )
    print(f"demo run {run_id}: logs in {run_dir.relative_to(REPO)}, topic prefix {demo.prefix}")
    try:
        async with httpx.AsyncClient(timeout=15) as http:
            await registration_story(demo, http)
    finally:
        demo.stop()
    failed = [what for what, why in demo.results if why is not None]
    print(f"\n{len(demo.results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed or not demo.results else 0


def main() -> None:
    sys.exit(asyncio.run(run()))


if __name__ == "__main__":
    main()
