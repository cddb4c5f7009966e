"""A real Prometheus scrapes the replication service and the source host agent while a VM
replicates, and the RPO and health series the dashboards and alert rules use are read back
through Prometheus's query API."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from kit.dr import item, protect, two_sites, vm_named
from kit.poll import eventually
from kit.stack import Stack
from tests.support.own_platform import own_platform
from tests.support.prometheus import PrometheusServer

pytestmark = pytest.mark.e2e


async def test_rpo_and_health_series_through_prometheus(
    stack: Stack, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    (tmp_path / "platform").mkdir()
    plat = await own_platform(stack, "promrep", tmp_path / "platform")
    server: PrometheusServer | None = None
    try:
        dr = await two_sites(plat, http, tmp_path, copy_seconds=1)
        await dr.agent_call(http, "hv-p1", "POST", "/vms", {"name": "mon01", "disks": ["1MiB"]})
        vm = await vm_named(http, dr, "mon01")
        item_id = (await protect(http, dr, vm["vm_id"]))["item_id"]
        await dr.agent_call(http, "hv-p1", "POST", "/vms/mon01/workload", {"blocks_per_second": 5})
        targets = {
            "replication": [f"127.0.0.1:{plat.services['replication'].port}"],
            "host-agent": [f"127.0.0.1:{dr.agents['hv-p1'].port}"],
        }
        server = PrometheusServer(targets, tmp_path / "prometheus").start()

        async def rpo_series() -> list[dict[str, object]]:
            return await server.query(
                http, f'dr_replication_rpo_seconds{{job="replication",item_id="{item_id}"}} < 30'
            )

        series = await eventually(rpo_series, timeout=60, what="the item's RPO in Prometheus")
        assert series[0]["metric"]["vm"] == "mon01"  # type: ignore[index]

        async def healthy() -> list[dict[str, object]]:
            return await server.query(http, 'dr_replication_items{health="Normal"} >= 1')

        await eventually(healthy, timeout=60, what="items by health: one Normal")

        async def applied() -> list[dict[str, object]]:
            return await server.query(http, "rate(dr_replication_bytes_applied_total[10s]) > 0")

        await eventually(applied, timeout=60, what="replication throughput series")
        assert (await item(http, dr, item_id))["health"] == "Normal"
        critical = await server.query(http, 'dr_replication_items{health="Critical"}')
        assert [r["value"][1] for r in critical] == ["0"]  # type: ignore[index]
    finally:
        if server is not None:
            server.stop()
        await plat.close()
