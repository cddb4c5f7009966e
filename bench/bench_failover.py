"""Recovery-plan failover benchmark on the real stack: the services, one host agent per site and
the site providers run as real processes (`kit`), over the local Kafka and
PostgreSQL, on a fresh database and topic prefix of its own.

Setup (not timed): N tiny VMs (default 100, `BENCH_FAILOVER_VMS`; 128 KiB disks, a few
written blocks) on the primary host, all protected and past initial replication, then one
recovery plan of 7 groups (the reference's limits: 100 items, 7 groups) holding them all.

Measured, each from the job's `created_at` (the POST) to its `ended_at` (server clocks):
1. plan test failover (network `none`), 2. its cleanup, 3. plan planned failover.

Orchestration excludes disk materialisation. The replication service materialises each item's
recovery point; the failover service records that as one task per item (the task named
`<vm>: materialise recovery point into ...`, from the request being recorded to its answer
being collected). Items of a group run in parallel, so these tasks overlap: summing their
durations would count the same wall time many times. What is subtracted is the *union* of
the materialise tasks' [started_at, ended_at] intervals, i.e. the wall time during which at
least one materialisation was in flight:

    orchestration = (job.ended_at - job.created_at) - |union of materialise task intervals|

That is conservative for orchestration (a `create_vm` of one item running while another
item's materialisation is in flight counts as materialisation). Materialisation throughput =
the bytes of every materialised disk (`size_bytes` from the tasks' answers) / that same union.

Besides the headline lines: per step kind (prepare, shutdown, synced, materialise, prove,
create_vm, failed_over, delete_vm, notes) the wall time during which at least one such task
was running, and the mean task duration, so it shows where the time goes.

Lines: `bench <name> <value> <unit>`; `..._orchestration_vs_target_ratio` = 30 s / orchestration
(unit `x`, above 1 meets the target). Run: `.venv/bin/python -m bench.bench_failover`.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import traceback
from collections import defaultdict
from datetime import datetime
from typing import Any

import httpx

from bench.harness import bench_platform, emit, failed
from kit.dr import DrSetup, protect, two_sites
from kit.platform import Platform
from kit.poll import eventually
from kit.stack import Stack, stack_from_env

VMS = int(os.environ.get("BENCH_FAILOVER_VMS", "100"))
GROUPS = 7
DISK = "128KiB"
COPY_SECONDS = int(os.environ.get("BENCH_FAILOVER_COPY_SECONDS", "5"))
PRIMARY, RECOVERY = "hv-p1", "hv-r1"
FINISHED = ("succeeded", "failed", "completed_with_errors")
MB = 1e6
TARGET = 30.0  # seconds: 100-VM plan orchestration
# step kind by the end of a task's name (`<vm>: <what>`); see services/failover/steps.py
KINDS = {
    "prepare (": "prepare",
    "shut down the source VM": "shutdown",
    "wait until the replica holds": "synced",
    "materialise recovery point": "materialise",
    "prove zero data loss": "prove",
    "create and start the VM": "create_vm",
    "mark the item failed over": "failed_over",
    "delete test VM": "delete_vm",
    "record cleanup notes": "notes",
}


def kind_of(task_name: str) -> str:
    return next((k for frag, k in KINDS.items() if frag in task_name), "other")


def ts(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    """Wall time covered by at least one interval."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


class Bench:
    def __init__(self, plat: Platform, dr: DrSetup, http: httpx.AsyncClient) -> None:
        self.plat, self.dr, self.http = plat, dr, http

    async def call(self, method: str, service: str, path: str, body: Any = None) -> Any:
        token = self.dr.operator if method != "GET" else self.dr.reader
        resp = await self.http.request(
            method, self.dr.url(service, path), json=body, headers=self.dr.bearer(token)
        )
        assert resp.is_success, f"{method} {path}: {resp.status_code} {resp.text}"
        return resp.json()

    async def setup(self) -> list[str]:
        """N protected VMs past initial replication, known to the failover service."""
        names = [f"vm{i:03d}" for i in range(VMS)]
        for name in names:
            await self.dr.agent_call(
                self.http, PRIMARY, "POST", "/vms", {"name": name, "disks": [DISK]}
            )
            await self.dr.agent_call(
                self.http, PRIMARY, "POST", f"/vms/{name}/writes", {"blocks": 1}
            )

        async def discovered() -> dict[str, str] | None:
            found: dict[str, str] = {}
            offset = 0
            while True:
                page = await self.call("GET", "inventory", f"/vms?limit=500&offset={offset}")
                found.update({v["name"]: v["vm_id"] for v in page["items"] if v.get("disks")})
                offset += len(page["items"])
                if not page["items"] or offset >= page["total"]:
                    break
            return found if all(n in found for n in names) else None

        vms = await eventually(discovered, timeout=120, what=f"{VMS} VMs discovered")
        gate = asyncio.Semaphore(8)

        async def enable(name: str) -> str:
            async with gate:
                return str((await protect(self.http, self.dr, vms[name]))["item_id"])

        item_ids = list(await asyncio.gather(*(enable(n) for n in names)))

        async def ready() -> bool:
            rows = await self.call("GET", "failover", "/failovers")
            ok = [
                r
                for r in rows
                if r["replication_state"] in ("replicating", "synced") and r["latest_seq"]
            ]
            return len(ok) >= VMS

        await eventually(ready, timeout=240, interval=1, what="all items replicating")
        return item_ids

    async def run_plan(self, operation: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        job = await self.call("POST", "failover", f"/recovery-plans/bench/{operation}", body or {})

        async def done() -> dict[str, Any] | None:
            found = await self.call("GET", "failover", f"/jobs/{job['job_id']}")
            return found if found["state"] in FINISHED else None

        finished = await eventually(done, timeout=600, interval=0.2, what=f"{operation} job")
        if finished["state"] != "succeeded":
            bad = [t for t in finished["tasks"] if t["state"] == "failed"][:2]
            raise RuntimeError(f"{operation} job {finished['state']}: {finished['error']} {bad}")
        return dict(finished)

    def report(self, label: str, job: dict[str, Any]) -> None:
        total = ts(job["ended_at"]) - ts(job["created_at"])
        by_kind: dict[str, list[tuple[float, float]]] = defaultdict(list)
        nbytes = 0
        for t in job["tasks"]:
            if t["ended_at"] is None:
                continue
            kind = kind_of(t["name"])
            by_kind[kind].append((ts(t["started_at"]), ts(t["ended_at"])))
            if kind == "materialise":
                nbytes += sum(int(d["size_bytes"]) for d in t["detail"].get("disks", []))
        mat = union_seconds(by_kind.get("materialise", []))
        emit(f"failover_plan_{label}_{VMS}vms_total_seconds", total, "s")
        if mat:
            emit(f"failover_plan_{label}_{VMS}vms_orchestration_seconds", total - mat, "s")
            # the 30 s target over what it took (higher is better)
            emit(
                f"failover_plan_{label}_orchestration_vs_target_ratio", TARGET / (total - mat), "x"
            )
            emit(f"failover_plan_{label}_materialise_wall_seconds", mat, "s")
            emit(f"failover_plan_{label}_materialise_mbps", nbytes / mat / MB, "MB/s")
        emit(f"failover_plan_{label}_tasks", len(job["tasks"]), "tasks")
        for kind, spans in sorted(by_kind.items()):
            mean = sum(b - a for a, b in spans) / len(spans)
            if kind != "materialise":
                emit(f"failover_plan_{label}_{kind}_wall_seconds", union_seconds(spans), "s")
            emit(f"failover_plan_{label}_{kind}_mean_task_seconds", mean, "s")


async def measure(stack: Stack) -> None:
    async with (
        bench_platform(stack, "failover") as (plat, root),
        httpx.AsyncClient(timeout=30) as http,
    ):
        started = time.perf_counter()
        dr = await two_sites(
            plat,
            http,
            root,
            primary_hosts=(PRIMARY,),
            recovery_hosts=(RECOVERY,),
            copy_seconds=COPY_SECONDS,
        )
        plat.start("failover")
        bench = Bench(plat, dr, http)

        async def tokens_known() -> bool:
            resp = await http.get(dr.url("failover", "/jobs"), headers=dr.bearer(dr.reader))
            return resp.status_code == 200

        await eventually(tokens_known, timeout=30, what="failover service up")
        items = await bench.setup()
        n, g_count = len(items), min(GROUPS, len(items))
        groups = [
            {"items": items[g * n // g_count : (g + 1) * n // g_count]} for g in range(g_count)
        ]
        await bench.call("POST", "failover", "/recovery-plans", {"name": "bench", "groups": groups})
        setup = time.perf_counter() - started
        print(f"# setup ({VMS} VMs, {len(groups)} groups): {setup:.1f} s", file=sys.stderr)
        emit("failover_bench_setup_seconds", setup, "s")

        test = await bench.run_plan("test-failover", {"network": "none"})
        bench.report("test", test)
        cleanup = await bench.run_plan("test-failover-cleanup", {"notes": "bench"})
        bench.report("cleanup", cleanup)
        planned = await bench.run_plan("planned-failover")
        bench.report("planned", planned)


async def main() -> None:
    stack = stack_from_env()
    problem = stack.reachable()
    name = f"failover_plan_test_{VMS}vms_orchestration_seconds"
    if problem:
        failed(name, problem)
        return
    try:
        await measure(stack)
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        failed(name, f"{type(exc).__name__}: {exc}")


if __name__ == "__main__":
    asyncio.run(main())
