"""A running platform (for e2e tests, benchmarks and the demo): services as processes sharing
one fresh database and one fresh topic prefix, a bootstrap admin token, and helpers to create
vaults, tokens and keys."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from kit import procs as processes
from kit.procs import Proc
from kit.stack import Stack, delete_prefixed_topics


@dataclass
class Platform:
    stack: Stack
    database_url: str
    prefix: str
    log_dir: Path
    admin_token: str = field(default_factory=lambda: f"adm_{secrets.token_urlsafe(32)}")
    services: dict[str, Proc] = field(default_factory=dict)
    edges: list[Proc] = field(default_factory=list)
    # settings every replication instance starts with (a call's own settings win)
    replication_env: dict[str, str] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        return {
            "KAFKA_BOOTSTRAP_SERVERS": self.stack.kafka,
            "DATABASE_URL": self.database_url,
            "DR_TOPIC_PREFIX": self.prefix,
            "DR_ADMIN_TOKEN": self.admin_token,
            "DR_LOG_LEVEL": "INFO",
            "DR_REGISTRATION_SWEEP_INTERVAL_SECONDS": "0.5",
        }

    def start(self, name: str, extra_env: dict[str, str] | None = None) -> Proc:
        """Start service `name` (once); returns its process."""
        if name not in self.services:
            wiring: dict[str, str] = {}
            if name == "replication":
                self.start("policy")  # its prerequisite verdicts decide enabling
                wiring = {
                    "DR_REPLICATION_STORE_DIR": str(self.log_dir / "replica"),
                    "DR_REPLICATION_MATERIALISE_ROOTS": str(self.log_dir.parent),
                    "DR_REPLICATION_HEALTH_INTERVAL_SECONDS": "0.5",
                    "DR_REPLICATION_RESYNC_BACKOFF_SECONDS": "1,2,4",
                    **self.replication_env,
                }
            elif name == "failover":
                wiring = {
                    "DR_FAILOVER_STEP_TIMEOUT_SECONDS": "120",
                    "DR_FAILOVER_SYNC_TIMEOUT_SECONDS": "20",
                    "DR_FAILOVER_POLL_SECONDS": "0.2",
                    "DR_FAILOVER_SCRIPTS_DIR": str(self.scripts_dir),
                }
            env = {**self.env, **wiring, **(extra_env or {})}
            proc = processes.service(name, env, self.log_dir)
            self.services[name] = proc.start()
        return self.services[name]

    @property
    def scripts_dir(self) -> Path:
        """The failover service's scripts folder (made on first use)."""
        folder = self.log_dir / "scripts"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def script(self, text: str, name: str | None = None) -> str:
        """Install an executable script in the scripts folder; returns its name."""
        name = name or f"s-{secrets.token_hex(4)}.sh"
        path = self.scripts_dir / name
        path.write_text(text)
        path.chmod(0o755)
        return name

    def url(self, name: str) -> str:
        return self.services[name].url

    def edge(self, module: str, prefix: str, label: str, env: dict[str, str]) -> Proc:
        proc = processes.edge(module, prefix, {**self.env, **env}, self.log_dir, label)
        self.edges.append(proc)
        return proc

    def stop_all(self) -> None:
        processes.stop_all([*self.edges, *self.services.values()])

    async def close(self) -> None:
        """Stop every process, then delete the platform's topics (a platform of its own only:
        the session platform's prefix is shared by every module)."""
        self.stop_all()
        await delete_prefixed_topics(self.stack.kafka, self.prefix)

    # -- API helpers --------------------------------------------------------------------

    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    async def new_vault(self, client: httpx.AsyncClient, label: str = "vault") -> dict[str, Any]:
        resp = await client.post(
            f"{self.url('registration')}/v1/vaults",
            json={"name": f"{label}-{secrets.token_hex(4)}"},
            headers=self.admin(),
        )
        assert resp.status_code == 201, resp.text
        return dict(resp.json())

    async def new_token(self, client: httpx.AsyncClient, vault_id: str, role: str) -> str:
        resp = await client.post(
            f"{self.url('registration')}/v1/vaults/{vault_id}/tokens",
            json={"name": f"{role}-{secrets.token_hex(3)}", "role": role},
            headers=self.admin(),
        )
        assert resp.status_code == 201, resp.text
        return str(resp.json()["token"])

    async def new_key(
        self, client: httpx.AsyncClient, vault_id: str, valid_hours: float | None = None
    ) -> dict[str, Any]:
        body = {} if valid_hours is None else {"valid_hours": valid_hours}
        resp = await client.post(
            f"{self.url('registration')}/v1/vaults/{vault_id}/registration-keys",
            json=body,
            headers=self.admin(),
        )
        assert resp.status_code == 201, resp.text
        return dict(resp.json())
