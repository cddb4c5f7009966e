"""A two-site disaster-recovery setup for e2e tests: a vault with tokens, a primary and a
recovery site (providers with generated site files, host agents on the sites' hosts), a
policy, a cloud pairing and a network mapping, on a `Platform` whose services are running."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from kit.platform import Platform
from kit.poll import eventually
from kit.procs import Proc
from shared import signing


def site_file(
    site: str, hosts: list[str], vms: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    tag = site.capitalize()
    return {
        "site": site,
        "clouds": [{"name": f"Gold-{tag}", "host_groups": [f"HG-{tag}"]}],
        "networks": [
            {
                "name": f"Corp-{tag}",
                "subnets": [
                    {
                        "name": "corp",
                        "cidr": "10.10.0.0/24" if site == "primary" else "10.20.0.0/24",
                        "static_pool": {
                            "start": "10.10.0.100" if site == "primary" else "10.20.0.100",
                            "end": "10.10.0.199" if site == "primary" else "10.20.0.199",
                        },
                    }
                ],
            },
            {
                "name": f"Test-{tag}",
                "isolated": True,
                "subnets": [{"name": "corp", "cidr": "10.99.0.0/24"}],
            },
        ],
        "hosts": [
            {
                "name": h,
                "cloud": f"Gold-{tag}",
                "os_version": "Windows Server 2022",
                "storage_dir": h,
            }
            for h in hosts
        ],
        "vms": vms or [],
    }


@dataclass
class DrSetup:
    plat: Platform
    root: Path
    vault_id: str = ""
    admin: str = ""
    operator: str = ""
    reader: str = ""
    key: str = ""
    agents: dict[str, Proc] = field(default_factory=dict)
    providers: dict[str, Proc] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    heartbeat_seconds: str = "1"  # of the agents and providers it starts

    def storage(self, site: str, host: str) -> Path:
        return self.root / site / host

    def bearer(self, token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    def url(self, service: str, suffix: str = "") -> str:
        return f"{self.plat.url(service)}/v1/vaults/{self.vault_id}{suffix}"

    def agent_credential(self, host: str) -> str:
        identity = json.loads((self.root / f"agent-{host}-state" / "identity.json").read_text())
        return str(identity["credential"])

    def agent_identity(self, host: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(
            (self.root / f"agent-{host}-state" / "identity.json").read_text()
        )
        return data

    async def agent_call(
        self, http: httpx.AsyncClient, host: str, method: str, path: str, body: Any = None
    ) -> Any:
        resp = await http.request(
            method,
            f"{self.agents[host].url}/v1{path}",
            json=body,
            headers=self.bearer(self.agent_credential(host)),
        )
        assert resp.is_success, resp.text
        return resp.json()

    def start_agent(self, site: str, host: str, **env: str) -> Proc:
        storage = self.storage(site, host)
        storage.mkdir(parents=True, exist_ok=True)
        proc = self.plat.edge(
            "services.host_agent",
            "DR_AGENT_",
            f"agent-{host}",
            {
                "DR_AGENT_REGISTRATION_KEY": self.key,
                "DR_AGENT_REGISTRATION_URL": self.plat.url("registration"),
                "DR_AGENT_NAME": host,
                "DR_AGENT_SITE": site,
                "DR_AGENT_STORAGE_DIR": str(storage),
                "DR_AGENT_HEARTBEAT_SECONDS": self.heartbeat_seconds,
                "DR_AGENT_EXPORT_ROOTS": str(self.root),
                **env,
            },
        )
        proc.log_path = self.root / f"agent-{host}.log"
        proc.env["DR_AGENT_STATE_DIR"] = str(self.root / f"agent-{host}-state")
        self.agents[host] = proc.start()
        return proc

    def start_provider(self, site: str, spec: dict[str, Any]) -> Proc:
        path = self.root / f"{site}.yaml"
        path.write_text(yaml.safe_dump(spec))
        proc = self.plat.edge(
            "services.site_provider",
            "DR_PROVIDER_",
            f"vmm-{site}",
            {
                "DR_PROVIDER_REGISTRATION_KEY": self.key,
                "DR_PROVIDER_REGISTRATION_URL": self.plat.url("registration"),
                "DR_PROVIDER_NAME": f"vmm-{site}",
                "DR_PROVIDER_SITE": site,
                "DR_PROVIDER_SITE_FILE": str(path),
                "DR_PROVIDER_STORAGE_ROOT": str(self.root / site),
                "DR_PROVIDER_DISCOVERY_INTERVAL_SECONDS": "0.5",
                "DR_PROVIDER_HEARTBEAT_SECONDS": self.heartbeat_seconds,
            },
        )
        # This setup's own state (identity) and log: a session runs several setups, each in
        # its own vault, and a provider reusing another setup's identity publishes there.
        proc.log_path = self.root / f"vmm-{site}.log"
        proc.env["DR_PROVIDER_STATE_DIR"] = str(self.root / f"vmm-{site}-state")
        self.providers[site] = proc.start()
        return proc


async def two_sites(
    plat: Platform,
    http: httpx.AsyncClient,
    root: Path,
    *,
    primary_hosts: tuple[str, ...] = ("hv-p1",),
    recovery_hosts: tuple[str, ...] = ("hv-r1",),
    primary_vms: list[dict[str, Any]] | None = None,
    copy_seconds: int = 2,
    agents_on: tuple[str, ...] | None = None,
    policy_settings: dict[str, Any] | None = None,
    heartbeat_seconds: float = 1,
) -> DrSetup:
    """Everything up to "ready to enable replication"."""
    for name in ("registration", "inventory", "policy", "replication"):
        plat.start(name)
    dr = DrSetup(plat=plat, root=root, heartbeat_seconds=f"{heartbeat_seconds:g}")
    vault = await plat.new_vault(http, "dr")
    dr.vault_id = vault["vault_id"]
    dr.admin = await plat.new_token(http, dr.vault_id, "admin")
    dr.operator = await plat.new_token(http, dr.vault_id, "operator")
    dr.reader = await plat.new_token(http, dr.vault_id, "reader")
    dr.key = (await plat.new_key(http, dr.vault_id))["key"]
    for host in agents_on if agents_on is not None else (*primary_hosts, *recovery_hosts):
        site = "primary" if host in primary_hosts else "recovery"
        dr.start_agent(site, host)
    dr.start_provider("primary", site_file("primary", list(primary_hosts), primary_vms))
    dr.start_provider("recovery", site_file("recovery", list(recovery_hosts)))

    async def clouds() -> dict[str, Any] | None:
        resp = await http.get(dr.url("inventory", "/clouds"), headers=dr.bearer(dr.reader))
        found = {c["name"]: c for c in resp.json()} if resp.is_success else {}
        return found if len(found) == 2 else None

    found = await eventually(clouds, timeout=60, what="both sites' clouds discovered")
    networks = (
        await http.get(dr.url("inventory", "/networks"), headers=dr.bearer(dr.reader))
    ).json()
    nets = {n["name"]: n for n in networks}
    admin = dr.bearer(dr.admin)
    policy_name = f"p{secrets.token_hex(3)}"
    resp = await http.post(
        dr.url("policy", "/policies"),
        json={
            "name": policy_name,
            "settings": {
                "copy_frequency_seconds": copy_seconds,
                "recovery_points": 1,
                "compression": True,
                **(policy_settings or {}),
            },
        },
        headers=admin,
    )
    assert resp.status_code == 201, resp.text
    dr.facts["policy"] = resp.json()

    async def paired() -> dict[str, Any] | None:
        resp = await http.post(
            dr.url("policy", "/pairings"),
            json={
                "source_cloud_id": found["Gold-Primary"]["cloud_id"],
                "target_cloud_id": found["Gold-Recovery"]["cloud_id"],
                "policy": policy_name,
            },
            headers=admin,
        )
        return resp.json() if resp.status_code == 201 else None  # target provider Connected

    dr.facts["pairing"] = await eventually(paired, timeout=60, what="cloud pairing")
    resp = await http.post(
        dr.url("policy", "/network-mappings"),
        json={
            "source_network_id": nets["Corp-Primary"]["network_id"],
            "target_network_id": nets["Corp-Recovery"]["network_id"],
        },
        headers=admin,
    )
    assert resp.status_code == 201, resp.text
    dr.facts["networks"] = nets
    dr.facts["clouds"] = found
    return dr


async def vm_named(http: httpx.AsyncClient, dr: DrSetup, name: str) -> dict[str, Any]:
    async def find() -> dict[str, Any] | None:
        resp = await http.get(
            dr.url("inventory", "/vms"), params={"name": name}, headers=dr.bearer(dr.reader)
        )
        items = (
            [v for v in resp.json().get("items", []) if v["name"] == name]
            if resp.is_success
            else []
        )
        return items[0] if items and items[0].get("disks") else None

    return await eventually(find, timeout=30, what=f"VM {name} discovered")


async def protect(http: httpx.AsyncClient, dr: DrSetup, vm_id: str) -> dict[str, Any]:
    """Enable replication (retrying while the replication service's read models catch up)."""

    async def enabled() -> dict[str, Any] | None:
        resp = await http.post(
            dr.url("replication", "/protected-items"),
            json={"vm_id": vm_id},
            headers=dr.bearer(dr.operator),
        )
        if resp.status_code == 202:
            return dict(resp.json())
        assert resp.status_code in (404, 409), resp.text
        return None

    return await eventually(enabled, timeout=30, what="replication enabled")


async def item(http: httpx.AsyncClient, dr: DrSetup, item_id: str) -> dict[str, Any]:
    resp = await http.get(
        dr.url("replication", f"/protected-items/{item_id}"), headers=dr.bearer(dr.reader)
    )
    assert resp.is_success, resp.text
    return dict(resp.json())


async def points(http: httpx.AsyncClient, dr: DrSetup, item_id: str) -> list[dict[str, Any]]:
    resp = await http.get(
        dr.url("replication", f"/protected-items/{item_id}/recovery-points"),
        headers=dr.bearer(dr.reader),
    )
    assert resp.is_success, resp.text
    return list(resp.json())


async def register_agent(http: httpx.AsyncClient, plat: Platform, key: str, name: str) -> Any:
    """Register a host agent of the primary site without running one (a scripted stand-in):
    the registration's answer, with the private key of the public key it registered."""
    private_key = signing.new_private_key()
    resp = await http.post(
        f"{plat.url('registration')}/v1/registrations",
        json={
            "kind": "agent",
            "name": name,
            "site": "primary",
            "heartbeat_interval_seconds": 60,
            "public_key": signing.public_key_hex(private_key),
        },
        headers={"Authorization": f"Bearer {key}"},
    )
    assert resp.status_code == 201, resp.text
    return {**resp.json(), "private_key": private_key}


# -- failover ---------------------------------------------------------------------------

FINISHED = ("succeeded", "failed", "completed_with_errors")


async def failover_up(platform: Platform, http: httpx.AsyncClient, dr: DrSetup) -> Any:
    """The failover service, once it knows the vault's tokens."""
    proc = platform.start("failover")

    async def tokens_known() -> bool:
        for token in (dr.reader, dr.operator):
            resp = await http.get(dr.url("failover", "/jobs"), headers=dr.bearer(token))
            if resp.status_code != 200:
                return False
        return True

    await eventually(tokens_known, timeout=30, what="the failover service knows the tokens")
    return proc


async def failover_known(http: httpx.AsyncClient, dr: DrSetup, item_id: str, seq: int = 1) -> None:
    async def known() -> bool:
        resp = await http.get(
            dr.url("failover", f"/failovers/{item_id}"), headers=dr.bearer(dr.reader)
        )
        return resp.status_code == 200 and (resp.json()["latest_seq"] or 0) >= seq

    await eventually(known, timeout=30, what="the failover service knows the item")


async def start(
    http: httpx.AsyncClient,
    dr: DrSetup,
    path: str,
    body: dict[str, Any] | None = None,
    token: str | None = None,
) -> httpx.Response:
    return await http.post(
        dr.url("failover", path), json=body or {}, headers=dr.bearer(token or dr.operator)
    )


async def finished(
    http: httpx.AsyncClient, dr: DrSetup, job_id: str, timeout: float = 120
) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        resp = await http.get(dr.url("failover", f"/jobs/{job_id}"), headers=dr.bearer(dr.reader))
        body: dict[str, Any] = resp.json()
        if body["state"] in FINISHED:
            body["failed_tasks"] = [t for t in body["tasks"] if t["state"] == "failed"]
            return body
        return None

    return await eventually(done, timeout=timeout, interval=0.3, what=f"job {job_id} finished")


READY_FOR_FAILBACK = ("replicating", "synced")


async def failback_ready(
    http: httpx.AsyncClient, replication: str, failover: str, item_id: str, headers: dict[str, str]
) -> bool:
    """A reverse-replication item is ready for failback once its resync against the seed has
    committed a point (replication service) AND the failover service, which decides on the
    failback, has seen that point and state: its view follows the replication events, so it may
    be a few events behind the replication service's answer. `replication` and `failover` are
    the vault's base URLs (`.../v1/vaults/<id>`)."""
    item = (await http.get(f"{replication}/protected-items/{item_id}", headers=headers)).json()
    if item.get("state") not in READY_FOR_FAILBACK or not item.get("last_committed_seq"):
        return False
    view = (await http.get(f"{failover}/failovers/{item_id}", headers=headers)).json()
    return bool(
        view.get("replication_state") in READY_FOR_FAILBACK
        and (view.get("latest_seq") or 0) >= item["last_committed_seq"]
    )
