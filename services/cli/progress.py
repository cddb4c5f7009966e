"""Progress of long work for `drctl`: initial replication as progress bars (bytes, rate, ETA)
and a job's tasks live, drawn with `rich` on a terminal; plain lines, one per change, when the
output is not a terminal (a pipe, a log file, CI) or is JSON (progress then goes to stderr)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from rich.console import Console
from rich.live import Live
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

Fetch = Callable[[], dict[str, Any]]
FINISHED = ("succeeded", "failed", "completed_with_errors")


def is_terminal(out: TextIO) -> bool:
    isatty = getattr(out, "isatty", None)
    return bool(isatty and isatty())


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover - the loop always returns


@dataclass
class Rate:
    """Bytes per second over the samples seen so far (from the first sample with progress)."""

    start: tuple[float, int] | None = None
    last: tuple[float, int] | None = None

    def add(self, now: float, done: int) -> None:
        if self.start is None:
            self.start = (now, done)
        self.last = (now, done)

    def per_second(self) -> float | None:
        if self.start is None or self.last is None or self.last[0] <= self.start[0]:
            return None
        return (self.last[1] - self.start[1]) / (self.last[0] - self.start[0])


def initial_done(item: dict[str, Any]) -> bool:
    return bool(item.get("initial_done_at"))


def settled(item: dict[str, Any]) -> bool:
    """Initial replication done, or the item in error (nothing more will come)."""
    return initial_done(item) or item.get("state") == "error"


def _sizes(item: dict[str, Any]) -> tuple[int, int]:
    progress = item.get("initial_progress") or {}
    total = int(progress.get("bytes_total") or 0)
    done = int(progress.get("bytes_done") or 0)
    if initial_done(item):
        total = total or sum(int(d.get("size_bytes") or 0) for d in item.get("disks") or [])
        done = total
    return done, total


def plain_initial_line(item: dict[str, Any], rate: Rate) -> str:
    done, total = _sizes(item)
    share = f"{done / total * 100:5.1f}%" if total else "    -"
    speed = rate.per_second()
    eta = "-"
    if speed and speed > 0 and total > done:
        eta = f"{(total - done) / speed:.0f}s"
    rate_text = f"{human_bytes(speed)}/s" if speed else "-"
    error = f": {item['error']}" if item.get("state") == "error" and item.get("error") else ""
    return (
        f"{item['vm_name']}: {item['state']}{error} {share} "
        f"{human_bytes(done)} of {human_bytes(total)}, {rate_text}, eta {eta}"
    )


@dataclass
class InitialWatch:
    """Watch the initial replication of items until each has committed its first point."""

    fetch: Callable[[str], dict[str, Any]]
    out: TextIO
    poll: float = 1.0
    timeout: float = 3600.0
    clock: Callable[[], float] = time.monotonic
    rates: dict[str, Rate] = field(default_factory=dict)

    def run(self, item_ids: list[str]) -> list[dict[str, Any]]:
        if is_terminal(self.out):
            return self._bars(item_ids)
        return self._lines(item_ids)

    def _sample(self, item_id: str) -> dict[str, Any]:
        item = self.fetch(item_id)
        self.rates.setdefault(item_id, Rate()).add(self.clock(), _sizes(item)[0])
        return item

    def _lines(self, item_ids: list[str]) -> list[dict[str, Any]]:
        deadline = self.clock() + self.timeout
        last: dict[str, str] = {}
        items: dict[str, dict[str, Any]] = {}
        while True:
            for item_id in item_ids:
                if item_id in items and settled(items[item_id]):
                    continue
                items[item_id] = self._sample(item_id)
                line = plain_initial_line(items[item_id], self.rates[item_id])
                if line != last.get(item_id):
                    self.out.write(line + "\n")
                    self.out.flush()
                    last[item_id] = line
            if all(settled(i) for i in items.values()) or self.clock() > deadline:
                return list(items.values())
            time.sleep(self.poll)

    def _bars(self, item_ids: list[str]) -> list[dict[str, Any]]:
        deadline = self.clock() + self.timeout
        items: dict[str, dict[str, Any]] = {}
        columns = (
            TextColumn("{task.description:<16}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[state]}"),
        )
        console = Console(file=self.out)
        with Progress(*columns, console=console, transient=False) as bars:
            tasks = {}
            while True:
                for item_id in item_ids:
                    if item_id in items and settled(items[item_id]):
                        continue
                    item = items[item_id] = self._sample(item_id)
                    done, total = _sizes(item)
                    if item_id not in tasks:
                        tasks[item_id] = bars.add_task(
                            item["vm_name"], total=total or None, state=item["state"]
                        )
                    bars.update(
                        tasks[item_id],
                        completed=done,
                        total=total or None,
                        state=item["state"],
                    )
                if all(settled(i) for i in items.values()) or self.clock() > deadline:
                    return list(items.values())
                time.sleep(self.poll)


def _task_table(job: dict[str, Any]) -> Table:
    table = Table(
        title=f"{job['operation']} {job['state']} {job['progress']}%", title_justify="left"
    )
    for column in ("NO", "TASK", "STATE", "ERROR"):
        table.add_column(column)
    for task in job.get("tasks", []):
        table.add_row(str(task["task_no"]), task["name"], task["state"], task.get("error") or "")
    return table


@dataclass
class JobWatch:
    """Watch a job until it ends. `fetch(state, progress)` long-polls for a change."""

    fetch: Callable[[str | None, int | None], dict[str, Any]]
    out: TextIO
    approve_hint: Callable[[dict[str, Any]], str | None] = lambda job: None
    timeout: float = 24 * 3600.0

    def run(self) -> dict[str, Any]:
        if is_terminal(self.out):
            return self._live()
        return self._lines()

    def _lines(self) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        state: str | None = None
        progress: int | None = None
        seen: set[tuple[int, str]] = set()
        job: dict[str, Any] = {}
        while time.monotonic() < deadline:
            job = self.fetch(state, progress)
            for task in job.get("tasks", []):
                mark = (task["task_no"], task["state"])
                if mark not in seen:
                    seen.add(mark)
                    extra = f": {task['error']}" if task.get("error") else ""
                    self.out.write(f"  [{task['state']:<17}] {task['name']}{extra}\n")
            if job["state"] != state or job["progress"] != progress:
                self.out.write(f"{job['operation']} {job['state']} {job['progress']}%\n")
                hint = self.approve_hint(job)
                if hint:
                    self.out.write(f"  {hint}\n")
            self.out.flush()
            state, progress = job["state"], job["progress"]
            if state in FINISHED:
                if job.get("error"):
                    self.out.write(f"error: {job['error']}\n")
                break
        return job

    def _live(self) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        console = Console(file=self.out)
        job = self.fetch(None, None)
        shown: str | None = None
        with Live(_task_table(job), console=console, auto_refresh=False) as live:
            while job["state"] not in FINISHED and time.monotonic() < deadline:
                hint = self.approve_hint(job)
                if hint and hint != shown:
                    live.console.print(hint)
                    shown = hint
                job = self.fetch(job["state"], job["progress"])
                live.update(_task_table(job), refresh=True)
        if job.get("error"):
            console.print(f"error: {job['error']}")
        return job
