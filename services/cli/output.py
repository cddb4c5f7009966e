"""How the CLI prints: aligned tables for people, JSON for machines."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, TextIO

Column = tuple[str, Callable[[dict[str, Any]], Any]]


def field(name: str) -> Callable[[dict[str, Any]], Any]:
    return lambda row: row.get(name)


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ",".join(cell(v) for v in value) or "-"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[Column], out: TextIO) -> None:
    """Rows as an aligned table with a header line; `(none)` when empty."""
    if not rows:
        out.write("(none)\n")
        return
    cells = [[cell(get(row)) for _, get in columns] for row in rows]
    headers = [h for h, _ in columns]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    for line in (headers, *cells):
        out.write("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() + "\n")


def record(row: dict[str, Any], out: TextIO, keys: Sequence[str] | None = None) -> None:
    """One object as aligned `key  value` lines (nested dicts flattened with dots)."""
    flat: list[tuple[str, Any]] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat.append((prefix, value))

    for key in keys or list(row):
        if key in row:
            walk(key, row[key])
    width = max((len(k) for k, _ in flat), default=0)
    for key, value in flat:
        out.write(f"{key.ljust(width)}  {cell(value)}\n")


def as_json(data: Any, out: TextIO) -> None:
    out.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
