"""drctl's progress views when stdout is not a terminal: one plain line per change (initial
replication with bytes, rate and ETA; a job's tasks), no terminal control sequences."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

from services.cli.progress import InitialWatch, JobWatch, human_bytes, is_terminal

MiB = 2**20


def item(state: str, done: int, total: int, finished: bool = False) -> dict[str, Any]:
    return {
        "item_id": "i1",
        "vm_name": "web-01",
        "state": state,
        "initial_progress": {"bytes_done": done, "bytes_total": total} if total else None,
        "initial_done_at": "2026-01-01T00:00:00Z" if finished else None,
        "disks": [{"size_bytes": 8 * MiB}],
        "error": None,
    }


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_initial_replication_plain_lines_with_rate_and_eta() -> None:
    clock = Clock()
    samples: Iterator[dict[str, Any]] = iter(
        [
            item("waiting_for_initial_replication", 0, 0),
            item("initial_replication", 2 * MiB, 8 * MiB),
            item("initial_replication", 2 * MiB, 8 * MiB),  # stalled: the rate falls
            item("initial_replication", 6 * MiB, 8 * MiB),
            item("replicating", 8 * MiB, 8 * MiB, finished=True),
        ]
    )

    def fetch(item_id: str) -> dict[str, Any]:
        assert item_id == "i1"
        clock.now += 1.0
        return next(samples)

    out = io.StringIO()
    assert not is_terminal(out)
    done = InitialWatch(fetch=fetch, out=out, poll=0, clock=clock).run(["i1"])
    assert done[0]["initial_done_at"]
    lines = out.getvalue().splitlines()
    assert lines == [
        "web-01: waiting_for_initial_replication     - 0 B of 0 B, -, eta -",
        "web-01: initial_replication  25.0% 2.0 MiB of 8.0 MiB, 2.0 MiB/s, eta 3s",
        "web-01: initial_replication  25.0% 2.0 MiB of 8.0 MiB, 1.0 MiB/s, eta 6s",
        "web-01: initial_replication  75.0% 6.0 MiB of 8.0 MiB, 2.0 MiB/s, eta 1s",
        "web-01: replicating 100.0% 8.0 MiB of 8.0 MiB, 2.0 MiB/s, eta -",
    ]
    assert "\x1b" not in out.getvalue() and "\r" not in out.getvalue()


def test_initial_watch_stops_on_error() -> None:
    failed = {**item("error", 0, 0), "error": "agent could not enable replication: no disk"}
    out = io.StringIO()
    InitialWatch(fetch=lambda _: failed, out=out, poll=0).run(["i1"])
    assert out.getvalue() == (
        "web-01: error: agent could not enable replication: no disk     - 0 B of 0 B, -, eta -\n"
    )


def test_job_watch_plain_lines() -> None:
    def job(state: str, progress: int, tasks: list[tuple[str, str]], **extra: Any) -> Any:
        return {
            "job_id": "j1",
            "operation": "planned_failover",
            "state": state,
            "progress": progress,
            "tasks": [
                {"task_no": n, "name": name, "state": s, "error": None}
                for n, (name, s) in enumerate(tasks, 1)
            ],
            **extra,
        }

    answers = iter(
        [
            job("in_progress", 0, [("shut down web-01", "in_progress")]),
            job("in_progress", 50, [("shut down web-01", "succeeded"), ("final sync", "failed")]),
            job(
                "failed",
                100,
                [("shut down web-01", "succeeded"), ("final sync", "failed")],
                error="final sync: timeout",
            ),
        ]
    )
    asked: list[tuple[str | None, int | None]] = []

    def fetch(state: str | None, progress: int | None) -> dict[str, Any]:
        asked.append((state, progress))
        return dict(next(answers))

    out = io.StringIO()
    final = JobWatch(fetch=fetch, out=out).run()
    assert final["state"] == "failed"
    assert asked == [(None, None), ("in_progress", 0), ("in_progress", 50)]
    assert out.getvalue().splitlines() == [
        "  [in_progress      ] shut down web-01",
        "planned_failover in_progress 0%",
        "  [succeeded        ] shut down web-01",
        "  [failed           ] final sync",
        "planned_failover in_progress 50%",
        "planned_failover failed 100%",
        "error: final sync: timeout",
    ]


def test_human_bytes() -> None:
    assert [human_bytes(n) for n in (0, 1023, 1024, 5 * MiB, 3 * 2**40)] == [
        "0 B",
        "1023 B",
        "1.0 KiB",
        "5.0 MiB",
        "3.0 TiB",
    ]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_rich_draws_bars_and_a_task_table() -> None:
    samples = iter(
        [
            item("initial_replication", 4 * MiB, 8 * MiB),
            item("replicating", 8 * MiB, 8 * MiB, finished=True),
        ]
    )
    out = Terminal()
    InitialWatch(fetch=lambda _: next(samples), out=out, poll=0).run(["i1"])
    text = out.getvalue()
    assert "web-01" in text and "8.0/8.0 MiB" in text and "\x1b[" in text

    jobs = iter(
        [
            {"operation": "commit", "state": "in_progress", "progress": 0, "tasks": []},
            {
                "operation": "commit",
                "state": "succeeded",
                "progress": 100,
                "tasks": [{"task_no": 1, "name": "prune points", "state": "succeeded"}],
            },
        ]
    )
    out = Terminal()
    JobWatch(fetch=lambda state, progress: next(jobs), out=out).run()
    assert "commit succeeded 100%" in out.getvalue() and "prune points" in out.getvalue()
