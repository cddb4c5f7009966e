"""The platform's own outages are named as such: Kafka paused (SIGSTOP, 60 s) leaves every
edge Connected (no Disconnected storm: registration suspends its missed-heartbeat clock) while
the services' and the edges' /healthz say Kafka is unreachable, and all recovers when the
broker resumes, without losing data (every point verifies, the latest is the source byte for
byte); PostgreSQL stopped turns requests into a 503 with the reason (never a 500), leaves
every edge Connected too, and requests succeed again once it is back, with no data lost."""

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

from kit.dr import DrSetup, item, protect, two_sites, vm_named
from kit.platform import Platform
from kit.poll import eventually
from kit.stack import REPO, Stack, fresh_database, random_prefix, stack_command
from shared import topics
from tests.e2e.test_replication_faults_e2e import no_data_lost
from tests.support.kafka import read_all

pytestmark = pytest.mark.e2e

PAUSE_SECONDS = 60.0
OUTAGE_SECONDS = 15.0
# 3 missed heartbeats of 2 s (6 s): well within each outage, and above the stalls a loaded
# test machine gives an edge process
HEARTBEAT_SECONDS = 2.0


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


async def replicating_item(
    plat: Platform, http: httpx.AsyncClient, root: Path
) -> tuple[DrSetup, str]:
    """Two sites (two agents, two providers), a VM with a workload, replicating: the setup
    and the item id, once four edges are Connected and three points committed."""
    dr = await two_sites(plat, http, root, copy_seconds=1, heartbeat_seconds=HEARTBEAT_SECONDS)
    await dr.agent_call(http, "hv-p1", "POST", "/vms", {"name": "db01", "disks": ["2MiB", "1MiB"]})
    vm = await vm_named(http, dr, "db01")
    item_id = (await protect(http, dr, vm["vm_id"]))["item_id"]
    await dr.agent_call(http, "hv-p1", "POST", "/vms/db01/workload", {"blocks_per_second": 20})

    async def replicating() -> dict[str, Any] | None:
        found = await producers(http, plat, dr.vault_id)
        connected = len(found) == 4 and all(p["connection_state"] == "Connected" for p in found)
        current = await item(http, dr, item_id)
        return current if connected and (current["last_committed_seq"] or 0) >= 3 else None

    await eventually(replicating, timeout=90, what="four edges Connected, replicating")
    return dr, item_id


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
    dr, item_id = await replicating_item(plat, http, tmp_path)
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
        # the whole pause, many times 3 missed heartbeats: nobody Disconnected;
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

    await no_data_lost(http, dr, item_id, tmp_path)


async def test_postgres_killed_is_a_503_with_the_reason(
    plat: Platform, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    dr, item_id = await replicating_item(plat, http, tmp_path)
    vaults = f"{plat.url('registration')}/v1/vaults"
    await stack_command("pg-kill")  # kill -9: no shutdown, the restart replays the WAL
    stopped_at = time.monotonic()
    try:
        resp = await http.get(vaults, headers=plat.admin())
        assert resp.status_code == 503, resp.text
        message = resp.json()["error"]["message"]
        assert "PostgreSQL" in message and "retry" in message, message
        assert int(resp.headers["retry-after"]) > 0
        report = await health(http, plat)
        assert report["checks"]["postgres"].startswith("error"), report
        # down for over twice 3 missed heartbeats
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
    await no_data_lost(http, dr, item_id, tmp_path)
    # retries of the background work are warnings; nothing failed (no error, no 500)
    log = plat.services["registration"].log_path.read_text(errors="replace").splitlines()
    errors = [line for line in log if '"level": "error"' in line or "Exception in ASGI" in line]
    assert not errors, errors[:3]
    assert any("dependency unavailable while answering" in line for line in log)
