"""The platform's own outages are named as such: Kafka paused (SIGSTOP, 60 s) leaves every
edge Connected (no Disconnected storm: registration suspends its missed-heartbeat clock) while
the services' and the edges' /healthz say Kafka is unreachable, and all recovers when the
broker resumes, without losing data (every point verifies, the latest is the source byte for
byte); PostgreSQL stopped turns requests into a 503 with the reason (never a 500), leaves
every edge Connected too, and requests succeed again once it is back."""

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

from shared import topics
from tests.e2e.test_replication_e2e import materialise, point_after, sha256
from tests.e2e.test_replication_faults_e2e import all_verify
from tests.support.dr import DrSetup, item, protect, site_file, two_sites, vm_named
from tests.support.kafka import read_all
from tests.support.platform import Platform
from tests.support.poll import eventually
from tests.support.stack import REPO, Stack, fresh_database, random_prefix, stack_command

pytestmark = pytest.mark.e2e

PAUSE_SECONDS = 60.0
OUTAGE_SECONDS = 10.0


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


async def no_edge_disconnected(
    http: httpx.AsyncClient, plat: Platform, vault_id: str, *, since: datetime
) -> None:
    """Every edge heartbeats again after `since`, Connected, and none was ever Disconnected."""

    async def fresh_heartbeats() -> list[Any] | None:
        found = await producers(http, plat, vault_id)
        assert all(p["connection_state"] == "Connected" for p in found), found
        late = [p for p in found if datetime.fromisoformat(p["last_heartbeat_at"]) <= since]
        return None if late else found

    await eventually(fresh_heartbeats, timeout=90, what="heartbeats after the outage")
    events = await read_all(plat.stack.kafka, plat.prefix + topics.REGISTRATION_EVENTS)
    flaps = [
        r.json()["payload"]
        for r in events
        if r.json()["type"] == "ProducerConnectionChanged"
        and r.json()["payload"]["state"] == "Disconnected"
    ]
    assert not flaps, f"Disconnected although only the platform was down: {flaps}"


async def healthz(http: httpx.AsyncClient, url: str) -> dict[str, Any]:
    return dict((await http.get(f"{url}/healthz")).json())


async def health(http: httpx.AsyncClient, plat: Platform) -> dict[str, Any]:
    return await healthz(http, plat.url("registration"))


@pytest.mark.timeout(600)
async def test_kafka_paused_is_the_platforms_outage_not_the_edges(
    plat: Platform, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    dr = await two_sites(plat, http, tmp_path, copy_seconds=1)
    await dr.agent_call(http, "hv-p1", "POST", "/vms", {"name": "db01", "disks": ["2MiB", "1MiB"]})
    vm = await vm_named(http, dr, "db01")
    item_id = (await protect(http, dr, vm["vm_id"]))["item_id"]
    await dr.agent_call(http, "hv-p1", "POST", "/vms/db01/workload", {"blocks_per_second": 20})

    async def replicating() -> dict[str, Any] | None:
        found = await producers(http, plat, dr.vault_id)
        connected = len(found) == 4 and all(p["connection_state"] == "Connected" for p in found)
        current = await item(http, dr, item_id)
        return current if connected and (current["last_committed_seq"] or 0) >= 3 else None

    before = await eventually(replicating, timeout=90, what="four edges Connected, replicating")
    agent = dr.agents["hv-p1"].url
    pid = kafka_pid()
    os.kill(pid, signal.SIGSTOP)
    paused_at = time.monotonic()
    try:

        async def kafka_reported_down() -> dict[str, Any] | None:
            reports = [await health(http, plat), await healthz(http, agent)]
            down = all(r["checks"]["kafka"].startswith("unreachable") for r in reports)
            return {"service": reports[0], "agent": reports[1]} if down else None

        reports = await eventually(kafka_reported_down, timeout=20, what="/healthz: Kafka down")
        assert all(r["status"] == "degraded" for r in reports.values()), reports
        # the whole pause, many times the 3 missed heartbeats of 1 s: nobody Disconnected;
        # the item's RPO passes its threshold (30 s): Warning, naming the broker as the cause
        late: list[str] = []
        while time.monotonic() - paused_at < PAUSE_SECONDS:
            states = {
                p["name"]: p["connection_state"] for p in await producers(http, plat, dr.vault_id)
            }
            assert set(states.values()) == {"Connected"}, f"during the pause: {states}"
            current = await item(http, dr, item_id)
            if current["health"] == "Warning":
                late += [r for r in current["health_reasons"] if "cannot reach Kafka" in r]
            await asyncio.sleep(1.0)  # sampling interval of the observation window
        assert late and "RPO" in late[-1], late
    finally:
        os.kill(pid, signal.SIGCONT)
    resumed = datetime.now(UTC)

    async def kafka_back() -> bool:
        reports = [await health(http, plat), await healthz(http, agent)]
        return all(r["checks"]["kafka"] == "ok" for r in reports)

    await eventually(kafka_back, timeout=60, what="/healthz: Kafka reachable again")

    await no_edge_disconnected(http, plat, dr.vault_id, since=resumed)

    # No data lost: replication goes on, every point verifies, and with the writes stopped
    # the latest point materialises to the source disks byte for byte.
    async def caught_up() -> dict[str, Any] | None:
        current = await item(http, dr, item_id)
        moving = (current["last_committed_seq"] or 0) > before["last_committed_seq"] + 3
        return current if moving and current["state"] == "replicating" else None

    current = await eventually(caught_up, timeout=120, what="cycles committed after the pause")
    await dr.agent_call(http, "hv-p1", "POST", "/vms/db01/workload", {"blocks_per_second": 0})
    stopped_at = datetime.now().astimezone()
    source = {d["disk_id"]: sha256(Path(d["path"])) for d in current["disks"]}
    latest = await point_after(http, dr, item_id, stopped_at)
    got = await materialise(http, dr, item_id, latest["cycle_seq"], tmp_path / "latest")
    assert got == source, f"point {latest['cycle_seq']} differs from the source"
    await all_verify(http, dr, item_id)


async def test_postgres_down_is_a_503_with_the_reason(
    plat: Platform, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    plat.start("registration")
    dr = DrSetup(plat=plat, root=tmp_path)
    dr.vault_id = (await plat.new_vault(http, "pgdown"))["vault_id"]
    dr.key = (await plat.new_key(http, dr.vault_id))["key"]
    for host in ("hv-p1", "hv-p2"):
        dr.start_agent("primary", host)
    dr.start_provider("primary", site_file("primary", ["hv-p1", "hv-p2"]))

    async def all_connected() -> list[Any] | None:
        found = await producers(http, plat, dr.vault_id)
        ok = len(found) == 3 and all(p["connection_state"] == "Connected" for p in found)
        return found if ok else None

    await eventually(all_connected, timeout=90, what="two agents and a provider Connected")
    vaults = f"{plat.url('registration')}/v1/vaults"
    await stack_command("pg-stop")
    stopped_at = time.monotonic()
    try:
        resp = await http.get(vaults, headers=plat.admin())
        assert resp.status_code == 503, resp.text
        message = resp.json()["error"]["message"]
        assert "PostgreSQL" in message and "retry" in message, message
        assert int(resp.headers["retry-after"]) > 0
        report = await health(http, plat)
        assert report["checks"]["postgres"].startswith("error"), report
        # down for several times the 3 missed heartbeats of 1 s
        while time.monotonic() - stopped_at < OUTAGE_SECONDS:
            resp = await http.get(vaults, headers=plat.admin())
            assert resp.status_code == 503, resp.text
            await asyncio.sleep(1.0)  # sampling interval of the observation window
    finally:
        await stack_command("pg-start")
    back = datetime.now(UTC)

    async def answers_again() -> bool:
        return (await http.get(vaults, headers=plat.admin())).status_code == 200

    await eventually(answers_again, timeout=60, what="requests succeed after PostgreSQL is back")

    await no_edge_disconnected(http, plat, dr.vault_id, since=back)
    # retries of the background work are warnings; nothing failed (no error, no 500)
    log = plat.services["registration"].log_path.read_text(errors="replace").splitlines()
    errors = [line for line in log if '"level": "error"' in line or "Exception in ASGI" in line]
    assert not errors, errors[:3]
    assert any("dependency unavailable while answering" in line for line in log)
