"""What every benchmark shares: its output lines (`bench <name> <value> <unit>`, or
`bench <name> FAILED <reason>`), percentiles, probes of a running process (CPU seconds, peak
RSS), and a platform of its own on the real stack (fresh database, topic prefix and folder,
all removed afterwards)."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from kit.platform import Platform
from kit.procs import REPO, Proc
from kit.stack import Stack, fresh_database, random_prefix
from shared import db


def emit(name: str, value: float, unit: str) -> None:
    print(f"bench {name} {value:.6g} {unit}", flush=True)


def failed(name: str, reason: str) -> None:
    print(f"bench {name} FAILED {' '.join(reason.split())[:300]}", flush=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[rank]


def cpu_seconds(proc: Proc) -> float:
    """User + system CPU seconds a process has used so far."""
    assert proc.popen is not None
    fields = Path(f"/proc/{proc.popen.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def vm_hwm_mib(pid: int) -> float:
    """Peak resident set size (VmHWM) of a live process, MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


async def _drop_database(stack: Stack, url: str) -> None:
    name = db.database_name(url)
    conn = await db.connect(stack.database_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def bench_platform(stack: Stack, label: str) -> AsyncIterator[tuple[Platform, Path]]:
    """A platform of its own (fresh database, topic prefix and folder) and its folder; on the
    way out its processes stop and its database, topics and folder go (the logs stay when
    `BENCH_KEEP_LOGS` is `always`, or `failed` and the body raised)."""
    root = Path(tempfile.mkdtemp(prefix=f"bench-{label}-", dir="/tmp"))
    log_dir = root / "platform"
    log_dir.mkdir()
    database_url = await fresh_database(stack, "bench")
    prefix = random_prefix("bench")
    # the replication service as it ships (no block copy); `BENCH_KEEP_BLOCK_COPY=1`: with one
    copy = "true" if os.environ.get("BENCH_KEEP_BLOCK_COPY", "0") == "1" else "false"
    plat = Platform(
        stack=stack,
        database_url=database_url,
        prefix=prefix,
        log_dir=log_dir,
        replication_env={"DR_REPLICATION_KEEP_BLOCK_COPY": copy},
    )
    ok = False
    try:
        yield plat, root
        ok = True
    finally:
        await plat.close()  # processes, then topics
        with contextlib.suppress(Exception):
            await _drop_database(stack, database_url)
        shutil.rmtree(REPO / f"{prefix}replication-deltas-data", ignore_errors=True)
        keep = os.environ.get("BENCH_KEEP_LOGS", "")
        if keep == "always" or (keep == "failed" and not ok):
            print(f"# logs kept in {log_dir}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
