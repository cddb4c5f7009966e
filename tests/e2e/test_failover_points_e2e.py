"""Recovery points retention removed are refused at the door: with retention keeping only the
last few points, a test or unplanned failover naming a pruned point answers 409 with a JSON
error naming the retained range (before any job starts), and a retained point is accepted."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from kit.dr import points, protect, two_sites, vm_named
from kit.platform import Platform
from kit.poll import eventually
from kit.stack import Stack
from tests.e2e.test_failover_e2e import failover_up
from tests.e2e.test_replication_faults_e2e import pruned_seqs
from tests.support.own_platform import own_platform

pytestmark = pytest.mark.e2e


@pytest.fixture
async def plat(stack: Stack, tmp_path: Path) -> AsyncIterator[Platform]:
    own = await own_platform(stack, "fopoints", tmp_path)
    try:
        yield own
    finally:
        await own.close()


async def test_a_pruned_point_is_refused_with_the_retained_range(
    plat: Platform, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    plat.start(
        "replication",
        {
            "DR_REPLICATION_KEEP_RECENT_POINTS": "3",
            "DR_REPLICATION_RETENTION_INTERVAL_SECONDS": "1",
        },
    )
    dr = await two_sites(plat, http, tmp_path, copy_seconds=1)
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
