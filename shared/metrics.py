"""Metric label values from free text, bounded: a label never carries a cycle number, an id or
any other value that grows without end (each distinct value is a new series forever)."""

from __future__ import annotations

import re

_NUMBERS = re.compile(r"\d+")


def reason_label(reason: str, limit: int = 40) -> str:
    """The kind of a reason ("cycle 12: root mismatch" -> "cycle N"): the text before the first
    colon, numbers replaced by N, at most `limit` characters."""
    return _NUMBERS.sub("N", reason.split(":", 1)[0]).strip()[:limit] or "other"
