"""A two-site replication run for the benchmarks: a platform of its own with the services, the
site providers, the source host agent (on `HOST`) and the recovery host agent that keeps the
replicas (on `RECOVERY_HOST`; `BENCH_RECOVERY_AGENT=0` runs without it, as the service alone),
and what a measurement does with it (VMs
written and protected through the agent, items paused and resumed, points awaited, metrics
and CPU counters read, a point materialised)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from bench.harness import bench_platform, cpu_seconds
from kit.dr import DrSetup, item, points, protect, two_sites
from kit.files import file_sha256
from kit.platform import Platform
from kit.poll import eventually
from kit.stack import Stack

HOST = "hv-p1"
RECOVERY_HOST = "hv-r1"
WITH_RECOVERY_AGENT = os.environ.get("BENCH_RECOVERY_AGENT", "1") != "0"
# The service keeps no block copy (DR_REPLICATION_KEEP_BLOCK_COPY, its default): blocks only
# pass through it to the recovery host's replica; `BENCH_KEEP_BLOCK_COPY=1` (or no recovery
# host agent, `BENCH_RECOVERY_AGENT=0`): it keeps one
KEEP_BLOCK_COPY = os.environ.get("BENCH_KEEP_BLOCK_COPY", "0") == "1" or not WITH_RECOVERY_AGENT


@dataclass
class Run:
    plat: Platform
    dr: DrSetup
    http: httpx.AsyncClient
    root: Path

    async def agent(self, method: str, path: str, body: Any = None) -> Any:
        return await self.dr.agent_call(self.http, HOST, method, path, body)

    async def write(self, vm: str, blocks: int) -> datetime:
        """`blocks` random blocks written through the agent's journal; when the last was done
        (the agent's clock: a point captured later holds them all)."""
        done = await self.agent(
            "POST", f"/vms/{vm}/writes", {"blocks": blocks, "pattern": "random"}
        )
        return datetime.fromisoformat(done["completed_at"])

    async def create_vm(self, name: str, disk: str) -> Path:
        """A VM with one sparse disk on the agent's host; returns the disk's image path."""
        vm = await self.agent("POST", "/vms", {"name": name, "disks": [disk]})
        return self.dr.storage("primary", HOST) / name / str(vm["disks"][0]["file"])

    async def inventory_vms(self) -> dict[str, dict[str, Any]]:
        """Discovered VMs with their disks, by name."""
        found: dict[str, dict[str, Any]] = {}
        offset = 0
        while True:
            resp = await self.http.get(
                self.dr.url("inventory", "/vms"),
                params={"limit": 500, "offset": offset},
                headers=self.dr.bearer(self.dr.reader),
            )
            resp.raise_for_status()
            page = resp.json()
            found.update({v["name"]: v for v in page["items"] if v.get("disks")})
            offset += len(page["items"])
            if not page["items"] or offset >= page["total"]:
                return found

    async def protect_vm(self, name: str) -> str:
        """Protect a discovered VM; returns the item id."""

        async def discovered() -> dict[str, Any] | None:
            return (await self.inventory_vms()).get(name)

        vm = await eventually(discovered, timeout=60, what=f"VM {name} discovered")
        return str((await protect(self.http, self.dr, vm["vm_id"]))["item_id"])

    async def item_action(self, item_id: str, action: str) -> None:
        resp = await self.http.post(
            self.dr.url("replication", f"/protected-items/{item_id}/{action}"),
            headers=self.dr.bearer(self.dr.operator),
        )
        resp.raise_for_status()

    async def agent_item_is(self, item_id: str, **wanted: Any) -> None:
        """Until the agent's own status of the item shows `wanted` (commands go over Kafka)."""

        async def reached() -> bool:
            status = {i["item_id"]: i for i in await self.agent("GET", "/items")}
            return all(status.get(item_id, {}).get(k) == v for k, v in wanted.items())

        await eventually(reached, timeout=60, interval=0.05, what=f"agent item {wanted}")

    async def initial_done(self, item_id: str, timeout: float) -> None:
        async def done() -> bool:
            current = await item(self.http, self.dr, item_id)
            return bool(current["initial_done_at"]) and current["state"] == "replicating"

        await eventually(done, timeout=timeout, interval=0.2, what="initial replication")

    async def item(self, item_id: str) -> dict[str, Any]:
        return await item(self.http, self.dr, item_id)

    async def replica_at(self, item_id: str, seq: int, timeout: float = 120) -> None:
        """Until the recovery host's replica holds point `seq` (or later)."""

        async def reached() -> bool:
            current = await item(self.http, self.dr, item_id)
            if current["replica_error"]:
                raise RuntimeError(f"replica error: {current['replica_error']}")
            return (current["replica_seq"] or 0) >= seq

        await eventually(reached, timeout=timeout, interval=0.5, what=f"the replica at {seq}")

    async def items(self) -> list[dict[str, Any]]:
        resp = await self.http.get(
            self.dr.url("replication", "/protected-items"),
            params={"limit": 500},
            headers=self.dr.bearer(self.dr.reader),
        )
        resp.raise_for_status()
        return list(resp.json())

    async def point_after(
        self, item_id: str, instant: datetime, timeout: float = 120
    ) -> dict[str, Any]:
        """The first committed point whose captured source state is later than `instant`."""

        async def found() -> dict[str, Any] | None:
            later = [
                p
                for p in await points(self.http, self.dr, item_id)
                if datetime.fromisoformat(p["source_time"]) > instant
            ]
            return min(later, key=lambda p: p["cycle_seq"]) if later else None

        # The times measured are the service's `committed_at` and the agent's clock, not when
        # this poll sees the point: polling often would only take CPU from the processes timed.
        return await eventually(found, timeout=timeout, interval=0.25, what="a point after it")

    async def metric(self, url: str, name: str, label: str = "") -> float:
        """Sum of the Prometheus samples `name{...label...}` at `url`/metrics."""
        text = (await self.http.get(f"{url}/metrics")).text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name) and label in line.split(" ", 1)[0]
        )

    async def counters(self) -> dict[str, float]:
        """Where a measured window's time goes: agent cycle time, service delta handling time
        (sums of their histograms) and CPU seconds of both processes."""
        service, agent = self.plat.services["replication"], self.dr.agents[HOST]
        return {
            "agent_cycle_seconds": await self.metric(
                agent.url, "dr_agent_cycle_seconds_sum", 'kind="delta"'
            ),
            "service_delta_handle_seconds": await self.metric(
                service.url, "dr_event_handle_seconds_sum", "replication.deltas"
            ),
            "agent_cpu_seconds": cpu_seconds(agent),
            "service_cpu_seconds": cpu_seconds(service),
        }

    async def point_sha256(self, item_id: str, seq: int, target: Path) -> str:
        """SHA-256 of the item's (first) disk at point `seq`: materialised by the service from
        its block copy, else read from the recovery host's replica once it holds the point
        (nothing may write the source meanwhile)."""
        if KEEP_BLOCK_COPY:
            return await self.materialise(item_id, seq, target)
        await self.replica_at(item_id, seq)
        disk = (await self.item(item_id))["disks"][0]["disk_id"]
        image = (
            self.root
            / f"agent-{RECOVERY_HOST}-state"
            / "replica"
            / item_id
            / "disks"
            / f"{disk}.vhdx"
        )
        return await asyncio.to_thread(file_sha256, image)

    async def materialise(self, item_id: str, seq: int, target: Path) -> str:
        resp = await self.http.post(
            self.dr.url(
                "replication", f"/protected-items/{item_id}/recovery-points/{seq}/materialise"
            ),
            json={"target_dir": str(target)},
            headers=self.dr.bearer(self.dr.operator),
            timeout=300,
        )
        assert resp.status_code == 200, resp.text
        return str(resp.json()["disks"][0]["sha256"])


@contextlib.asynccontextmanager
async def two_site_run(stack: Stack, label: str, copy_seconds: int) -> AsyncIterator[Run]:
    """A platform of its own with services, providers and one agent."""
    async with (
        bench_platform(stack, f"repl-{label}") as (plat, root),
        httpx.AsyncClient(timeout=30) as http,
    ):
        copy = "true" if KEEP_BLOCK_COPY else "false"
        plat.start("replication", {"DR_REPLICATION_KEEP_BLOCK_COPY": copy})
        hosts = (HOST, RECOVERY_HOST) if WITH_RECOVERY_AGENT else (HOST,)
        dr = await two_sites(plat, http, root, copy_seconds=copy_seconds, agents_on=hosts)
        yield Run(plat, dr, http, root)
