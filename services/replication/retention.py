"""Retention: which recovery points of an item to keep. Pure; the caller prunes the rest.

The rule (docs/reference.md "Replication policy": 0-24 additional recovery points, hourly, and an
app-consistent snapshot frequency of 1-12 h; ours goes up to 168 hours):

1. The latest point is always kept: replication continues from it.
2. The `keep_recent` most recent points are kept, whatever their age (short-term granularity
   at any copy frequency, 1 s to 15 min).
3. The window is [now - retention_hours, now]. In each clock hour (UTC) that the window
   touches, the latest point of that hour that lies in the window is kept: these are the
   hourly "additional recovery points". With 24 hours that is up to 25 hours: the current
   (partial) hour, whose latest point is the latest point, plus 24 earlier ones.
   Buckets are clock hours, not hours counted back from `now`, so a point kept once stays kept
   until its hour leaves the window: pruning every few seconds keeps the same set as pruning
   once at the end (buckets sliding with `now` would drop yesterday's survivors and leave gaps).
4. The latest app-consistent point is kept if it is no older than
   max(retention_hours, app_consistent_hours): snapshots come every `app_consistent_hours`, so
   "fail over to the latest app-consistent point" stays possible even with 0 additional points.
5. A point an unanswered materialise request needs (`pinned`, see `pinned_seqs`) is kept: a
   failover that asked for a retained point gets it, however short the window.
6. Everything else is dropped, including everything older than the window (except 1, 2, 4, 5).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

MAX_RETENTION_HOURS = 168
# A request this old pins nothing: the failover service waits 30 min for an answer by default
# (DR_FAILOVER_STEP_TIMEOUT_SECONDS); past twice that nobody waits for it (e.g. a request
# handed to a recovery host that went away with the item's replica, its failover committed).
PIN_MAX_AGE = timedelta(hours=1)


@dataclass(frozen=True)
class PointMeta:
    seq: int
    source_time: datetime  # timezone-aware
    app_consistent: bool


@dataclass(frozen=True)
class OpenRequest:
    """A materialise request not answered yet ('pending', 'delegated' to the recovery host, or
    being worked on): the point it names (choice `chosen`) and the one the worker chose."""

    created_at: datetime  # timezone-aware
    named_seq: int | None
    chosen_seq: int | None


def pinned_seqs(requests: Sequence[OpenRequest], now: datetime) -> set[int]:
    """The points that `requests` (unanswered) still need, kept by retention until answered;
    a request older than `PIN_MAX_AGE` pins nothing."""
    since = now - PIN_MAX_AGE
    return {
        seq
        for r in requests
        if r.created_at >= since
        for seq in (r.named_seq, r.chosen_seq)
        if seq is not None
    }


def select_retained(
    points: Sequence[PointMeta],
    now: datetime,
    retention_hours: int,
    app_consistent_hours: int,
    keep_recent: int,
    pinned: Collection[int] = frozenset(),
) -> set[int]:
    """The seqs of `points` to keep at `now` (see the module docstring for the rule)."""
    if not 0 <= retention_hours <= MAX_RETENTION_HOURS:
        raise ValueError(f"retention_hours must be 0-{MAX_RETENTION_HOURS}")
    if app_consistent_hours < 0 or keep_recent < 0:
        raise ValueError("app_consistent_hours and keep_recent must be >= 0")
    if now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")
    if not points:
        return set()
    by_seq = sorted(points, key=lambda p: p.seq)
    keep = {by_seq[-1].seq}
    keep.update(p.seq for p in by_seq[max(0, len(by_seq) - keep_recent) :] if keep_recent)

    window_start = now - timedelta(hours=retention_hours)
    latest_of_hour: dict[int, PointMeta] = {}
    if retention_hours:
        for p in by_seq:
            if p.source_time >= window_start:
                hour = int(p.source_time.timestamp() // 3600)
                best = latest_of_hour.get(hour)
                if best is None or (p.source_time, p.seq) >= (best.source_time, best.seq):
                    latest_of_hour[hour] = p
    keep.update(p.seq for p in latest_of_hour.values())

    app_start = now - timedelta(hours=max(retention_hours, app_consistent_hours))
    app = [p for p in by_seq if p.app_consistent and p.source_time >= app_start]
    if app:
        keep.add(app[-1].seq)
    keep.update(p.seq for p in by_seq if p.seq in pinned)
    return keep
