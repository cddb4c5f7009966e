"""A recovery plan's script actions: what counts as a change that needs an admin, the
environment a script runs with, its output with secrets removed, and why it failed."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from services.failover.domain.plans import PlanGroup
from shared.schemas.failover import FailoverKind


@dataclass(frozen=True)
class ScriptAction:
    """A plan's script action as compared to decide whether a change needs an admin: where it
    runs and what it runs (its name and instructions left out)."""

    at: str
    action_id: str
    script: str
    args: tuple[str, ...]
    timeout_seconds: float | None
    run_on: tuple[FailoverKind, ...]


def script_actions(groups: Iterable[PlanGroup]) -> list[ScriptAction]:
    """A plan's script actions, as compared to decide whether a change needs an admin: an
    operator may change a plan's items and manual actions, not what it runs."""
    found = [
        ScriptAction(
            at=where,
            action_id=a.action_id,
            script=a.script or "",
            args=tuple(a.args),
            timeout_seconds=a.timeout_seconds,
            run_on=tuple(a.run_on),
        )
        for g in groups
        for where, actions in (("pre", g.pre_actions), ("post", g.post_actions))
        for a in actions
        if a.kind == "script"
    ]
    return sorted(found, key=lambda a: (a.action_id, a.at))


def script_env(path_var: str, values: dict[str, str]) -> dict[str, str]:
    """A script action's whole environment: PATH and the DR_PLAN_* values, nothing of the
    service's own (no tokens, no database URL)."""
    return {"PATH": path_var, **{f"DR_PLAN_{k.upper()}": v for k, v in values.items()}}


SECRET_NAME = re.compile(r"TOKEN|PASSWORD|SECRET|KEY|CREDENTIAL|DATABASE_URL|DSN", re.IGNORECASE)
SECRET_TEXT = re.compile(
    r"(?i)(bearer\s+|(?:token|password|passwd|secret|key|credential)\s*[=:]\s*)\S+"
    r"|\bdr[tkc]_[A-Za-z0-9_-]{12,}"
    r"|[a-z][a-z0-9+.-]*://[^/\s:@]+:[^@\s]+@"
)


def redact(text: str, secrets: Iterable[str]) -> str:
    """`text` with every known secret value and anything shaped like a credential (bearer
    tokens, key=value secrets, passwords in URLs) replaced by [redacted]."""
    for secret in sorted({s for s in secrets if len(s) >= 6}, key=len, reverse=True):
        text = text.replace(secret, "[redacted]")
    return SECRET_TEXT.sub(lambda m: (m.group(1) or "") + "[redacted]", text)


def environment_secrets(environ: dict[str, str]) -> list[str]:
    """The values of the service's environment variables that are secrets by name."""
    return [v for k, v in environ.items() if SECRET_NAME.search(k) and v]


def excerpt(data: bytes, limit: int, secrets: Iterable[str]) -> str:
    """The last `limit` characters of a script's output, secrets removed."""
    text = redact(data.decode(errors="replace"), secrets)
    return text if len(text) <= limit else "[...]" + text[-limit:]


def script_failure(returncode: int | None, stderr: str, timed_out: bool, timeout: float) -> str:
    """Why a script action failed ('' if it succeeded): a timeout, a non-zero exit or any
    output on stderr."""
    if timed_out:
        return f"timed out after {timeout:g} s"
    if returncode:
        return f"exited with status {returncode}" + (f": {stderr.strip()}" if stderr else "")
    if stderr.strip():
        return f"wrote to stderr: {stderr.strip()}"
    return ""
