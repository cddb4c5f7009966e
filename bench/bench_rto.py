"""Failover RTO by disk size, over the recovery host's replica, on the real stack (services, one
host agent per site and the site providers as real processes; a fresh database and topic
prefix per size).

For each size (default 1 GiB and 8 GiB, `BENCH_RTO_SIZES`): a VM with one disk of that size
(160 random 64 KiB blocks written, the rest sparse) is protected and replicated until the
recovery host's replica holds its latest point (not timed). Then, each from the job's
`created_at` (the request) to its `ended_at` (the VM running; server clocks):

- `failover_rto_test_<size>_seconds`: a test failover (network `none`) of the latest point;
  its cleanup follows (not timed);
- `failover_rto_planned_<size>_seconds`: a planned failover after 20 more blocks were written
  (source shut down, final cycle, zero-data-loss proof, the VM created and started);
- `failover_rto_planned_8gib_vs_1gib_ratio` and `failover_rto_test_8gib_vs_1gib_ratio` (when
  both sizes ran): 8 GiB / 1 GiB (1.0: failover time does not grow with the disk; a test
  failover runs over differencing disks on the replica, a planned one over its images).

And on a 1 GiB VM: `failover_rto_older_point_seconds`, an unplanned failover to the point
10 cycles before the latest (the replica rolled back over the blocks changed since).

Lines: `bench <name> <value> <unit>`; a measurement that fails prints
`bench <name> FAILED <reason>`. Run: `.venv/bin/python -m bench.bench_rto` (`make up` first).
"""

from __future__ import annotations

import asyncio
import os
import traceback
from datetime import datetime
from typing import Any

import httpx

from bench.bench_replication import bench_platform, emit, failed
from kit.dr import (
    DrSetup,
    failover_known,
    failover_up,
    finished,
    item,
    points,
    protect,
    start,
    two_sites,
    vm_named,
)
from kit.poll import eventually
from kit.stack import Stack, stack_from_env

SIZES = [s.strip() for s in os.environ.get("BENCH_RTO_SIZES", "1GiB,8GiB").split(",") if s]
WRITTEN = 160
SETUP_TIMEOUT = 1800.0


def label(size: str) -> str:
    return size.lower()


def seconds(job: dict[str, Any]) -> float:
    assert job["state"] == "succeeded", (job.get("error"), job.get("failed_tasks"))
    ended = datetime.fromisoformat(job["ended_at"])
    return (ended - datetime.fromisoformat(job["created_at"])).total_seconds()


async def replicated_vm(http: httpx.AsyncClient, dr: DrSetup, name: str, size: str) -> str:
    """A protected VM whose latest point the recovery host's replica holds; its item id."""
    await dr.agent_call(http, "hv-p1", "POST", "/vms", {"name": name, "disks": [size]})
    await dr.agent_call(http, "hv-p1", "POST", f"/vms/{name}/writes", {"blocks": WRITTEN})
    protected = await protect(http, dr, (await vm_named(http, dr, name))["vm_id"])
    item_id = str(protected["item_id"])
    await held_latest(http, dr, item_id)
    await failover_known(http, dr, item_id)
    return item_id


async def held_latest(http: httpx.AsyncClient, dr: DrSetup, item_id: str) -> int:
    async def caught_up() -> int | None:
        now = await item(http, dr, item_id)
        latest = now["last_committed_seq"]
        ok = now["initial_done_at"] and latest and (now["replica_seq"] or 0) >= latest
        return int(latest) if ok else None

    return await eventually(caught_up, timeout=SETUP_TIMEOUT, interval=1, what="replica held")


async def job(http: httpx.AsyncClient, dr: DrSetup, path: str, body: dict[str, Any]) -> Any:
    resp = await start(http, dr, path, body)
    assert resp.status_code == 202, resp.text
    return await finished(http, dr, resp.json()["job_id"], timeout=SETUP_TIMEOUT)


async def one_size(stack: Stack, size: str, tests: dict[str, float]) -> float | None:
    """The planned failover's seconds (None: it failed); the test failover's into `tests`."""
    name = label(size)
    async with (
        bench_platform(stack, f"rto-{name}") as (plat, root),
        httpx.AsyncClient(timeout=60) as http,
    ):
        dr = await two_sites(plat, http, root, copy_seconds=2)
        await failover_up(plat, http, dr)
        item_id = await replicated_vm(http, dr, "rto", size)
        try:
            test = await job(http, dr, f"/failovers/{item_id}/test-failover", {"network": "none"})
            tests[name] = seconds(test)
            emit(f"failover_rto_test_{name}_seconds", tests[name], "s")
            await job(http, dr, f"/failovers/{item_id}/test-failover-cleanup", {})
        except Exception as exc:
            traceback.print_exc()
            failed(f"failover_rto_test_{name}_seconds", repr(exc))
        try:
            await dr.agent_call(http, "hv-p1", "POST", "/vms/rto/writes", {"blocks": 20})
            planned = seconds(await job(http, dr, f"/failovers/{item_id}/planned-failover", {}))
            emit(f"failover_rto_planned_{name}_seconds", planned, "s")
            return planned
        except Exception as exc:
            traceback.print_exc()
            failed(f"failover_rto_planned_{name}_seconds", repr(exc))
            return None


async def older_point(stack: Stack) -> None:
    async with (
        bench_platform(stack, "rto-older") as (plat, root),
        httpx.AsyncClient(timeout=60) as http,
    ):
        dr = await two_sites(plat, http, root, copy_seconds=1)
        await failover_up(plat, http, dr)
        item_id = await replicated_vm(http, dr, "old", "1GiB")
        for _ in range(11):
            before = await held_latest(http, dr, item_id)
            await dr.agent_call(http, "hv-p1", "POST", "/vms/old/writes", {"blocks": 8})

            async def newer(before: int = before) -> bool:
                return await held_latest(http, dr, item_id) > before

            await eventually(newer, timeout=120, what="a newer point held")
        latest = await held_latest(http, dr, item_id)
        retained = sorted(p["cycle_seq"] for p in await points(http, dr, item_id))
        target = max(s for s in retained if s <= latest - 10)
        body = {"choice": "chosen", "cycle_seq": target, "shutdown_source": False}
        run = await job(http, dr, f"/failovers/{item_id}/unplanned-failover", body)
        emit("failover_rto_older_point_seconds", seconds(run), "s")


async def main() -> None:
    stack = stack_from_env()
    planned: dict[str, float] = {}
    tests: dict[str, float] = {}
    for size in SIZES:
        try:
            value = await one_size(stack, size, tests)
            if value is not None:
                planned[label(size)] = value
        except Exception as exc:
            traceback.print_exc()
            failed(f"failover_rto_{label(size)}", repr(exc))
    if "8gib" in planned and "1gib" in planned:
        emit("failover_rto_planned_8gib_vs_1gib_ratio", planned["8gib"] / planned["1gib"], "x")
    if "8gib" in tests and "1gib" in tests:
        emit("failover_rto_test_8gib_vs_1gib_ratio", tests["8gib"] / tests["1gib"], "x")
    try:
        await older_point(stack)
    except Exception as exc:
        traceback.print_exc()
        failed("failover_rto_older_point_seconds", repr(exc))


if __name__ == "__main__":
    asyncio.run(main())
