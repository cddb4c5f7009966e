"""The demo's replication story: three VMs protected, RPO and recovery points, the latest
point verified byte for byte."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from kit.files import file_sha256
from kit.poll import eventually
from scripts.demo.harness import Demo, drctl, files_exist


async def replication_story(demo: Demo, http: httpx.AsyncClient) -> None:
    """Replication: three VMs with real disk images on hv-p1 protected at a 2 s copy interval,
    workloads running, RPO and recovery points shown, the latest point of each VM verified
    byte for byte against its source disks."""
    vid = demo.facts["vault_id"]
    agent = demo.edges["hv-p1"]
    identity = json.loads((demo.run_dir / "hv-p1-state" / "identity.json").read_text())
    agent_auth = {"Authorization": f"Bearer {identity['credential']}"}
    rep = f"{demo.url('replication')}/v1/vaults/{vid}/protected-items"
    reader = {"Authorization": f"Bearer {demo.facts['operator_token']}"}
    vms = {"web-01": ["4MiB"], "web-03": ["4MiB"], "sql-01": ["4MiB", "8MiB"]}

    async def protected() -> str | None:
        for name, disks in vms.items():
            resp = await http.post(
                f"{agent.url}/v1/vms", json={"name": name, "disks": disks}, headers=agent_auth
            )
            if resp.status_code != 201:
                return f"agent could not create {name}: {resp.text}"
            await http.post(
                f"{agent.url}/v1/vms/{name}/writes", json={"blocks": 30}, headers=agent_auth
            )
        inventory = f"{demo.url('inventory')}/v1/vaults/{vid}/vms"

        async def real_disks() -> bool:
            for name, disks in vms.items():
                page = (await http.get(inventory, params={"name": name}, headers=reader)).json()
                vm = next((v for v in page["items"] if v["name"] == name), None)
                real = vm is not None and len(vm["disks"]) == len(disks)
                if not real or not files_exist([d["path"] for d in vm["disks"]]):
                    return False  # still the site file's declared disks
                demo.facts.setdefault("protect", {})[name] = vm["vm_id"]
            return True

        await eventually(
            real_disks, interval=0.25, timeout=30, what="the VMs' real disks discovered"
        )
        items = drctl(demo, "item", "enable", *demo.facts["protect"].values())
        demo.facts["items"] = items
        return None

    if not await demo.check(
        "3 VMs with real disk images (web-01, web-03, sql-01) protected with drctl", protected
    ):
        return

    async def all_items() -> dict[str, Any]:
        listed = (await http.get(rep, headers=reader)).json()
        return {i["vm_name"]: i for i in listed}

    async def initial() -> str | None:
        async def done() -> bool:
            items = await all_items()
            return len(items) == 3 and all(
                i["initial_done_at"] and i["state"] == "replicating" for i in items.values()
            )

        await eventually(done, interval=0.25, timeout=60, what="initial replication of the 3 VMs")
        for name in vms:
            await http.post(
                f"{agent.url}/v1/vms/{name}/workload",
                json={"blocks_per_second": 5},
                headers=agent_auth,
            )
        return None

    await demo.check("initial replication done for all 3 VMs; workloads started", initial)

    async def rpo() -> str | None:
        start = time.monotonic()

        async def enough_points() -> bool:
            items = await all_items()
            return time.monotonic() - start > 10 and all(
                (i["last_committed_seq"] or 0) >= 5 for i in items.values()
            )

        await eventually(
            enough_points, interval=0.25, timeout=60, what="several recovery points per VM"
        )
        items = await all_items()
        worst = max(i["rpo_seconds"] or 1e9 for i in items.values())
        for name, i in sorted(items.items()):
            points = (
                await http.get(f"{rep}/{i['item_id']}/recovery-points", headers=reader)
            ).json()
            print(
                f"     {name:<7} state={i['state']} health={i['health']} "
                f"RPO={i['rpo_seconds']:.1f}s points={len(points)} latest={points[0]['cycle_seq']}"
            )
        healthy = all(i["health"] == "Normal" for i in items.values())
        if worst > 10 or not healthy:
            return f"worst RPO {worst:.1f}s (want <= 10 s at a 2 s interval), healthy={healthy}"
        return None

    await demo.check("RPO under 10 s for every VM at a 2 s copy interval, health Normal", rpo)

    async def verified() -> str | None:
        for name in vms:
            await http.post(
                f"{agent.url}/v1/vms/{name}/workload",
                json={"blocks_per_second": 0},
                headers=agent_auth,
            )
        stopped = datetime.now(UTC)
        items = await all_items()
        for name, i in items.items():

            async def point_after(item_id: str = i["item_id"]) -> Any:
                points = (await http.get(f"{rep}/{item_id}/recovery-points", headers=reader)).json()
                later = [p for p in points if datetime.fromisoformat(p["source_time"]) > stopped]
                return min(later, key=lambda p: p["cycle_seq"]) if later else None

            point = await eventually(
                point_after,
                interval=0.25,
                timeout=30,
                what=f"a point of {name} after the workload stopped",
            )
            check = (
                await http.post(
                    f"{rep}/{i['item_id']}/recovery-points/{point['cycle_seq']}/verify",
                    headers=reader,
                )
            ).json()
            if not check.get("ok"):
                return f"{name}: point {point['cycle_seq']} failed verification: {check}"
            # Downloaded by the recovery host into a folder of its own storage: the points
            # live on the recovery site, the replication service holds no block of them.
            out = demo.storage_root("recovery") / "hv-r1" / "verify" / name
            result = (
                await http.post(
                    f"{rep}/{i['item_id']}/recovery-points/{point['cycle_seq']}/materialise",
                    json={"target_dir": str(out)},
                    headers=reader,
                )
            ).json()
            sources = {d["disk_id"]: Path(d["path"]) for d in i["disks"]}
            for disk in result["disks"]:
                if disk["sha256"] != file_sha256(sources[disk["disk_id"]]):
                    return f"{name}: disk {disk['disk_id']} differs from the source"
            print(
                f"     {name:<7} point {point['cycle_seq']}: Merkle roots re-verified by "
                f"{check.get('verified_by', 'the replication service')}, "
                f"{len(result['disks'])} disk(s) byte-identical to the source"
            )
        # the points live at the recovery site: the replication service kept no block of them
        store = demo.run_dir / "replica"
        held = [p for p in store.rglob("*") if p.is_file() and p.name != ".store-id"]
        if held:
            return f"the replication service's store holds {len(held)} files, e.g. {held[0]}"
        print("     the replication service's store holds no block (they passed through)")
        return None

    await demo.check(
        "latest point of each VM verified and byte-identical to its source disks", verified
    )
