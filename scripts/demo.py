"""`make demo`: brings the platform up locally (no Docker) on the stack `make up` started, runs
the scripted DR scenario and prints what it verified, one `PASS <check>` or
`FAIL <check>: <why>` line per check, then exits non-zero if any check failed.

Every run uses a fresh database and topic prefix, so it can be repeated; logs of every process
go to `.state/demo/<run>/`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import subprocess
import sys
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from kit.dr import failback_ready
from kit.platform import Platform
from kit.poll import eventually
from kit.procs import REPO, Proc
from kit.stack import fresh_database, random_prefix, stack_from_env
from shared import signing, topics
from shared.kafka.producer import KafkaProducer
from shared.schemas.envelope import new_envelope
from shared.schemas.registration import Heartbeat, ProducerKind

Check = Callable[[], Awaitable[str | None]]
PLATFORM_SERVICES = ("registration", "inventory", "policy", "replication", "failover")


# The demo's own settings over the platform's (kit.platform): a longer final-sync bound and
# the service's default step timeout (a slow machine), materialising only under this run.
DEMO_WIRING: dict[str, dict[str, str]] = {
    "replication": {"DR_REPLICATION_HEALTH_INTERVAL_SECONDS": "1"},
    "failover": {
        "DR_FAILOVER_SYNC_TIMEOUT_SECONDS": "30",
        "DR_FAILOVER_STEP_TIMEOUT_SECONDS": "1800",
    },
}


@dataclass
class Demo:
    platform: Platform
    edges: dict[str, Proc] = field(default_factory=dict)
    results: list[tuple[str, str | None]] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return self.platform.log_dir

    @property
    def kafka(self) -> str:
        return self.platform.stack.kafka

    @property
    def prefix(self) -> str:
        return self.platform.prefix

    async def check(self, what: str, step: Check) -> bool:
        """Run one check; it returns None (pass) or raises/returns why it failed."""
        try:
            why = await step()
        except Exception as exc:  # a demo check reports, it does not crash the demo
            why = f"{type(exc).__name__}: {exc}"
            (self.run_dir / "errors.log").open("a").write(traceback.format_exc())
        self.results.append((what, why))
        print(f"PASS {what}" if why is None else f"FAIL {what}: {why}", flush=True)
        return why is None

    def start_service(self, name: str) -> Proc:
        wiring = dict(DEMO_WIRING.get(name, {}))
        if name == "replication":
            wiring["DR_REPLICATION_MATERIALISE_ROOTS"] = str(self.run_dir)
        return self.platform.start(name, wiring)

    def start_edge(self, module: str, prefix: str, label: str, env: dict[str, str]) -> Proc:
        proc = self.platform.edge(module, prefix, label, env)
        self.edges[label] = proc.start()
        return proc

    def admin(self) -> dict[str, str]:
        return self.platform.admin()

    def storage_root(self, site: str) -> Path:
        """Host storage folders of a site: <root>/<host name>/<vm name>/..."""
        return self.run_dir / "sites" / site

    def url(self, service: str) -> str:
        return self.platform.url(service)

    def stop(self) -> None:
        self.platform.stop_all()


async def registration_story(demo: Demo, http: httpx.AsyncClient) -> None:
    """Registration: vault, keys, two site providers and two host agents Connected, one stopped."""

    async def services_healthy() -> str | None:
        for name in PLATFORM_SERVICES:
            demo.start_service(name)
        for name in PLATFORM_SERVICES:
            health = (await http.get(f"{demo.url(name)}/healthz")).json()
            if health["status"] != "ok":
                return f"{name}: {json.dumps(health)}"
        return None

    if not await demo.check(
        f"services started and healthy: {', '.join(PLATFORM_SERVICES)}", services_healthy
    ):
        return

    async def vault() -> str | None:
        resp = await http.post(
            f"{demo.url('registration')}/v1/vaults",
            json={"name": f"contoso-dr-{secrets.token_hex(2)}"},
            headers=demo.admin(),
        )
        if resp.status_code != 201:
            return resp.text
        demo.facts["vault_id"] = resp.json()["vault_id"]
        token = await http.post(
            f"{demo.url('registration')}/v1/vaults/{demo.facts['vault_id']}/tokens",
            json={"name": "operator-1", "role": "operator"},
            headers=demo.admin(),
        )
        demo.facts["operator_token"] = token.json()["token"]
        admin = await http.post(
            f"{demo.url('registration')}/v1/vaults/{demo.facts['vault_id']}/tokens",
            json={"name": "admin-1", "role": "admin"},
            headers=demo.admin(),
        )
        demo.facts["admin_token"] = admin.json()["token"]
        return None

    if not await demo.check("vault created, admin and operator tokens issued", vault):
        return
    vid = demo.facts["vault_id"]

    async def key() -> str | None:
        resp = await http.post(
            f"{demo.url('registration')}/v1/vaults/{vid}/registration-keys",
            json={},
            headers=demo.admin(),
        )
        body = resp.json()
        demo.facts["registration_key"] = body["key"]
        created = body["created_at"][:19]
        expires = body["expires_at"][:19]
        days = (
            time.mktime(time.strptime(expires, "%Y-%m-%dT%H:%M:%S"))
            - time.mktime(time.strptime(created, "%Y-%m-%dT%H:%M:%S"))
        ) / 86400
        return None if round(days) == 5 else f"key valid for {days:.2f} days, expected 5"

    await demo.check("registration key generated, valid 5 days", key)

    edge_env = {
        "REGISTRATION_KEY": demo.facts["registration_key"],
        "REGISTRATION_URL": demo.url("registration"),
        "HEARTBEAT_SECONDS": "1",
    }
    # Host agents are named like the hosts of the site files and use their storage folders,
    # so the VMs they run are the ones the providers discover.
    layout = [
        ("services.site_provider", "DR_PROVIDER_", "vmm-primary", "primary"),
        ("services.site_provider", "DR_PROVIDER_", "vmm-recovery", "recovery"),
        ("services.host_agent", "DR_AGENT_", "hv-p1", "primary"),
        ("services.host_agent", "DR_AGENT_", "hv-r1", "recovery"),
    ]

    async def producers() -> dict[str, Any]:
        resp = await http.get(
            f"{demo.url('registration')}/v1/vaults/{vid}/producers",
            headers={"Authorization": f"Bearer {demo.facts['operator_token']}"},
        )
        return {p["name"]: p for p in resp.json()}

    async def edges_connected() -> str | None:
        for module, prefix, name, site in layout:
            env = {f"{prefix}{k}": v for k, v in edge_env.items()}
            env |= {f"{prefix}NAME": name, f"{prefix}SITE": site}
            if prefix == "DR_PROVIDER_":
                env[f"{prefix}SITE_FILE"] = str(REPO / "deploy" / "sites" / f"{site}.yaml")
                env[f"{prefix}STORAGE_ROOT"] = str(demo.storage_root(site))
                env[f"{prefix}DISCOVERY_INTERVAL_SECONDS"] = "1"
            else:
                env[f"{prefix}STORAGE_DIR"] = str(demo.storage_root(site) / name)
            demo.start_edge(module, prefix, name, env)

        async def connected() -> bool:
            found = await producers()
            return len(found) == 4 and all(
                p["connection_state"] == "Connected" for p in found.values()
            )

        await eventually(
            connected, interval=0.25, timeout=30, what="providers and agents Connected"
        )
        found = await producers()
        demo.facts["producers"] = found
        kinds = sorted(p["kind"] for p in found.values())
        return None if kinds == ["agent", "agent", "provider", "provider"] else str(kinds)

    await demo.check(
        "primary + recovery site providers and 2 host agents Connected", edges_connected
    )

    async def refused_reregistration() -> str | None:
        resp = await http.post(
            f"{demo.url('registration')}/v1/registrations",
            json={
                "kind": "agent",
                "name": "hv-p1",
                "site": "primary",
                "public_key": signing.public_key_hex(signing.new_private_key()),
            },
            headers={"Authorization": f"Bearer {demo.facts['registration_key']}"},
        )
        if resp.status_code != 409 or "force=true" not in resp.text:
            return f"{resp.status_code} {resp.text}"
        return None

    await demo.check(
        "re-registering a registered agent without force is refused (409)", refused_reregistration
    )

    async def forged_heartbeat() -> str | None:
        agent = demo.facts["producers"]["hv-r1"]
        env = new_envelope(
            Heartbeat(kind=ProducerKind.AGENT, sequence=99, interval_seconds=1),
            vault_id=uuid.UUID(vid),
            producer_id=agent["producer_id"],
            signing_key=signing.new_private_key(),
        )
        producer = KafkaProducer(demo.kafka, demo.prefix, "demo")
        await producer.start()
        try:
            await producer.publish(
                env, key=agent["producer_id"], topic=topics.REGISTRATION_HEARTBEATS
            )
        finally:
            await producer.stop()

        async def dead_lettered() -> bool:
            text = (await http.get(f"{demo.url('registration')}/metrics")).text
            return 'reason="bad_signature"' in text

        await eventually(
            dead_lettered, interval=0.25, timeout=20, what="forged heartbeat dead-lettered"
        )
        return None

    await demo.check("a forged heartbeat lands in the DLQ as bad_signature", forged_heartbeat)

    async def agent_disconnects() -> str | None:
        demo.edges["hv-p1"].stop()

        async def disconnected() -> bool:
            return (await producers())["hv-p1"]["connection_state"] == "Disconnected"

        await eventually(disconnected, interval=0.25, timeout=20, what="stopped agent Disconnected")
        others = await producers()
        still = [n for n, p in others.items() if p["connection_state"] == "Connected"]
        return None if len(still) == 3 else f"connected: {still}"

    await demo.check("stopped agent shown Disconnected after missed heartbeats", agent_disconnects)

    async def agent_reconnects() -> str | None:
        demo.edges["hv-p1"].start(extra_env={"DR_AGENT_REGISTRATION_KEY": ""})

        async def connected() -> bool:
            return (await producers())["hv-p1"]["connection_state"] == "Connected"

        await eventually(connected, interval=0.25, timeout=30, what="restarted agent Connected")
        return None

    await demo.check("restarted agent reconnects with its saved credential", agent_reconnects)


def drctl(demo: Demo, *args: str) -> Any:
    """Run the operator CLI as a user would (`drctl ... --json`); returns its JSON output."""
    env = {
        **os.environ,
        "DR_REGISTRATION_URL": demo.url("registration"),
        "DR_INVENTORY_URL": demo.url("inventory"),
        "DR_POLICY_URL": demo.url("policy"),
        "DR_REPLICATION_URL": demo.url("replication"),
        "DR_FAILOVER_URL": demo.url("failover"),
        "DR_TOKEN": demo.facts["admin_token"],
        "DR_VAULT": demo.facts["vault_id"],
    }
    proc = subprocess.run(
        [sys.executable, "-m", "services.cli", *args, "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
    )
    if proc.returncode != 0:
        raise AssertionError(f"drctl {' '.join(args)} failed: {proc.stderr.strip() or proc.stdout}")
    return json.loads(proc.stdout) if proc.stdout.strip() else None


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


def files_exist(paths: list[str]) -> bool:
    return all(Path(p).is_file() for p in paths)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


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
            out = demo.run_dir / "verify" / name
            result = (
                await http.post(
                    f"{rep}/{i['item_id']}/recovery-points/{point['cycle_seq']}/materialise",
                    json={"target_dir": str(out)},
                    headers=reader,
                )
            ).json()
            sources = {d["disk_id"]: Path(d["path"]) for d in i["disks"]}
            for disk in result["disks"]:
                if disk["sha256"] != sha256_of(sources[disk["disk_id"]]):
                    return f"{name}: disk {disk['disk_id']} differs from the source"
            print(
                f"     {name:<7} point {point['cycle_seq']}: Merkle roots re-verified, "
                f"{len(result['disks'])} disk(s) byte-identical to the source"
            )
        return None

    await demo.check(
        "latest point of each VM verified and byte-identical to its source disks", verified
    )


JOB_ENDED = ("succeeded", "failed", "completed_with_errors")


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
        return sorted(sha256_of(folder / d["file"]) for d in meta["disks"])

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


async def run() -> int:
    stack = stack_from_env()
    problem = stack.reachable()
    if problem:
        print(f"FAIL stack: {problem}")
        return 1
    run_id = time.strftime("%Y%m%d-%H%M%S")
    run_dir = REPO / ".state" / "demo" / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    platform = Platform(
        stack=stack,
        database_url=await fresh_database(stack, f"demo_{run_id.replace('-', '_')}"),
        prefix=random_prefix("demo"),
        log_dir=run_dir,
    )
    demo = Demo(platform)
    print(f"demo run {run_id}: logs in {run_dir.relative_to(REPO)}, topic prefix {demo.prefix}")
    try:
        async with httpx.AsyncClient(timeout=15) as http:
            await registration_story(demo, http)
            if all(why is None for _, why in demo.results):
                await inventory_policy_story(demo, http)
            if all(why is None for _, why in demo.results):
                await replication_story(demo, http)
            if all(why is None for _, why in demo.results):
                await failover_story(demo, http)
    finally:
        demo.stop()
    failed = [what for what, why in demo.results if why is not None]
    print(f"\n{len(demo.results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed or not demo.results else 0


def main() -> None:
    sys.exit(asyncio.run(run()))


if __name__ == "__main__":
    main()
