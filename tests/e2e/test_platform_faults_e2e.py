"""The platform's own outages are named as such: Kafka paused (SIGSTOP) leaves every edge
Connected (no Disconnected storm: registration suspends its missed-heartbeat clock) while
/healthz says Kafka is unreachable, and all recovers when the broker resumes; PostgreSQL
stopped turns requests into a 503 with the reason (never a 500), and they succeed again once
it is back."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from kit.dr import DrSetup, site_file
from kit.platform import Platform
from kit.poll import eventually
from kit.stack import REPO, Stack, fresh_database, random_prefix, stack_command
from shared import topics
from tests.support.kafka import read_all

pytestmark = pytest.mark.e2e

PAUSE_SECONDS = 30.0


@pytest.fixture
async def plat(stack: Stack, tmp_path: Path) -> AsyncIterator[Platform]:
    own = Platform(
        stack=stack,
        database_url=await fresh_database(stack, "pfaults"),
        prefix=random_prefix("pfaults"),
        log_dir=tmp_path,
    )
    try:
        yield own
    finally:
        await own.close()


def kafka_pid() -> int:
    state = Path(os.environ.get("DR_STATE_DIR") or REPO / ".state")
    return int((state / "kafka" / "kafka.pid").read_text().strip())


async def producers(http: httpx.AsyncClient, plat: Platform, vault_id: str) -> list[Any]:
    resp = await http.get(
        f"{plat.url('registration')}/v1/vaults/{vault_id}/producers", headers=plat.admin()
    )
    assert resp.status_code == 200, resp.text
    return list(resp.json())


async def health(http: httpx.AsyncClient, plat: Platform) -> dict[str, Any]:
    return dict((await http.get(f"{plat.url('registration')}/healthz")).json())


@pytest.mark.timeout(600)
async def test_kafka_paused_is_the_platforms_outage_not_the_edges(
    plat: Platform, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    plat.start("registration")
    dr = DrSetup(plat=plat, root=tmp_path)
    dr.vault_id = (await plat.new_vault(http, "pause"))["vault_id"]
    dr.key = (await plat.new_key(http, dr.vault_id))["key"]
    for host in ("hv-p1", "hv-p2"):
        dr.start_agent("primary", host)
    dr.start_provider("primary", site_file("primary", ["hv-p1", "hv-p2"]))

    async def all_connected() -> list[Any] | None:
        found = await producers(http, plat, dr.vault_id)
        ok = len(found) == 3 and all(p["connection_state"] == "Connected" for p in found)
        return found if ok else None

    await eventually(all_connected, timeout=90, what="two agents and a provider Connected")
    pid = kafka_pid()
    os.kill(pid, signal.SIGSTOP)
    paused_at = time.monotonic()
    try:

        async def kafka_reported_down() -> dict[str, Any] | None:
            report = await health(http, plat)
            return report if report["checks"]["kafka"].startswith("unreachable") else None

        report = await eventually(kafka_reported_down, timeout=20, what="/healthz: Kafka down")
        assert report["status"] == "degraded", report
        # the whole pause, several times the 3 missed heartbeats of 1 s: nobody Disconnected
        while time.monotonic() - paused_at < PAUSE_SECONDS:
            states = {
                p["name"]: p["connection_state"] for p in await producers(http, plat, dr.vault_id)
            }
            assert set(states.values()) == {"Connected"}, f"during the pause: {states}"
            await asyncio.sleep(1.0)  # sampling interval of the observation window
    finally:
        os.kill(pid, signal.SIGCONT)
    resumed = datetime.now(UTC)

    async def kafka_back() -> dict[str, Any] | None:
        report = await health(http, plat)
        return report if report["checks"]["kafka"] == "ok" else None

    await eventually(kafka_back, timeout=60, what="/healthz: Kafka reachable again")

    async def fresh_heartbeats() -> list[Any] | None:
        found = await producers(http, plat, dr.vault_id)
        assert all(p["connection_state"] == "Connected" for p in found), found
        late = [p for p in found if datetime.fromisoformat(p["last_heartbeat_at"]) <= resumed]
        return None if late else found

    await eventually(fresh_heartbeats, timeout=90, what="heartbeats after the pause")
    events = await read_all(plat.stack.kafka, plat.prefix + topics.REGISTRATION_EVENTS)
    flaps = [
        r.json()["payload"]
        for r in events
        if r.json()["type"] == "ProducerConnectionChanged"
        and r.json()["payload"]["state"] == "Disconnected"
    ]
    assert not flaps, f"Disconnected although only the broker paused: {flaps}"


async def test_postgres_down_is_a_503_with_the_reason(
    plat: Platform, http: httpx.AsyncClient
) -> None:
    plat.start("registration")
    vaults = f"{plat.url('registration')}/v1/vaults"
    assert (await http.get(vaults, headers=plat.admin())).status_code == 200
    await stack_command("pg-stop")
    try:
        resp = await http.get(vaults, headers=plat.admin())
        assert resp.status_code == 503, resp.text
        message = resp.json()["error"]["message"]
        assert "PostgreSQL" in message and "retry" in message, message
        assert int(resp.headers["retry-after"]) > 0
        report = await health(http, plat)
        assert report["checks"]["postgres"].startswith("error"), report
    finally:
        await stack_command("pg-start")

    async def answers_again() -> bool:
        return (await http.get(vaults, headers=plat.admin())).status_code == 200

    await eventually(answers_again, timeout=60, what="requests succeed after PostgreSQL is back")
    # retries of the background work are warnings; nothing failed (no error, no 500)
    log = plat.services["registration"].log_path.read_text(errors="replace").splitlines()
    errors = [line for line in log if '"level": "error"' in line or "Exception in ASGI" in line]
    assert not errors, errors[:3]
    assert any("dependency unavailable while answering" in line for line in log)
