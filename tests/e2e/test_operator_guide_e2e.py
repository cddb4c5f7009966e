"""The operator guide, executed: a platform started as `make run` starts it (scripts/run.py:
supervisord, the five services, both sites' providers and host agents), then every shell
command of docs/operator-guide.md from step 5 on, in order, with its `<placeholders>` filled
from the previous commands' `--json` output. A guide that drifts from the code fails here.
Also: supervisord restarts a killed service, and `stop` leaves no process behind."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from kit import procs
from kit.stack import REPO, Stack, delete_prefixed_topics, random_prefix
from scripts import run as platform_run

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

GUIDE = REPO / "docs" / "operator-guide.md"
FIRST_STEP = "## Step 5"


def guide_commands(text: str) -> list[str]:
    """The shell commands of the guide's ```bash blocks from step 5 on: one per line,
    backslash continuations joined, trailing comments dropped, a here-document kept whole."""
    commands: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text[text.index(FIRST_STEP) :], re.S):
        lines = block.splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            heredoc = re.search(r"<<'(\w+)'", line)
            if heredoc:
                end = lines.index(heredoc.group(1), i + 1)
                commands.append("\n".join(lines[i : end + 1]))
                i = end + 1
                continue
            while line.endswith("\\"):
                i += 1
                line = line[:-1].rstrip() + " " + lines[i].strip()
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line:
                commands.append(line)
            i += 1
    return commands


def test_guide_parsing() -> None:
    text = (
        "## Step 4\n```bash\nnot this\n```\n## Step 5\n```bash\n"
        "drctl a --b \\\n  --c   # note\n\ncat > f <<'EOF'\n{\"x\": 1}\nEOF\nexport X=<y>\n```\n"
    )
    assert guide_commands(text) == [
        "drctl a --b --c",
        "cat > f <<'EOF'\n{\"x\": 1}\nEOF",
        "export X=<y>",
    ]


def named(rows: list[dict[str, Any]], name: str, key: str, by: str = "name") -> Any:
    return next(r[key] for r in rows if r[by] == name)


# Placeholder -> (the command whose latest --json output holds it, how to pick it).
Pick = Callable[[Any], Any]
RESOLVERS: dict[str, tuple[str, Pick]] = {
    "vault_id": ("drctl vault list", lambda d: named(d, "default", "vault_id")),
    "primary_cloud_id": ("drctl inventory clouds", lambda d: named(d, "Gold-Primary", "cloud_id")),
    "recovery_cloud_id": (
        "drctl inventory clouds",
        lambda d: named(d, "Gold-Recovery", "cloud_id"),
    ),
    "primary_network_id": (
        "drctl inventory networks",
        lambda d: named(d, "Corp-Primary", "network_id"),
    ),
    "recovery_network_id": (
        "drctl inventory networks",
        lambda d: named(d, "Corp-Recovery", "network_id"),
    ),
    "test_network_id": (
        "drctl inventory networks",
        lambda d: named(d, "Test-Recovery", "network_id"),
    ),
    "mapping_id": ("drctl mapping create", lambda d: d["mapping_id"]),
    "vm_id": ("drctl inventory vms --name web-01", lambda d: d["items"][0]["vm_id"]),
    "other_vm_id": ("drctl inventory vms --name web-03", lambda d: d["items"][0]["vm_id"]),
    "item_id": ("drctl item list", lambda d: named(d, "web-01", "item_id", "vm_name")),
    "other_item_id": ("drctl item list", lambda d: named(d, "web-03", "item_id", "vm_name")),
    "job_id": ("drctl failover", lambda d: d["job_id"]),
    "reverse_item_id": ("drctl failover status", lambda d: d["reversed_by"]),
}


def resolve(name: str, outputs: list[tuple[str, Any]]) -> str:
    assert name in RESOLVERS, f"the guide uses <{name}>: tell this test where it comes from"
    prefix, pick = RESOLVERS[name]
    for command, data in reversed(outputs):
        if command.startswith(prefix):
            try:
                value = pick(data)
            except (KeyError, IndexError, TypeError, StopIteration):
                continue
            if value:
                return str(value)
    raise AssertionError(f"<{name}>: no earlier `{prefix} ... --json` output holds it")


def supervisor_pid(run_dir: Path) -> int:
    return int((run_dir / "run" / "supervisord.pid").read_text())


def program_pid(env: dict[str, str], name: str) -> int | None:
    out = subprocess.run(
        [sys.executable, "-m", "scripts.run", "status"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
    ).stdout
    match = re.search(rf"^{name}\s+RUNNING\s+pid (\d+)", out, re.M)
    return int(match.group(1)) if match else None


@pytest.fixture
def run_env(stack: Stack, tmp_path: Path) -> Iterator[dict[str, str]]:
    """A `make run` platform of the test's own: run dir, database, topics and ports."""
    env = {
        **os.environ,
        "DR_RUN_DIR": str(tmp_path / "platform"),
        "KAFKA_BOOTSTRAP_SERVERS": stack.kafka,
        "DATABASE_URL": stack.database_url,
        "DR_RUN_DATABASE": f"guide_{secrets.token_hex(4)}",
        "DR_TOPIC_PREFIX": random_prefix("guide"),
        **{
            f"DR_{name.upper()}_HTTP_PORT": str(procs.free_port()) for name in platform_run.SERVICES
        },
    }
    try:
        yield env
    finally:
        subprocess.run(
            [sys.executable, "-m", "scripts.run", "stop"], env=env, cwd=REPO, timeout=180
        )
        asyncio.run(delete_prefixed_topics(stack.kafka, env["DR_TOPIC_PREFIX"]))


def test_operator_guide_runs_as_written(run_env: dict[str, str], tmp_path: Path) -> None:
    env = run_env
    started = subprocess.run(
        [sys.executable, "-m", "scripts.run", "start"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert started.returncode == 0, started.stdout + started.stderr
    run_dir = Path(env["DR_RUN_DIR"])
    token_file = run_dir / "run" / "admin-token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert str(token_file) in started.stdout and "export DR_VAULT=" in started.stdout

    # The services' /metrics want the generated metrics token, which the scrape config it
    # wrote sends; the edges' /metrics stay open (they never get the token).
    metrics_token = run_dir / "run" / "metrics-token"
    assert metrics_token.stat().st_mode & 0o777 == 0o600
    assert str(metrics_token) in started.stdout
    metrics = f"{platform_run.service_url('registration', env)}/metrics"
    assert httpx.get(metrics, timeout=10).status_code == 401
    bearer = {"Authorization": f"Bearer {metrics_token.read_text().strip()}"}
    assert httpx.get(metrics, headers=bearer, timeout=10).status_code == 200
    edge_port = next(iter(json.loads((run_dir / "run" / "edge-ports.json").read_text()).values()))
    assert httpx.get(f"http://127.0.0.1:{edge_port}/metrics", timeout=10).status_code == 200
    scrape = run_dir / "run" / "prometheus.yml"
    jobs = {j["job_name"]: j for j in yaml.safe_load(scrape.read_text())["scrape_configs"]}
    assert jobs["registration"]["authorization"]["credentials_file"] == str(metrics_token)
    assert len(jobs["host_agent"]["static_configs"]) >= 2
    if promtool := shutil.which("promtool"):
        checked = subprocess.run(
            [promtool, "check", "config", str(scrape)], capture_output=True, text=True
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr

    # A crashed service is restarted by the supervisor.
    before = program_pid(env, "inventory")
    assert before is not None
    os.kill(before, 9)
    deadline = time.monotonic() + 60
    while program_pid(env, "inventory") in (None, before):
        assert time.monotonic() < deadline, "inventory not restarted after kill -9"
        time.sleep(0.5)

    # The guide, command by command.
    shell_env = {
        **env,
        "PATH": f"{Path(sys.executable).parent}:{env['PATH']}",
        "DR_TOKEN": token_file.read_text().strip(),
        **{
            f"DR_{name.upper()}_URL": platform_run.service_url(name, env)
            for name in platform_run.SERVICES
        },
    }
    shell_env.pop("DR_URL", None)
    shell_env.pop("DR_VAULT", None)
    outputs: list[tuple[str, Any]] = []
    commands = guide_commands(GUIDE.read_text())
    assert len(commands) > 30
    for raw in commands:
        command = re.sub(r"<([a-z_]+)>", lambda m: resolve(m.group(1), outputs), raw)
        if command.startswith("export "):
            key, _, value = command.removeprefix("export ").partition("=")
            shell_env[key] = value
            continue
        drctl = command.startswith("drctl ")
        proc = subprocess.run(
            ["bash", "-c", command + (" --json" if drctl else "")],
            env=shell_env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, f"{command}\n{proc.stdout}\n{proc.stderr}"
        if not drctl:
            continue
        data = json.loads(proc.stdout)
        outputs.append((command, data))
        if "--watch" in command and isinstance(data, dict) and "job_id" in data:
            assert data["state"] == "succeeded", (command, data.get("error"))
        if command.startswith("drctl item enable") and "--watch" in command:
            assert all(item["initial_done_at"] for item in data), data

    # Failback done: the VM runs at the primary again and is protected again.
    jobs = next(data for command, data in outputs if command == "drctl job list")
    assert {"failback", "test_failover"} <= {j["operation"] for j in jobs}

    # `stop` (make stop) leaves no process of the platform behind.
    pid = supervisor_pid(run_dir)
    tree = [pid, *platform_run.child_pids(pid)]
    assert len(tree) >= 1 + len(platform_run.SERVICES) + 8
    stopped = subprocess.run(
        [sys.executable, "-m", "scripts.run", "stop"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert [p for p in tree if Path(f"/proc/{p}").exists()] == []
