"""More than one replication instance in a deployment (one database, one topic prefix), each
keeping a block copy (`DR_REPLICATION_KEEP_BLOCK_COPY=true`; without one every instance works:
tests/e2e/test_stateless_replication_e2e.py): one is active, the others are standbys that
consume nothing. A standby with its own store folder reports so on /healthz, never does the
work, and after the active instance is killed it stays out (refused: its store does not hold the
deployment's points) and says why; an instance run with the killed one's store takes over and
replication goes on with no point lost; a graceful stop hands over to a standby on the same
store at once."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kit.dr import DrSetup, item
from kit.platform import Platform
from kit.poll import eventually
from kit.procs import Proc, free_port
from kit.stack import Stack, fresh_database, random_prefix
from services.replication.standby import lock_connection_name
from shared import db, topics
from tests.e2e.test_replication_faults_e2e import live_seqs, pruned_seqs, replicating_vm
from tests.support.kafka import read_all
from tests.support.own_platform import WITH_BLOCK_COPY

pytestmark = pytest.mark.e2e

POLL = {"DR_REPLICATION_STANDBY_POLL_SECONDS": "0.5"}


@pytest.fixture
async def plat(stack: Stack, tmp_path: Path) -> AsyncIterator[Platform]:
    own = Platform(
        stack=stack,
        database_url=await fresh_database(stack, "instances"),
        prefix=random_prefix("instances"),
        log_dir=tmp_path,
        replication_env=WITH_BLOCK_COPY,
    )
    try:
        yield own
    finally:
        await own.close()


def another_instance(plat: Platform, label: str, store: Path) -> Proc:
    """A replication instance like the platform's (same database, Kafka and prefix), with its
    own port, log and store folder; stopped with the platform."""
    first = plat.services["replication"]
    port = free_port()
    proc = Proc(
        module="services.replication",
        env={
            **first.env,
            "DR_REPLICATION_HTTP_PORT": str(port),
            "DR_REPLICATION_STORE_DIR": str(store),
        },
        log_path=plat.log_dir / f"replication-{label}.log",
        port=port,
    )
    plat.edges.append(proc)
    return proc


async def health(http: httpx.AsyncClient, proc: Proc) -> tuple[int, dict[str, Any]]:
    resp = await http.get(f"{proc.url}/healthz")
    return resp.status_code, resp.json()


async def metric(http: httpx.AsyncClient, proc: Proc, name: str) -> float:
    text = (await http.get(f"{proc.url}/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and not sample.labels:
                return float(sample.value)
    raise AssertionError(f"{name} not in the metrics of {proc.url}")


async def committed(http: httpx.AsyncClient, dr: DrSetup, item_id: str) -> int:
    return int((await item(http, dr, item_id))["last_committed_seq"] or 0)


async def points_after(http: httpx.AsyncClient, dr: DrSetup, item_id: str, seq: int) -> int:
    async def moved() -> int | None:
        current = await item(http, dr, item_id)
        assert current["state"] == "replicating", current
        return (
            int(current["last_committed_seq"] or 0) if current["last_committed_seq"] > seq else None
        )

    return await eventually(moved, timeout=90, what=f"points committed after {seq}")


def logged(proc: Proc, message: str) -> str:
    """The time of the first log line of `proc` whose message begins with `message`."""
    for line in proc.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{") and str(json.loads(line).get("msg")).startswith(message):
            return str(json.loads(line)["ts"])
    raise AssertionError(f"{proc.log_path.name}: no line {message!r}")


def site_folders(store: Path) -> list[str]:
    return sorted(p.name for p in store.iterdir() if p.is_dir()) if store.exists() else []


@pytest.mark.timeout(600)
async def test_one_active_instance_and_a_takeover_only_with_the_store(
    plat: Platform, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    dr, item_id = await replicating_vm(plat, http, tmp_path, POLL)
    first = plat.services["replication"]
    store = Path(first.env["DR_REPLICATION_STORE_DIR"])
    store_dir = str(store.resolve())  # noqa: ASYNC240 - no I/O to speak of
    seq = await points_after(http, dr, item_id, 1)
    assert first.popen is not None
    status, report = await health(http, first)
    assert (status, report["status"], report["role"]) == (200, "ok", "active"), report
    assert report["active_instance"]["pid"] == first.popen.pid

    # (a) a second instance with a store folder of its own: a standby, and it does nothing
    other_store = tmp_path / "elsewhere" / "replica"
    second = another_instance(plat, "second", other_store).start(POLL)
    status, report = await health(http, second)
    assert (status, report["status"], report["role"]) == (200, "standby", "standby"), report
    assert report["active_instance"]["pid"] == first.popen.pid
    assert report["active_instance"]["store_dir"] == store_dir
    assert "cannot take over" in report["reason"], report  # told before it matters
    resp = await http.get(dr.url("replication", "/protected-items").replace(first.url, second.url))
    assert resp.status_code == 503 and "standby" in resp.json()["error"]["message"], resp.text
    assert resp.headers["retry-after"] == "5"
    assert (await http.get(f"{second.url}/openapi.json")).status_code == 200
    seq = await points_after(http, dr, item_id, seq + 3)  # replication goes on meanwhile
    assert await metric(http, second, "dr_replication_active") == 0
    assert await metric(http, second, "dr_replication_bytes_applied_total") == 0
    assert await metric(http, first, "dr_replication_active") == 1
    assert await metric(http, first, "dr_replication_bytes_applied_total") > 0
    assert site_folders(other_store) == [], "the standby wrote to its store"
    before_kill = await live_seqs(http, dr, item_id)

    # (b) the active instance killed: the standby with another store stays out and says why
    first.kill()
    killed_at = time.monotonic()
    seq = max(before_kill)

    async def refused() -> dict[str, Any] | None:
        status, report = await health(http, second)
        return report if status == 503 and report.get("role") == "refused" else None

    report = await eventually(refused, timeout=30, what="the standby refusing to take over")
    assert report["status"] == "degraded"
    assert str(report["active_instance"]["store_id"]) in report["reason"]
    assert "DR_REPLICATION_STORE_DIR" in report["reason"]
    assert await metric(http, second, "dr_replication_active") == 0

    # (c) an instance with the killed one's store takes over; replication goes on
    starting = time.monotonic()
    third = another_instance(plat, "third", store).start(POLL)
    plat.services["replication"] = third
    seq = await points_after(http, dr, item_id, seq)
    now = time.monotonic()
    print(
        f"kill -9 to a new point with an instance on the same store: {now - killed_at:.1f}s "
        f"({now - starting:.1f}s from its start)"
    )
    status, report = await health(http, third)
    assert (status, report["role"]) == (200, "active"), report
    assert third.popen is not None and report["active_instance"]["pid"] == third.popen.pid
    status, report = await health(http, second)  # the refused one stayed out all along
    assert (status, report["role"]) == (200, "standby"), report
    assert report["active_instance"]["pid"] == third.popen.pid
    assert "cannot take over" in report["reason"], report
    assert await metric(http, second, "dr_replication_bytes_applied_total") == 0
    assert site_folders(other_store) == []
    lost = before_kill - await live_seqs(http, dr, item_id) - await pruned_seqs(plat, item_id)
    assert not lost, f"points lost across the takeover: {sorted(lost)}"
    commands = await read_all(plat.stack.kafka, plat.prefix + topics.AGENT_COMMANDS)
    resyncs = [
        r.json()
        for r in commands
        if r.json()["type"] == "ResyncRequested" and r.json()["payload"]["item_id"] == item_id
    ]
    assert not resyncs, f"the instances made the item resync: {resyncs[:1]}"

    # a standby on the same store (a shared volume) takes over from a graceful stop
    fourth = another_instance(plat, "fourth", store).start(POLL)
    status, report = await health(http, fourth)
    assert (status, report["role"]) == (200, "standby") and "cannot" not in report["reason"]
    assert third.stop() in (0, -15)  # SIGTERM: a graceful stop (uvicorn re-raises it)
    assert "active role released" in third.tail(20)
    plat.services["replication"] = fourth
    stopped_at = time.monotonic()
    seq = await points_after(http, dr, item_id, seq)
    print(
        f"graceful stop to a new point with a standby on the same store: "
        f"{time.monotonic() - stopped_at:.1f}s"
    )
    assert (await health(http, fourth))[1]["role"] == "active"


async def end_lock_connection(plat: Platform, pid: int) -> int:
    """End the lock connection of the instance with `pid` (as a network cut would; the
    process lives on); returns how many connections were ended."""
    conn = await db.connect(plat.database_url)
    try:
        rows = await conn.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            lock_connection_name("replication", pid),
        )
    finally:
        await conn.close()
    return len(rows)


@pytest.mark.timeout(600)
async def test_an_active_instance_that_lost_its_lock_to_another_stops(
    plat: Platform, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    # the first instance checks its lock (and beats) every 10 s; the standby tries every 0.5 s
    dr, item_id = await replicating_vm(
        plat, http, tmp_path, {"DR_REPLICATION_STANDBY_POLL_SECONDS": "10"}
    )
    first = plat.services["replication"]
    assert first.popen is not None
    store = Path(first.env["DR_REPLICATION_STORE_DIR"])
    seq = await points_after(http, dr, item_id, 1)
    second = another_instance(plat, "second", store).start(POLL)
    assert (await health(http, second))[1]["role"] == "standby"
    assert await end_lock_connection(plat, first.popen.pid) == 1

    async def second_active() -> bool:
        assert first.popen is not None
        await end_lock_connection(plat, first.popen.pid)  # if it took it again first: once more
        return (await health(http, second))[1]["role"] == "active"

    await eventually(second_active, timeout=60, what="the standby taking over the lock")

    async def first_stopped() -> bool:
        return not first.alive()

    await eventually(first_stopped, timeout=60, what="the instance that lost its lock stopping")
    # the first one gave up the role before the second took over: the second, holding the
    # lock, waited until the first missed two heartbeats
    lost = logged(first, "lost the active role")
    took = logged(second, "taking over as the active replication instance")
    assert lost < took, (lost, took)
    plat.services["replication"] = second
    await points_after(http, dr, item_id, seq)
    report = (await health(http, second))[1]
    assert second.popen is not None and report["active_instance"]["pid"] == second.popen.pid
