"""Recovery points retention removed are refused at the door: with retention keeping only the
last few points, a test or unplanned failover naming a pruned point answers 409 with a JSON
error naming the retained range (before any job starts), and a retained point is accepted.
A point a failover asked for is kept while the replication service has not answered it (here
30 s of waiting for a stopped recovery host's replica, with points older than 3 s pruned
meanwhile), and pruned by retention once the answer is given."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kit.dr import DrSetup, failover_known, item, points, protect, start, two_sites, vm_named
from kit.platform import Platform
from kit.poll import eventually
from kit.stack import Stack
from tests.e2e.test_failover_e2e import failover_up, protected_vm, task_named
from tests.e2e.test_replication_faults_e2e import pruned_seqs
from tests.support.own_platform import WITH_BLOCK_COPY, own_platform

pytestmark = pytest.mark.e2e


@pytest.fixture
async def plat(stack: Stack, tmp_path: Path) -> AsyncIterator[Platform]:
    own = await own_platform(stack, "fopoints", tmp_path)
    try:
        yield own
    finally:
        await own.close()


async def fast_pruning_sites(
    plat: Platform, http: httpx.AsyncClient, root: Path, env: dict[str, str] | None = None
) -> DrSetup:
    """Two sites with 1 s cycles, retention every second keeping the 3 latest points."""
    plat.start(
        "replication",
        {
            "DR_REPLICATION_KEEP_RECENT_POINTS": "3",
            "DR_REPLICATION_RETENTION_INTERVAL_SECONDS": "1",
            **(env or {}),
        },
    )
    return await two_sites(plat, http, root, copy_seconds=1)


async def test_a_pruned_point_is_refused_with_the_retained_range(
    plat: Platform, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    dr = await fast_pruning_sites(plat, http, tmp_path)
    await dr.agent_call(http, "hv-p1", "POST", "/vms", {"name": "db01", "disks": ["1MiB"]})
    vm = await vm_named(http, dr, "db01")
    item_id = (await protect(http, dr, vm["vm_id"]))["item_id"]
    await dr.agent_call(http, "hv-p1", "POST", "/vms/db01/workload", {"blocks_per_second": 20})
    await failover_up(plat, http, dr)

    async def some_pruned() -> set[int] | None:
        found = await pruned_seqs(plat, item_id)
        return found or None

    pruned = await eventually(some_pruned, timeout=120, what="retention pruned a point")
    gone = min(pruned)
    operator = dr.bearer(dr.operator)

    async def prune_applied() -> dict[str, int] | None:
        resp = await http.get(dr.url("failover", f"/failovers/{item_id}"), headers=operator)
        kept = resp.json()["retained_points"] if resp.status_code == 200 else None
        return kept if kept and kept["oldest_seq"] > gone else None

    kept = await eventually(prune_applied, timeout=60, what="the failover service saw the prune")
    assert kept["count"] >= 1 and kept["latest_seq"] >= kept["oldest_seq"]
    resp = await http.post(
        dr.url("failover", f"/failovers/{item_id}/test-failover"),
        json={"choice": "chosen", "cycle_seq": gone},
        headers=operator,
    )
    assert resp.status_code == 409, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    error = resp.json()["error"]
    assert error["status"] == 409
    assert f"no retained recovery point {gone}" in error["message"], error
    assert "the retained points are " in error["message"] and ".." in error["message"], error

    resp = await http.post(
        dr.url("failover", f"/failovers/{item_id}/unplanned-failover"),
        json={"choice": "chosen", "cycle_seq": gone},
        headers=operator,
    )
    assert resp.status_code == 409 and "no retained recovery point" in resp.text, resp.text
    assert (await http.get(dr.url("failover", "/jobs"), headers=operator)).json() == []

    # a point the failover service knows as retained passes the door (a job starts)
    listed = {p["cycle_seq"] for p in await points(http, dr, item_id)}
    assert gone not in listed
    resp = await http.post(
        dr.url("failover", f"/failovers/{item_id}/test-failover"),
        json={"choice": "chosen", "cycle_seq": kept["latest_seq"]},
        headers=operator,
    )
    assert resp.status_code == 202, resp.text


async def test_a_point_asked_for_is_kept_until_the_answer_then_pruned(
    plat: Platform, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    # the retained crash-consistent points span ~3 s, far less than the 30 s the replication
    # service waits for the recovery host's replica before it copies the point (from its
    # block copy: without one the drill fails with the host's reason)
    dr = await fast_pruning_sites(plat, http, tmp_path, WITH_BLOCK_COPY)
    await failover_up(plat, http, dr)
    vm = await protected_vm(http, dr, "pin01", ["256KiB"], "10.10.0.193")
    item_id = vm["item_id"]
    await failover_known(http, dr, item_id)
    await dr.agent_call(http, "hv-p1", "POST", "/vms/pin01/workload", {"blocks_per_second": 20})
    # the recovery host is down: a drill of a point past its replica waits for it, then copies
    dr.agents["hv-r1"].stop()

    async def drill_started() -> tuple[int, httpx.Response] | None:
        held = (await item(http, dr, item_id))["replica_seq"] or 0
        crash = [p for p in await points(http, dr, item_id) if p["cycle_seq"] > held]
        latest = max(crash, key=lambda p: p["cycle_seq"], default=None)
        if latest is None or latest["point_type"] != "crash_consistent":
            return None  # no crash-consistent point past the replica yet
        body = {"network": "none", "choice": "chosen", "cycle_seq": latest["cycle_seq"]}
        resp = await start(http, dr, f"/failovers/{item_id}/test-failover", body)
        # 404/409: the failover service's read model of the points is catching up
        return None if resp.status_code in (404, 409) else (latest["cycle_seq"], resp)

    asked, resp = await eventually(
        drill_started, timeout=90, what="a drill of a point past the replica"
    )
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["job_id"]

    async def newer_pruned() -> set[int] | None:
        pruned = await pruned_seqs(plat, item_id)
        return pruned if any(s > asked for s in pruned) else None

    # retention passes prune points newer than the one asked for (so, without its request,
    # the point would have gone too); the point asked for stays listed and is not pruned
    pruned = await eventually(newer_pruned, timeout=60, what="points newer than it pruned")
    assert asked not in pruned, pruned
    assert asked in {p["cycle_seq"] for p in await points(http, dr, item_id)}

    async def vm_waited_for() -> dict[str, Any] | None:
        got = await http.get(dr.url("failover", f"/jobs/{job_id}"), headers=dr.bearer(dr.reader))
        job = got.json()
        if job["state"] in ("failed", "completed_with_errors"):
            pytest.fail(f"the drill failed: {job}")
        tasks = task_named(job, "create and start the VM")
        return tasks[0] if tasks and tasks[0]["state"] == "in_progress" else None

    # the point was copied after the wait (materialised: the job goes on to create the VM on
    # the stopped host); once answered, the next retention pass prunes it as usual
    await eventually(vm_waited_for, timeout=120, what="the point materialised")

    async def asked_pruned() -> bool:
        return asked in await pruned_seqs(plat, item_id)

    await eventually(asked_pruned, timeout=60, what="the point pruned after the answer")
    assert asked not in {p["cycle_seq"] for p in await points(http, dr, item_id)}
