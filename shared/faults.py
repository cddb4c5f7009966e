"""Crash points for fault-injection tests.

`crash_point("outbox.before_publish")` kills the process with SIGKILL when the environment
variable `DR_CRASH_AT` names that point, so a test can prove that a kill -9 at that instant
loses nothing. Unset in production; a no-op then.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)


def crash_point(name: str) -> None:
    wanted = os.environ.get("DR_CRASH_AT", "")
    if wanted and name in wanted.split(","):
        log.warning("crash point reached, killing process", extra={"crash_point": name})
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)
