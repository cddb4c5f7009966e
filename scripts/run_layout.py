"""Where `make run` keeps its files and which ports its services listen on (scripts/run.py)."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from kit.procs import REPO

SERVICES = ("registration", "inventory", "policy", "replication", "failover")
DEFAULT_PORTS = dict(zip(SERVICES, range(8101, 8106), strict=True))
SITES = ("primary", "recovery")
VENV_BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def conf(self) -> Path:
        return self.run / "supervisord.conf"

    @property
    def token_file(self) -> Path:
        return self.run / "admin-token"

    @property
    def metrics_token_file(self) -> Path:
        return self.run / "metrics-token"

    @property
    def prometheus_file(self) -> Path:
        return self.run / "prometheus.yml"

    @property
    def key_file(self) -> Path:
        return self.run / "bootstrap" / "registration.key"

    @property
    def sock(self) -> Path:
        return self.run / "supervisor.sock"

    @property
    def pid_file(self) -> Path:
        return self.run / "supervisord.pid"


def layout() -> Layout:
    root = os.environ.get("DR_RUN_DIR") or os.environ.get("DR_STATE_DIR") or str(REPO / ".state")
    return Layout(Path(root).resolve())


def service_port(name: str, env: Mapping[str, str] = os.environ) -> int:
    return int(env.get(f"DR_{name.upper()}_HTTP_PORT", DEFAULT_PORTS[name]))


def service_url(name: str, env: Mapping[str, str] = os.environ) -> str:
    return f"http://127.0.0.1:{service_port(name, env)}"
