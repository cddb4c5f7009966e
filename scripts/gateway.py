"""The gateway: nginx in front of the services, one base URL routed by path prefix.

Renders `deploy/nginx/nginx.conf.template` for given upstreams and runs nginx in the foreground
as a plain process (no root needed: pid, temp folders and logs live under a state dir). Only the
standard library, so `deploy/local/stack.sh` can run it with the system python3.

    python -m scripts.gateway render --state-dir DIR [--listen 127.0.0.1:18100]
        [--registration 127.0.0.1:8101] ... [--failover 127.0.0.1:8105] [--resolver 127.0.0.11]
        # writes DIR/nginx.conf, prints its path
    python -m scripts.gateway run --state-dir DIR ...   # render, then exec nginx (foreground)
    python -m scripts.gateway compose   # writes deploy/nginx/nginx.compose.conf (docker compose)

Tests use `Gateway(...).start()` / `.stop()` with the services' random ports.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "deploy" / "nginx" / "nginx.conf.template"
OPENAPI = REPO / "deploy" / "nginx" / "openapi.json"
COMPOSE_CONFIG = REPO / "deploy" / "nginx" / "nginx.compose.conf"

# The services behind the gateway and their local default ports (failover: not written yet).
SERVICES = ("registration", "inventory", "policy", "replication", "failover")
DEFAULT_PORTS = {
    "registration": 8101,
    "inventory": 8102,
    "policy": 8103,
    "replication": 8104,
    "failover": 8105,
}
DEFAULT_LISTEN = "127.0.0.1:18100"
TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def default_upstreams(host: str = "127.0.0.1") -> dict[str, str]:
    return {name: f"{host}:{port}" for name, port in DEFAULT_PORTS.items()}


def nginx_binary() -> str | None:
    """nginx on $PATH, else Debian's /usr/sbin/nginx (not on a non-root user's $PATH)."""
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None


def render_config(
    upstreams: Mapping[str, str],
    *,
    listen: str,
    state_dir: Path,
    openapi_file: Path = OPENAPI,
    resolver: str | None = None,
    run_as_root: bool | None = None,
) -> str:
    """The nginx configuration for these upstreams (`name -> host:port`); services missing from
    `upstreams` get their local default port (so a request to them answers 502)."""
    chosen = {**default_upstreams(), **upstreams}
    unknown = set(chosen) - set(SERVICES)
    if unknown:
        raise ValueError(f"unknown service(s) {sorted(unknown)}: known are {SERVICES}")
    root = os.geteuid() == 0 if run_as_root is None else run_as_root
    values = {
        "LISTEN": listen,
        "STATE_DIR": str(state_dir.resolve()),
        "OPENAPI_FILE": str(openapi_file.resolve()),
        "RESOLVER_LINE": f"resolver {resolver} valid=10s ipv6=off;" if resolver else "",
        "USER_LINE": "user root;" if root else "",
        **{f"{name.upper()}_UPSTREAM": addr for name, addr in chosen.items()},
    }
    return _substitute(TEMPLATE.read_text(), values)


def _substitute(template: str, values: Mapping[str, str]) -> str:
    """Replace `${NAME}` (upper case only: nginx's own `$vars` are lower case) everywhere."""

    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            raise KeyError(f"{TEMPLATE.name}: no value for ${{{name}}}")
        return values[name]

    return re.sub(r"\$\{([A-Z_]+)\}", one, template)


def write_config(state_dir: Path, config: str) -> Path:
    """Write `config` to `state_dir/nginx.conf` and make the folders nginx needs."""
    state_dir.mkdir(parents=True, exist_ok=True)
    for name in TEMP_DIRS:
        (state_dir / name).mkdir(exist_ok=True)
    path = state_dir / "nginx.conf"
    path.write_text(config)
    return path


def nginx_command(conf: Path, state_dir: Path) -> list[str]:
    binary = nginx_binary()
    if binary is None:
        raise FileNotFoundError("nginx is not installed (Debian package: nginx)")
    # -p: prefix for relative paths; -e: the error log before the config is read (else
    # nginx tries /var/log/nginx/error.log, unwritable for a non-root user).
    return [binary, "-p", str(state_dir), "-e", str(state_dir / "error.log"), "-c", str(conf)]


def check_config(conf: Path, state_dir: Path) -> None:
    """`nginx -t`: raise with nginx's message when the configuration is invalid."""
    result = subprocess.run(
        [*nginx_command(conf, state_dir), "-t", "-q"], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"nginx -t failed:\n{result.stderr}")


@dataclass
class Gateway:
    """nginx as a foreground child process on loopback, for tests and tools."""

    upstreams: dict[str, str]
    state_dir: Path
    port: int
    host: str = "127.0.0.1"
    openapi_file: Path = OPENAPI
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> Gateway:
        config = render_config(
            self.upstreams,
            listen=f"{self.host}:{self.port}",
            state_dir=self.state_dir,
            openapi_file=self.openapi_file,
        )
        conf = write_config(self.state_dir, config)
        check_config(conf, self.state_dir)
        log = open(self.state_dir / "nginx.out", "ab")  # noqa: SIM115 - the child owns it
        self.popen = subprocess.Popen(
            nginx_command(conf, self.state_dir), stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.popen.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"nginx not answering after {timeout}s:\n{self.tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGQUIT (graceful shutdown), SIGKILL if it takes too long."""
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGQUIT)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)

    def tail(self, lines: int = 30) -> str:
        out = []
        for name in ("nginx.out", "error.log"):
            path = self.state_dir / name
            if path.exists():
                out += path.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(out)


def compose_config() -> str:
    """The config of the compose `gateway` service (nginx image): upstreams by service DNS
    name through Docker's resolver, state in /tmp, the document mounted in /etc/nginx."""
    return render_config(
        {name: f"{name}:{port}" for name, port in DEFAULT_PORTS.items()},
        listen="8100",
        state_dir=Path("/tmp"),
        openapi_file=Path("/etc/nginx/openapi.json"),
        resolver="127.0.0.11",
        run_as_root=False,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m scripts.gateway", description=__doc__)
    parser.add_argument("command", choices=["render", "run", "compose"])
    parser.add_argument("--state-dir", type=Path, default=REPO / ".state" / "nginx")
    parser.add_argument("--listen", default=DEFAULT_LISTEN, help="address:port to listen on")
    parser.add_argument("--openapi-file", type=Path, default=OPENAPI)
    parser.add_argument("--resolver", help="DNS resolver for upstream names (containers)")
    for name in SERVICES:
        parser.add_argument(
            f"--{name}",
            metavar="HOST:PORT",
            default=f"127.0.0.1:{DEFAULT_PORTS[name]}",
            help=f"the {name} service (default %(default)s)",
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "compose":
        COMPOSE_CONFIG.write_text(compose_config())
        print(COMPOSE_CONFIG)
        return 0
    upstreams = {name: getattr(args, name) for name in SERVICES}
    config = render_config(
        upstreams,
        listen=args.listen,
        state_dir=args.state_dir,
        openapi_file=args.openapi_file,
        resolver=args.resolver,
    )
    conf = write_config(args.state_dir, config)
    if args.command == "render":
        print(conf)
        return 0
    command = nginx_command(conf, args.state_dir)
    os.execv(command[0], command)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
