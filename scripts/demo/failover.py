"""The demo's failover story: a recovery plan, test failover and cleanup, planned failover
with its zero-data-loss proof, commit, reverse replication and failback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

from kit.dr import failback_ready
from kit.files import file_sha256
from kit.poll import eventually
from scripts.demo.harness import JOB_ENDED, Demo, drctl


async def failover_story(demo: Demo, http: httpx.AsyncClient) -> None:
    """Failover: the three VMs in a two-group recovery plan; a test failover whose test VMs'
    disks are checked, then cleaned up; a planned failover with the zero-data-loss proof and a
    manual action approved by the operator; commit; reverse replication; failback."""
    vid = demo.facts["vault_id"]
    fo = f"{demo.url('failover')}/v1/vaults/{vid}"
    reader = {"Authorization": f"Bearer {demo.facts['operator_token']}"}
    items = {i["vm_name"]: i for i in demo.facts["items"]}
    recovery = demo.storage_root("recovery") / "hv-r1"
    primary = demo.storage_root("primary") / "hv-p1"

    async def job_done(job_id: str, timeout: float = 180) -> dict[str, Any]:
        async def ended() -> Any:
            job = (await http.get(f"{fo}/jobs/{job_id}", headers=reader)).json()
            return job if job["state"] in JOB_ENDED else None

        job: dict[str, Any] = await eventually(
            ended, interval=0.25, timeout=timeout, what=f"job {job_id}"
        )
        return job

    def disk_hashes(folder: Path) -> list[str]:
        """SHA-256 of each disk of the VM in `folder` (sorted: disk ids differ by site)."""
        meta = json.loads((folder / "vm.json").read_text())
        return sorted(file_sha256(folder / d["file"]) for d in meta["disks"])

    def sources() -> dict[str, list[str]]:
        return {name: disk_hashes(primary / name) for name in items}

    async def read_through(name: str) -> list[str]:
        """SHA-256 of each disk of VM `name` on hv-r1 as the VM reads it (a test VM runs over
        differencing disks: the host agent reads them through the replica's frozen view)."""
        r1 = json.loads((demo.run_dir / "hv-r1-state" / "identity.json").read_text())
        auth = {"Authorization": f"Bearer {r1['credential']}"}
        meta = json.loads((recovery / name / "vm.json").read_text())
        url = f"{demo.edges['hv-r1'].url}/v1/vms/{name}/disks"
        hashes = []
        for d in meta["disks"]:
            resp = await http.get(f"{url}/{d['id']}/sha256", headers=auth)
            resp.raise_for_status()
            hashes.append(resp.json()["sha256"])
        return sorted(hashes)

    async def plan_ready() -> str | None:
        async def known() -> bool:
            for i in items.values():
                resp = await http.get(f"{fo}/failovers/{i['item_id']}", headers=reader)
                if resp.status_code != 200 or not resp.json().get("latest_seq"):
                    return False
            return True

        await eventually(
            known, interval=0.25, timeout=30, what="the failover service knows the protected items"
        )
        (demo.run_dir / "scripts").mkdir(exist_ok=True)
        script = demo.run_dir / "scripts" / "warm-up.sh"
        script.write_text("#!/bin/sh\necho 'load balancer drained'\n")
        script.chmod(0o755)
        plan = {
            "name": "tier-app",
            "groups": [
                {
                    "items": [items["web-01"]["item_id"], items["web-03"]["item_id"]],
                    "post_actions": [
                        {
                            "action_id": "lb",
                            "name": "drain load balancer",
                            "kind": "script",
                            "script": script.name,
                        }
                    ],
                },
                {
                    "items": [items["sql-01"]["item_id"]],
                    "pre_actions": [
                        {
                            "action_id": "dba",
                            "name": "DBA confirms the switch",
                            "kind": "manual",
                            "run_on": ["planned"],
                        }
                    ],
                },
            ],
        }
        path = demo.run_dir / "plan.json"
        path.write_text(json.dumps(plan))
        drctl(demo, "plan", "create", "tier-app", "--file", str(path))
        return None

    if not await demo.check(
        "recovery plan: 2 groups (web-01 + web-03, then sql-01), "
        "a script and a manual action, created with drctl",
        plan_ready,
    ):
        return

    async def test_failover() -> str | None:
        expected = sources()  # workloads are stopped: the latest point equals the sources
        job = drctl(demo, "plan", "test", "tier-app", "--network", "create")
        done = await job_done(job["job_id"])
        if done["state"] != "succeeded":
            return f"job {done['state']}: {done.get('error')}"
        for name, disks in expected.items():
            meta = json.loads((recovery / f"{name}-test" / "vm.json").read_text())
            if await read_through(f"{name}-test") != disks:
                return f"{name}-test disks differ from the source"
            if not meta["nics"] or not str(meta["nics"][0]["network_id"]).startswith("test-"):
                return f"{name}-test not on the test network: {meta['nics']}"
        print(
            f"     test VMs {', '.join(f'{n}-test' for n in expected)} on hv-r1: differencing "
            "disks over the replica read byte-identical to the sources, NICs on the network "
            "created for the test"
        )
        return None

    await demo.check("plan test failover: test VMs' disks identical to the sources", test_failover)

    async def cleanup() -> str | None:
        job = drctl(demo, "plan", "cleanup", "tier-app")
        done = await job_done(job["job_id"])
        left = [n for n in items if (recovery / f"{n}-test").exists()]
        if done["state"] != "succeeded" or left:
            return f"job {done['state']}, test VMs left: {left}"
        return None

    await demo.check("test failover cleanup removed the test VMs and the test network", cleanup)

    async def planned() -> str | None:
        job = drctl(demo, "plan", "planned", "tier-app")
        job_id = job["job_id"]

        async def waiting() -> Any:
            current = (await http.get(f"{fo}/jobs/{job_id}", headers=reader)).json()
            return current if current["state"] in ("waiting_for_input", *JOB_ENDED) else None

        current = await eventually(waiting, interval=0.25, timeout=180, what="the manual action")
        if current["state"] != "waiting_for_input":
            return f"expected the plan to wait for the DBA, got {current['state']}"
        print("     plan waits for input: 'DBA confirms the switch' -> approved with drctl")
        final = sources()  # web VMs were shut down by group 1 already; sql-01 is next
        drctl(demo, "approve", job_id, "dba")
        done = await job_done(job_id)
        if done["state"] != "succeeded":
            return f"job {done['state']}: {done.get('error')}"
        proofs = [t for t in done["tasks"] if "prove zero data loss" in t["name"]]
        if len(proofs) != 3 or not all(t["detail"].get("proven") for t in proofs):
            return f"zero-data-loss proofs: {[t['detail'] for t in proofs]}"
        final = sources()
        for name, disks in final.items():
            meta = json.loads((recovery / name / "vm.json").read_text())
            if disk_hashes(recovery / name) != disks or meta["state"] != "Running":
                return f"{name} at the recovery site differs from its final source state"
        nic = json.loads((recovery / "web-01" / "vm.json").read_text())["nics"][0]
        names = {n["network_id"]: name for name, n in demo.facts["networks"].items()}
        print(
            "     3 Merkle-root proofs: replica == source's final state; VMs running on hv-r1, "
            f"web-01 on {names.get(nic['network_id'], nic['network_id'])} {nic['ip_address']}"
        )
        return None

    await demo.check(
        "plan planned failover: zero data loss proven, VMs running at recovery", planned
    )

    async def commit_and_reverse() -> str | None:
        # The VMs now run at the recovery site and change there before reverse replication.
        r1 = json.loads((demo.run_dir / "hv-r1-state" / "identity.json").read_text())
        r1_auth = {"Authorization": f"Bearer {r1['credential']}"}
        for name in items:
            resp = await http.post(
                f"{demo.edges['hv-r1'].url}/v1/vms/{name}/writes",
                json={"blocks": 4},
                headers=r1_auth,
            )
            if resp.status_code != 200:
                return f"writes on {name} at the recovery site: {resp.text}"
        for op in ("commit", "reverse"):
            job = drctl(demo, "plan", op, "tier-app")
            done = await job_done(job["job_id"])
            if done["state"] != "succeeded":
                return f"{op}: job {done['state']}: {done.get('error')}"
            demo.facts[op] = done
        rev = demo.facts["reverse"]["result"]["items"]
        demo.facts["reverse_items"] = {k: v["new_item_id"] for k, v in rev.items()}
        vault = f"/v1/vaults/{vid}"
        rep = f"{demo.url('replication')}{vault}/protected-items"

        async def reverse_ready() -> bool:
            for new in demo.facts["reverse_items"].values():
                ready = await failback_ready(
                    http,
                    f"{demo.url('replication')}{vault}",
                    f"{demo.url('failover')}{vault}",
                    new,
                    reader,
                )
                if not ready:
                    return False
            return True

        await eventually(
            reverse_ready,
            interval=0.25,
            timeout=120,
            what="reverse replication past its resync, seen by failover",
        )
        sent = total = 0
        for new in demo.facts["reverse_items"].values():
            item = (await http.get(f"{rep}/{new}", headers=reader)).json()
            total += sum(-(-d["size_bytes"] // 65536) for d in item["disks"])
            points = (await http.get(f"{rep}/{new}/recovery-points", headers=reader)).json()
            sent += sum(p["changed_blocks"] for p in points if p["kind"] == "resync")
        print(
            "     reverse replication hv-r1 -> primary seeded from the old primary disks: "
            f"resync sent {sent} of {total} blocks"
        )
        return None if sent < total / 4 else f"resync sent {sent} of {total} blocks"

    await demo.check(
        "commit, then reverse replication (recovery -> primary, no full copy)", commit_and_reverse
    )

    async def failback() -> str | None:
        jobs = []
        for new in demo.facts["reverse_items"].values():
            resp = await http.post(f"{fo}/failovers/{new}/failback", json={}, headers=reader)
            if resp.status_code != 202:
                return f"failback refused: {resp.text}"
            jobs.append(resp.json()["job_id"])
        for job_id in jobs:
            done = await job_done(job_id, timeout=240)
            if done["state"] != "succeeded":
                return f"failback job {done['state']}: {done.get('error')}"
        running = [
            n
            for n in items
            if json.loads((primary / n / "vm.json").read_text())["state"] == "Running"
        ]
        if len(running) != 3:
            return f"running at the primary after failback: {running}"
        return None

    await demo.check("failback: the 3 VMs run at the primary again, re-protected", failback)
