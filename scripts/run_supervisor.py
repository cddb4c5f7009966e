"""supervisord for `make run` (scripts/run.py): its configuration, supervisorctl, its pid and
the processes under it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from kit.procs import REPO
from scripts.run_layout import VENV_BIN, Layout


def _quote(value: str) -> str:
    return '"' + value.replace("%", "%%").replace('"', "") + '"'


def write_conf(lay: Layout, programs: dict[str, tuple[str, dict[str, str]]]) -> None:
    lines = [
        "; written by `python -m scripts.run start` (make run); do not edit",
        "[unix_http_server]",
        f"file={lay.sock}",
        "chmod=0700",
        "[supervisord]",
        f"logfile={lay.logs / 'supervisord.log'}",
        f"pidfile={lay.pid_file}",
        f"directory={REPO}",
        "logfile_maxbytes=10MB",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
        "[supervisorctl]",
        f"serverurl=unix://{lay.sock}",
    ]
    for name, (module, env) in programs.items():
        environment = ",".join(f"{k}={_quote(v)}" for k, v in sorted(env.items()))
        lines += [
            f"[program:{name}]",
            f"command={sys.executable} -m {module}",
            f"directory={REPO}",
            f"environment={environment}",
            "autostart=true",
            "autorestart=true",
            "startsecs=3",
            "startretries=20",
            "stopsignal=TERM",
            "stopwaitsecs=20",
            "stopasgroup=true",
            "killasgroup=true",
            "redirect_stderr=true",
            f"stdout_logfile={lay.logs / (name + '.log')}",
            "stdout_logfile_maxbytes=20MB",
            "stdout_logfile_backups=2",
        ]
    lay.run.mkdir(parents=True, exist_ok=True)
    fd = os.open(lay.conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def ctl(lay: Layout, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV_BIN / "supervisorctl"), "-c", str(lay.conf), *args],
        capture_output=True,
        text=True,
        check=check,
    )


def supervisor_pid(lay: Layout) -> int | None:
    """supervisord's pid if it runs (its pid file names a live process)."""
    try:
        pid = int(lay.pid_file.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def child_pids(pid: int) -> list[int]:
    """Every descendant of `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found
