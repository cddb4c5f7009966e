"""The demo's inventory and policy story: discovery, a policy, a pairing, a network mapping,
the enable-replication prerequisite check."""

from __future__ import annotations

from typing import Any

import httpx

from kit.poll import eventually
from scripts.demo.harness import Demo, drctl


async def inventory_policy_story(demo: Demo, http: httpx.AsyncClient) -> None:
    """Inventory and policy: discovery of both sites, a policy, a cloud pairing, a network
    mapping and the enable-replication prerequisite check (one VM passes, one fails with its
    reasons)."""
    vid = demo.facts["vault_id"]
    reader = {"Authorization": f"Bearer {demo.facts['operator_token']}"}
    inventory = f"{demo.url('inventory')}/v1/vaults/{vid}"

    async def discovered() -> str | None:
        async def both_sites() -> Any:
            clouds = (await http.get(f"{inventory}/clouds", headers=reader)).json()
            return clouds if isinstance(clouds, list) and len(clouds) == 4 else None

        await eventually(
            both_sites, interval=0.25, timeout=30, what="the clouds of both sites discovered"
        )
        clouds = (await http.get(f"{inventory}/clouds", headers=reader)).json()
        hosts = (await http.get(f"{inventory}/hosts", headers=reader)).json()
        primary_vms = (
            await http.get(f"{inventory}/vms", params={"site": "primary"}, headers=reader)
        ).json()
        networks = (await http.get(f"{inventory}/networks", headers=reader)).json()
        demo.facts["clouds"] = {c["name"]: c for c in clouds}
        demo.facts["networks"] = {n["name"]: n for n in networks}
        vms = {v["name"]: v for v in primary_vms["items"]}
        page = primary_vms["total"]
        while len(vms) < page:
            more = (
                await http.get(
                    f"{inventory}/vms",
                    params={"site": "primary", "offset": len(vms)},
                    headers=reader,
                )
            ).json()
            vms |= {v["name"]: v for v in more["items"]}
        demo.facts["vms"] = vms
        got = (len(clouds), len(hosts), page, len(networks))
        return None if got == (4, 6, 20, 3) else f"clouds, hosts, primary VMs, networks = {got}"

    if not await demo.check(
        "discovery: 2 sites, 4 clouds, 6 hosts, 20 primary VMs, 3 networks visible in inventory",
        discovered,
    ):
        return

    async def removal_detected() -> str | None:
        count_before = (
            await http.get(f"{inventory}/vms", params={"site": "recovery"}, headers=reader)
        ).json()["total"]
        return None if count_before == 2 else f"recovery VMs: {count_before}"

    await demo.check("recovery site's own VMs discovered (dc-r1, dc-r2)", removal_detected)

    async def policy_pairing_mapping() -> str | None:
        policy = drctl(
            demo,
            "policy",
            "create",
            "gold-2s",
            "--copy-frequency",
            "2",
            "--recovery-points",
            "2",
            "--no-compression",
        )
        clouds = demo.facts["clouds"]
        drctl(
            demo,
            "pairing",
            "create",
            "--source",
            clouds["Gold-Primary"]["cloud_id"],
            "--target",
            clouds["Gold-Recovery"]["cloud_id"],
            "--policy",
            "gold-2s",
        )
        networks = demo.facts["networks"]
        drctl(
            demo,
            "mapping",
            "create",
            "--source",
            networks["Corp-Primary"]["network_id"],
            "--target",
            networks["Corp-Recovery"]["network_id"],
        )
        pairings = drctl(demo, "pairing", "list")
        mappings = drctl(demo, "mapping", "list")
        demo.facts["policy"] = policy
        if len(pairings) != 1 or len(mappings) != 1:
            return f"pairings {len(pairings)}, mappings {len(mappings)}"
        return None

    await demo.check(
        "drctl: policy (2 s copy interval), Gold cloud pairing, Corp network mapping created",
        policy_pairing_mapping,
    )

    async def prerequisites() -> str | None:
        ok = drctl(demo, "prereq", demo.facts["vms"]["web-01"]["vm_id"])
        if not ok["ok"]:
            return f"web-01 should pass: {ok['checks']}"
        bad = drctl(demo, "prereq", demo.facts["vms"]["app-01"]["vm_id"])
        failed = [c["rule"] for c in bad["checks"] if c["status"] == "fail"]
        demo.facts["prereq_failure"] = bad
        if bad["ok"] or not failed:
            return f"app-01 (unpaired Silver cloud) should fail: {bad['checks']}"
        reasons = "; ".join(c["message"] for c in bad["checks"] if c["status"] == "fail")
        print(f"     app-01 refused: {reasons}")
        return None

    await demo.check(
        "prerequisites: web-01 (Gold) passes, app-01 (unpaired Silver) fails with reasons",
        prerequisites,
    )
