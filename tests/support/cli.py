"""The operator CLI run the way an operator runs it: `python -m services.cli` as a process."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Mapping

from kit.procs import REPO


async def run_drctl(
    env: Mapping[str, str], *args: str, timeout: float = 60
) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `drctl ARGS` with `env` as its whole environment; a
    Python traceback on stderr fails the calling test (the CLI must explain, not crash)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.cli",
        *args,
        cwd=REPO,
        env=dict(env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=timeout)
    assert "Traceback" not in err.decode(), err.decode()
    return proc.returncode or 0, out.decode(), err.decode()
