"""The demo's harness: the platform's processes started with the demo's settings, each check
run, printed (`PASS <check>` / `FAIL <check>: <why>`) and recorded, and what the stories share
(the operator CLI run as a user would, file checks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kit.platform import Platform
from kit.procs import REPO, Proc

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


def files_exist(paths: list[str]) -> bool:
    return all(Path(p).is_file() for p in paths)


JOB_ENDED = ("succeeded", "failed", "completed_with_errors")
