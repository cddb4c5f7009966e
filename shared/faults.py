"""Crash points for fault-injection tests.

`crash_point("outbox.before_publish")` kills the process with SIGKILL when the environment
variable `DR_CRASH_AT` names that point (comma-separated list; `name@N` kills the N-th time the
point is reached), so a test can prove that a kill -9 at that instant loses nothing. Unset in
production; a no-op then.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)


_reached: dict[str, int] = {}


def crash_point(name: str) -> None:
    wanted = os.environ.get("DR_CRASH_AT", "")
    if not wanted:
        return
    _reached[name] = _reached.get(name, 0) + 1
    due = any(
        point == name and _reached[name] >= int(nth or 1)
        for point, _, nth in (entry.partition("@") for entry in wanted.split(","))
    )
    if not due:
        return
    log.warning("crash point reached, killing process", extra={"crash_point": name})
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.kill(os.getpid(), signal.SIGKILL)
