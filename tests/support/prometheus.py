"""A real Prometheus server (Debian's `prometheus`) on loopback for e2e tests: scrape config
rendered for the test's random ports (scrape and rule evaluation every second), the platform's
alert rules loaded, storage in a temp folder; series read back through the HTTP query API."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from kit.procs import free_port
from scripts import prometheus_config


def prometheus_binary() -> str:
    """The binary, or skip (fail under CI=true) naming the Debian package."""
    found = shutil.which("prometheus")
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("prometheus is not installed (Debian package: prometheus); CI must have it")
    pytest.skip("prometheus is not installed (Debian package: prometheus)")


@dataclass
class PrometheusServer:
    """`targets`: job -> ["127.0.0.1:port", ...]; the jobs in `authorized_jobs` send
    `metrics_token` (from a credentials file, as in docker compose)."""

    targets: Mapping[str, Sequence[str]]
    folder: Path
    metrics_token: str = ""
    authorized_jobs: Sequence[str] = ()
    port: int = field(default_factory=free_port)
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> PrometheusServer:
        binary = prometheus_binary()
        self.folder.mkdir(parents=True, exist_ok=True)
        config = self.folder / "prometheus.yml"
        token_file = self.folder / prometheus_config.TOKEN_FILE
        if self.metrics_token:
            token_file.write_text(self.metrics_token)
        config.write_text(
            prometheus_config.render(
                {job: [(t, {}) for t in ts] for job, ts in self.targets.items()},
                scrape_interval="1s",
                evaluation_interval="1s",
                rule_files=[str(prometheus_config.ALERTS)],
                credentials_file=str(token_file) if self.metrics_token else None,
                authorized_jobs=self.authorized_jobs,
            )
        )
        log = open(self.folder / "prometheus.log", "ab")  # noqa: SIM115 - the child owns it
        self.popen = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={self.folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--web.enable-lifecycle",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(
                    f"prometheus exited with {self.popen.returncode}:\n{self.tail()}"
                )
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"prometheus not ready after {timeout}s:\n{self.tail()}")

    def stop(self, timeout: float = 20.0) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)

    def tail(self, lines: int = 30) -> str:
        try:
            text = (self.folder / "prometheus.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def api(self, client: httpx.AsyncClient, path: str, **params: str) -> Any:
        resp = await client.get(f"{self.url}/api/v1/{path}", params=params)
        body = resp.json()
        assert resp.status_code == 200 and body.get("status") == "success", resp.text
        return body["data"]

    async def query(self, client: httpx.AsyncClient, expr: str) -> list[dict[str, Any]]:
        """Instant query: the result vector (each with `metric` labels and `value`)."""
        data = await self.api(client, "query", query=expr)
        result: list[dict[str, Any]] = data["result"]
        return result
