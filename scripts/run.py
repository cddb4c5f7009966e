"""`make run` / `make stop` / `make ps`: the whole platform in the background for an operator,
under supervisord (restarts a process that crashes; one log per process).

    python -m scripts.run start    # the five services, then a vault `default` and a
                                   # registration key (scripts/bootstrap.py), then both sites'
                                   # providers and one host agent per host of deploy/sites/*.yaml
    python -m scripts.run status   # one line per process (exit 1 if one is not RUNNING)
    python -m scripts.run stop     # stops every process and supervisord itself

It runs on the stack `make up` started (Kafka, PostgreSQL and the gateway; `stack.env`), with a
database of its own (`DR_RUN_DATABASE`, default `dr_platform`) and the services on the ports the
gateway routes to (`DR_<SERVICE>_HTTP_PORT`, default 8101..8105). Files live under
`DR_RUN_DIR` (default: `DR_STATE_DIR`, else `.state`):

    logs/<process>.log           every process's output (supervisord.log: the supervisor's)
    run/admin-token              the generated bootstrap admin token (0600)
    run/metrics-token            the generated token of the services' /metrics (0600)
    run/prometheus.yml           a scrape config of this platform (it sends that token):
                                 prometheus --config.file=<it>
    run/supervisord.conf         the supervisor's configuration (0600: it holds the token)
    run/sites/<site>/<host>/     the hosts' VM storage; run/edge/<name>/ the edges' identities
    run/replica/                 the replica store
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from kit import procs
from kit.procs import REPO
from scripts import bootstrap, prometheus_config
from scripts.run_layout import SERVICES, SITES, VENV_BIN, Layout, layout, service_port, service_url
from scripts.run_sites import host_vms, wait_connected, wait_discovered, wait_healthy
from scripts.run_supervisor import child_pids, ctl, supervisor_pid, write_conf
from services.site_provider.sitefile import read_site
from shared import db


def admin_token(lay: Layout) -> str:
    """The bootstrap admin token: generated once, kept in a file only its owner can read."""
    return _secret(lay.token_file, "adm_")


def metrics_token(lay: Layout) -> str:
    """The token of the services' /metrics (DR_METRICS_TOKEN), kept like the admin token."""
    return _secret(lay.metrics_token_file, "mtr_")


def _secret(path: Path, prefix: str) -> str:
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    token = f"{prefix}{secrets.token_urlsafe(24)}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    return token


def write_prometheus_config(lay: Layout, ports: Mapping[str, int]) -> None:
    """A scrape config of this platform: the services (with the metrics token, from its file)
    and the edges on their ports; the platform's alert rules."""
    edges: dict[str, list[tuple[str, dict[str, str]]]] = {"site_provider": [], "host_agent": []}
    for site in SITES:
        edges["site_provider"].append((f"127.0.0.1:{ports[f'vmm-{site}']}", {"site": site}))
        for spec in read_site(REPO / "deploy/sites" / f"{site}.yaml").hosts:
            for host in spec.names():
                edges["host_agent"].append((f"127.0.0.1:{ports[host]}", {"site": site}))
    services: dict[str, list[tuple[str, dict[str, str]]]] = {
        n: [(f"127.0.0.1:{service_port(n)}", {})] for n in SERVICES
    }
    targets = services | edges
    lay.prometheus_file.write_text(
        prometheus_config.render(
            targets,
            rule_files=[str(prometheus_config.ALERTS)],
            credentials_file=str(lay.metrics_token_file),
            authorized_jobs=prometheus_config.PLATFORM_JOBS,
            header="# written by `python -m scripts.run start` (make run); do not edit\n",
        )
    )


async def ensure_database(url: str, name: str) -> str:
    """The platform's own database on the stack's PostgreSQL (created once)."""
    conn = await db.connect(url, timeout=10)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return db.with_database(url, name)


def platform_env(lay: Layout, token: str, database_url: str, kafka: str) -> dict[str, str]:
    return {
        "KAFKA_BOOTSTRAP_SERVERS": kafka,
        "DATABASE_URL": database_url,
        "DR_TOPIC_PREFIX": os.environ.get("DR_TOPIC_PREFIX", ""),
        "DR_ADMIN_TOKEN": token,
        "DR_LOG_LEVEL": os.environ.get("DR_LOG_LEVEL", "INFO"),
    }


def service_programs(lay: Layout, env: dict[str, str]) -> dict[str, dict[str, str]]:
    """The services' environments: the platform's, their ports, the metrics token (which the
    edges do not get)."""
    programs: dict[str, dict[str, str]] = {}
    for name in SERVICES:
        wiring = {
            f"DR_{name.upper()}_HTTP_PORT": str(service_port(name)),
            "DR_METRICS_TOKEN": metrics_token(lay),
        }
        if name == "replication":
            wiring |= {
                "DR_REPLICATION_POLICY_URL": service_url("policy"),
                "DR_REPLICATION_STORE_DIR": str(lay.run / "replica"),
                "DR_REPLICATION_MATERIALISE_ROOTS": str(lay.run / "sites"),
            }
        own = procs.edge_ca(env) if name == "registration" else {}
        programs[name] = {**env, **procs.kafka_identity(env, name), **own, **wiring}
    return programs


def edge_programs(
    lay: Layout, env: dict[str, str], key: str, ports: dict[str, int]
) -> dict[str, tuple[str, dict[str, str]]]:
    """Both sites' site providers and one host agent per host of the site files. An edge gets
    Kafka's address and its registration key, never the admin token or the database URL."""
    edges: dict[str, tuple[str, dict[str, str]]] = {}
    env = {k: v for k, v in env.items() if k not in ("DR_ADMIN_TOKEN", "DATABASE_URL")}
    for site in SITES:
        site_file = REPO / "deploy" / "sites" / f"{site}.yaml"
        storage = lay.run / "sites" / site
        common = {"REGISTRATION_KEY": key, "REGISTRATION_URL": service_url("registration")}
        provider = f"vmm-{site}"
        edges[provider] = (
            "services.site_provider",
            {
                **env,
                **procs.edge_kafka(env),
                **{f"DR_PROVIDER_{k}": v for k, v in common.items()},
                "DR_PROVIDER_NAME": provider,
                "DR_PROVIDER_SITE": site,
                "DR_PROVIDER_SITE_FILE": str(site_file),
                "DR_PROVIDER_STORAGE_ROOT": str(storage),
                "DR_PROVIDER_STATE_DIR": str(lay.run / "edge" / provider),
                "DR_PROVIDER_HTTP_PORT": str(ports[provider]),
            },
        )
        for spec in read_site(site_file).hosts:
            for host in spec.names():
                edges[host] = (
                    "services.host_agent",
                    {
                        **env,
                        **procs.edge_kafka(env),
                        **{f"DR_AGENT_{k}": v for k, v in common.items()},
                        "DR_AGENT_NAME": host,
                        "DR_AGENT_SITE": site,
                        "DR_AGENT_STORAGE_DIR": str(storage / host),
                        "DR_AGENT_STATE_DIR": str(lay.run / "edge" / host),
                        "DR_AGENT_HTTP_PORT": str(ports[host]),
                    },
                )
    return edges


def edge_ports(lay: Layout, names: list[str]) -> dict[str, int]:
    """Each edge's HTTP port, chosen once and kept (run/edge-ports.json)."""
    path = lay.run / "edge-ports.json"
    ports: dict[str, int] = json.loads(path.read_text()) if path.exists() else {}
    for name in names:
        ports.setdefault(name, procs.free_port())
    path.write_text(json.dumps(ports, indent=1))
    return ports


def start() -> int:
    lay = layout()
    stack = procs.read_stack_env()
    kafka = os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or stack.get("KAFKA_BOOTSTRAP_SERVERS")
    database = os.environ.get("DATABASE_URL") or stack.get("DATABASE_URL")
    if not kafka or not database:
        print("no stack: run `make up` first (or set KAFKA_BOOTSTRAP_SERVERS and DATABASE_URL)")
        return 2
    for folder in (lay.logs, lay.run):
        folder.mkdir(parents=True, exist_ok=True)
    token = admin_token(lay)
    db_url = asyncio.run(
        ensure_database(database, os.environ.get("DR_RUN_DATABASE", "dr_platform"))
    )
    env = platform_env(lay, token, db_url, kafka)
    programs = {n: (f"services.{n}", e) for n, e in service_programs(lay, env).items()}
    vault_file = lay.key_file.parent / "vault_id"
    if supervisor_pid(lay) is not None and vault_file.exists():
        print(ctl(lay, "status", check=False).stdout.rstrip())
        print("already running")
        connect_info(lay, stack.get("DR_GATEWAY_URL", ""), vault_file.read_text().strip())
        return 0
    if supervisor_pid(lay) is None:
        write_conf(lay, programs)
        subprocess.run([str(VENV_BIN / "supervisord"), "-c", str(lay.conf)], check=True)
    wait_healthy({n: service_url(n) for n in SERVICES})
    print(f"services healthy: {', '.join(SERVICES)}")

    # A vault `default` and a registration key for the edges (scripts/bootstrap.py).
    os.environ |= {
        "DR_REGISTRATION_URL": service_url("registration"),
        "DR_ADMIN_TOKEN": token,
        "DR_BOOTSTRAP_KEY_FILE": str(lay.key_file),
    }
    if bootstrap.main() != 0:
        return 1
    vault_id = (lay.key_file.parent / "vault_id").read_text().strip()
    key = lay.key_file.read_text().strip()
    names = [f"vmm-{s}" for s in SITES] + [
        h
        for s in SITES
        for spec in read_site(REPO / "deploy/sites" / f"{s}.yaml").hosts
        for h in spec.names()
    ]
    ports = edge_ports(lay, names)
    write_prometheus_config(lay, ports)
    edges = edge_programs(lay, env, key, ports)
    # The host agents first: they create the site files' VMs (disk images) before the
    # providers' first discovery, so the inventory never shows VMs without their disks.
    agents = {n: e for n, e in edges.items() if e[0] == "services.host_agent"}
    write_conf(lay, {**programs, **agents})
    ctl(lay, "update")
    wait_connected(vault_id, token, list(agents))
    # Connected comes from heartbeats, which may precede the agent's HTTP listener
    wait_healthy({n: f"http://127.0.0.1:{ports[n]}" for n in agents})
    print(f"host agents Connected: {', '.join(agents)}")
    print(f"VMs of deploy/sites created on their hosts: {host_vms(lay, ports)} new")
    write_conf(lay, {**programs, **edges})
    ctl(lay, "update")
    wait_connected(vault_id, token, list(edges))
    print(f"site providers Connected: {', '.join(set(edges) - set(agents))}")
    print(f"VMs discovered with their disks: {wait_discovered(vault_id, token)}")
    print(ctl(lay, "status", check=False).stdout.rstrip())
    connect_info(lay, stack.get("DR_GATEWAY_URL", ""), vault_id)
    return 0


def connect_info(lay: Layout, gateway: str, vault_id: str) -> None:
    print(
        f"\nThe platform runs under supervisord (logs: {lay.logs}).\n"
        f"  export DR_URL={gateway}\n"
        f"  export DR_TOKEN=$(cat {lay.token_file})   # the bootstrap admin token (0600)\n"
        f"  export DR_VAULT={vault_id}   # vault `default`, both sites registered\n"
        f"Metrics: the services' /metrics want 'Authorization: Bearer $(cat"
        f" {lay.metrics_token_file})'; prometheus --config.file={lay.prometheus_file}\n"
        "`make ps` shows the processes, `make stop` stops them."
    )


def status() -> int:
    lay = layout()
    if supervisor_pid(lay) is None:
        print("platform not running (`make run` starts it)")
        return 1
    out = ctl(lay, "status", check=False)
    print(out.stdout.rstrip())
    return out.returncode


def stop() -> int:
    lay = layout()
    pid = supervisor_pid(lay)
    if pid is None:
        print("platform not running")
        return 0
    tree = [pid, *child_pids(pid)]
    ctl(lay, "shutdown", check=False)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        alive = [p for p in tree if Path(f"/proc/{p}").exists()]
        if not alive:
            print(f"platform stopped ({len(tree)} processes, none left)")
            return 0
        time.sleep(0.5)
    print(f"still running after 90 s: pids {alive}")
    return 1


def main() -> None:
    commands = {"start": start, "status": status, "stop": stop}
    if len(sys.argv) != 2 or sys.argv[1] not in commands:
        print(f"usage: python -m scripts.run {{{'|'.join(commands)}}}")
        sys.exit(2)
    sys.exit(commands[sys.argv[1]]())


if __name__ == "__main__":
    main()
