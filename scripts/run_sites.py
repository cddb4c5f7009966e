"""`make run`'s waits and the site files' VMs (scripts/run.py): services healthy, edges
Connected, the VMs of deploy/sites created on their hosts and discovered."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx

from kit.procs import REPO
from scripts.run_layout import SITES, Layout, service_url
from services.site_provider.sitefile import read_site


def wait_healthy(urls: dict[str, str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    pending = dict(urls)
    while pending:
        for name, url in list(pending.items()):
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    del pending[name]
            except httpx.HTTPError:
                pass
        if pending and time.monotonic() > deadline:
            raise SystemExit(f"not healthy after {timeout:g}s: {', '.join(pending)} (see logs/)")
        time.sleep(0.5)


def wait_connected(vault_id: str, token: str, names: list[str], timeout: float = 120) -> None:
    url = f"{service_url('registration')}/v1/vaults/{vault_id}/producers"
    deadline = time.monotonic() + timeout
    while True:
        found = httpx.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=5).json()
        state = {p["name"]: p["connection_state"] for p in found}
        missing = [n for n in names if state.get(n) != "Connected"]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"not Connected after {timeout:g}s: {', '.join(missing)}")
        time.sleep(1)


def host_vms(lay: Layout, ports: dict[str, int]) -> int:
    """The site files' VMs as disk images on their hosts (the host agents create them: folder,
    sparse disks, a few written blocks), once; the providers then discover them with their
    NICs. Returns how many were created."""
    created = 0
    with httpx.Client(timeout=30) as http:
        for site in SITES:
            spec = read_site(REPO / "deploy" / "sites" / f"{site}.yaml")
            for vm in spec.vms:
                hosts = vm.placement()
                for n, name in enumerate(vm.names()):
                    host = hosts[n % len(hosts)]
                    identity = json.loads((lay.run / "edge" / host / "identity.json").read_text())
                    agent = f"http://127.0.0.1:{ports[host]}/v1/vms"
                    auth = {"Authorization": f"Bearer {identity['credential']}"}
                    body = {
                        "name": name,
                        "disks": [d.size for d in vm.disks],
                        "generation": vm.generation,
                        "cpu": vm.cpu,
                        "memory_mb": vm.memory_mb,
                    }
                    resp = http.post(agent, json=body, headers=auth)
                    if resp.status_code == 409:
                        continue  # created by an earlier `make run`
                    resp.raise_for_status()
                    meta = lay.run / "sites" / site / host / name / "vm.json"
                    data = json.loads(meta.read_text())
                    data["nics"] = [
                        {
                            "nic_id": f"nic{i}",
                            "network": nic.network,
                            "subnet": nic.subnet,
                            "ip": nic.ip if nic.ip in ("dhcp", "static") else "static",
                        }
                        for i, nic in enumerate(vm.nics)
                    ]
                    meta.write_text(json.dumps(data))
                    http.post(f"{agent}/{name}/writes", json={"blocks": 16}, headers=auth)
                    created += 1
    return created


def site_vm_names() -> set[str]:
    return {
        name
        for site in SITES
        for vm in read_site(REPO / "deploy" / "sites" / f"{site}.yaml").vms
        for name in vm.names()
    }


def wait_discovered(vault_id: str, token: str, timeout: float = 120) -> int:
    """Until the inventory lists every VM of the site files with disk images that exist."""
    url = f"{service_url('inventory')}/v1/vaults/{vault_id}/vms"
    wanted = site_vm_names()
    deadline = time.monotonic() + timeout
    while True:
        page = httpx.get(
            url, params={"limit": 500}, headers={"Authorization": f"Bearer {token}"}, timeout=10
        ).json()
        ready = {
            vm["name"]
            for vm in page.get("items", [])
            if vm["disks"] and all(Path(d["path"]).exists() for d in vm["disks"])
        }
        if wanted <= ready:
            return len(wanted)
        if time.monotonic() > deadline:
            raise SystemExit(f"not discovered after {timeout:g}s: {sorted(wanted - ready)}")
        time.sleep(1)
