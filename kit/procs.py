"""Services and edge processes run as real OS processes (`python -m services.<name>`); used by
the e2e tests and by `make demo`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def read_stack_env() -> dict[str, str]:
    """The KEY=VALUE lines `make up` wrote to `$DR_STATE_DIR/stack.env` (empty if never up)."""
    env: dict[str, str] = {}
    path = Path(os.environ.get("DR_STATE_DIR", REPO / ".state")) / "stack.env"
    if path.exists():
        for line in path.read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep:
                env[key.strip()] = value.strip()
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Proc:
    module: str
    env: dict[str, str]
    log_path: Path
    port: int
    popen: subprocess.Popen[bytes] | None = None
    starts: int = field(default=0)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, extra_env: dict[str, str] | None = None, wait: bool = True) -> Proc:
        env = {**os.environ, **self.env, **(extra_env or {})}
        self.starts += 1
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child process owns it
        log.write(f"\n=== start #{self.starts} ===\n".encode())
        log.flush()
        self.popen = subprocess.Popen(
            [sys.executable, "-m", self.module],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        if wait:
            try:
                self.wait_healthy()
            except Exception:
                self.kill()  # a process that never became healthy is not left running
                raise
        return self

    def wait_healthy(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen is not None and self.popen.poll() is not None:
                raise RuntimeError(
                    f"{self.module} exited with {self.popen.returncode}:\n{self.tail()}"
                )
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.module} not healthy after {timeout}s:\n{self.tail()}")

    def kill(self) -> None:
        """kill -9."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(10)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM and wait (graceful shutdown); SIGKILL if it doesn't finish in time."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        return self.popen.returncode

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def terminate(self) -> None:
        """SIGTERM without waiting (`stop` then waits)."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def stop_all(procs: Iterable[Proc]) -> None:
    """Stop several processes at once: SIGTERM to each, then wait for each (graceful)."""
    todo = list(procs)
    for proc in todo:
        proc.terminate()
    for proc in todo:
        proc.stop()


_GRANTED: set[tuple[str, str]] = set()


def kafka_identity(env: dict[str, str], principal: str) -> dict[str, str]:
    """On a stack with Kafka TLS (stack.env names DR_KAFKA_PKI_DIR): the client certificate of
    `principal` (a service's name, or `admin`) for a process's environment, after the ACLs of
    the environment's topic prefix are granted (once per prefix, with the admin certificate:
    `python -m shared.kafka_acl`). Empty on a plaintext stack."""
    full = {**os.environ, **env}
    pki = full.get("DR_KAFKA_PKI_DIR")
    if not pki or full.get("DR_KAFKA_SECURITY", "tls") != "tls":
        return {}
    key = (full.get("KAFKA_BOOTSTRAP_SERVERS", ""), full.get("DR_TOPIC_PREFIX", ""))
    if key not in _GRANTED:
        subprocess.run(
            [sys.executable, "-m", "shared.kafka_acl", "--prefix", key[1]],
            env=full,
            cwd=REPO,
            check=True,
            capture_output=True,
            timeout=120,
        )
        _GRANTED.add(key)
    return {
        "DR_KAFKA_CERT_FILE": str(Path(pki) / f"{principal}.pem"),
        "DR_KAFKA_KEY_FILE": str(Path(pki) / f"{principal}.key"),
    }


def edge_ca(env: dict[str, str]) -> dict[str, str]:
    """On a stack with Kafka TLS: the edge-issuing CA for the registration service's
    environment (it signs each edge's certificate); empty on a plaintext stack."""
    full = {**os.environ, **env}
    pki = full.get("DR_KAFKA_PKI_DIR")
    if not pki or full.get("DR_KAFKA_SECURITY", "tls") != "tls":
        return {}
    return {
        "DR_REGISTRATION_EDGE_CA_CERT_FILE": str(Path(pki) / "edge-ca.pem"),
        "DR_REGISTRATION_EDGE_CA_KEY_FILE": str(Path(pki) / "edge-ca.key"),
    }


def edge_kafka(env: dict[str, str]) -> dict[str, str]:
    """An edge process's Kafka environment: no client certificate (it registers with a CSR
    and presents the certificate issued to it), after the prefix's ACLs are granted."""
    if not kafka_identity(env, "admin"):
        return {}
    return {"DR_KAFKA_CERT_FILE": "", "DR_KAFKA_KEY_FILE": ""}


def service(name: str, env: dict[str, str], log_dir: Path, env_prefix: str | None = None) -> Proc:
    """A platform service process with its own free HTTP port and Kafka certificate."""
    port = free_port()
    prefix = env_prefix or f"DR_{name.upper()}_"
    own = edge_ca(env) if name == "registration" else {}
    return Proc(
        module=f"services.{name}",
        env={**env, **kafka_identity(env, name), **own, f"{prefix}HTTP_PORT": str(port)},
        log_path=log_dir / f"{name}.log",
        port=port,
    )


def edge(module: str, prefix: str, env: dict[str, str], log_dir: Path, label: str) -> Proc:
    """An edge process (`services.host_agent` with `DR_AGENT_`, `services.site_provider` with
    `DR_PROVIDER_`), its own port and state folder."""
    port = free_port()
    state = log_dir / f"{label}-state"
    return Proc(
        module=module,
        env={
            **env,
            **edge_kafka(env),
            f"{prefix}HTTP_PORT": str(port),
            f"{prefix}STATE_DIR": str(state),
        },
        log_path=log_dir / f"{label}.log",
        port=port,
    )
