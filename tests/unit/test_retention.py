"""Retention: latest always, the most recent few, the latest point of every hour in the window,
the latest app-consistent point, the points unanswered materialise requests need; stable when
pruning runs over and over."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.replication.retention import (
    PIN_MAX_AGE,
    OpenRequest,
    PointMeta,
    pinned_seqs,
    select_retained,
)

NOW = datetime(2025, 3, 1, 12, 30, 7, tzinfo=UTC)


def timeline(interval_s: int, hours: float, app_every_h: int = 0) -> list[PointMeta]:
    """Points every `interval_s` for `hours` up to NOW; every `app_every_h`-th hour's first
    point app-consistent."""
    n = int(hours * 3600 // interval_s)
    points = []
    for k in range(n):
        t = NOW - timedelta(seconds=interval_s * (n - 1 - k))
        app = (
            bool(app_every_h)
            and t.minute == 0
            and t.second < interval_s
            and t.hour % app_every_h == 0
        )
        points.append(PointMeta(k + 1, t, app))
    return points


def hours_of(points: list[PointMeta], seqs: set[int]) -> dict[datetime, int]:
    return {
        p.source_time.replace(minute=0, second=0, microsecond=0): p.seq
        for p in points
        if p.seq in seqs
    }


@pytest.mark.parametrize("interval_s", [1, 30, 300])
def test_hourly_points_across_the_window(interval_s: int) -> None:
    points = timeline(interval_s, hours=30)
    keep = select_retained(points, NOW, retention_hours=24, app_consistent_hours=0, keep_recent=3)
    by_seq = {p.seq: p for p in points}
    latest = points[-1].seq
    assert {latest, latest - 1, latest - 2} <= keep
    window = [p for p in points if p.source_time >= NOW - timedelta(hours=24)]
    hourly = {}
    for p in window:
        hourly[p.source_time.replace(minute=0, second=0, microsecond=0)] = p.seq
    assert set(hourly.values()) <= keep
    assert len(hourly) == 25  # 24 whole hours back plus the current partial one
    assert keep == set(hourly.values()) | {latest - 1, latest - 2}
    assert all(by_seq[s].source_time >= NOW - timedelta(hours=24) for s in keep)


@pytest.mark.parametrize("interval_s", [1, 30, 300])
def test_pruning_repeatedly_keeps_what_one_prune_at_the_end_keeps(interval_s: int) -> None:
    points = timeline(interval_s, hours=6, app_every_h=2)
    survivors: list[PointMeta] = []
    for p in points:
        survivors.append(p)
        if p.seq % max(1, 600 // interval_s) == 0:  # the service prunes every ~10 min
            now = p.source_time + timedelta(seconds=1)
            keep = select_retained(survivors, now, 3, 2, 5)
            survivors = [s for s in survivors if s.seq in keep]
    final = select_retained(survivors, NOW, 3, 2, 5)
    assert final == select_retained(points, NOW, 3, 2, 5)


def test_zero_additional_points_keeps_latest_recent_and_latest_app_consistent() -> None:
    points = timeline(300, hours=10, app_every_h=4)
    app = [p.seq for p in points if p.app_consistent]
    keep = select_retained(points, NOW, retention_hours=0, app_consistent_hours=4, keep_recent=2)
    assert keep == {points[-1].seq, points[-2].seq, app[-1]}
    keep = select_retained(points, NOW, retention_hours=0, app_consistent_hours=0, keep_recent=0)
    assert keep == {points[-1].seq}


def test_fewer_points_than_keep_recent_are_all_kept() -> None:
    points = timeline(300, hours=10)[-8:]
    later = NOW + timedelta(hours=10)  # all out of the window: only "recent" keeps them
    assert select_retained(points, later, 1, 0, keep_recent=12) == {p.seq for p in points}
    assert select_retained(points, later, 1, 0, keep_recent=8) == {p.seq for p in points}
    assert select_retained(points, later, 1, 0, keep_recent=3) == {p.seq for p in points[-3:]}


def test_old_points_go_except_the_latest() -> None:
    points = timeline(300, hours=3)
    later = NOW + timedelta(hours=10)  # replication stopped 10 h ago
    assert select_retained(points, later, 4, 1, 0) == {points[-1].seq}


def test_week_long_retention_and_bad_arguments() -> None:
    points = timeline(1800, hours=200)
    keep = select_retained(points, NOW, 168, 12, 1)
    assert len(keep) == 169
    assert len(hours_of(points, keep)) == 169
    with pytest.raises(ValueError):
        select_retained(points, NOW, 169, 1, 1)
    with pytest.raises(ValueError):
        select_retained(points, NOW.replace(tzinfo=None), 24, 1, 1)
    assert select_retained([], NOW, 24, 1, 3) == set()


def test_a_point_a_request_waits_for_is_kept_until_it_is_answered() -> None:
    # 1 s cycles: the 5 recent points span 5 s, far less than a failover may wait for its point
    points = timeline(1, hours=0.1)
    asked = points[-20].seq
    unpinned = select_retained(points, NOW, 0, 0, 5)
    assert asked not in unpinned
    pending = [OpenRequest(NOW - timedelta(seconds=40), named_seq=asked, chosen_seq=None)]
    keep = select_retained(points, NOW, 0, 0, 5, pinned=pinned_seqs(pending, NOW))
    assert keep == unpinned | {asked}
    # answered: the request is no longer open, and the next pass prunes the point
    assert asked not in select_retained(points, NOW, 0, 0, 5, pinned=pinned_seqs([], NOW))
    # a pin of a point already pruned (or never committed) keeps nothing else
    gone = select_retained(points[-10:], NOW, 0, 0, 5, pinned={asked, 10**9})
    assert gone == select_retained(points[-10:], NOW, 0, 0, 5)


def test_pins_are_the_named_and_chosen_points_of_recent_requests() -> None:
    recent = NOW - PIN_MAX_AGE + timedelta(seconds=1)
    requests = [
        OpenRequest(NOW, named_seq=7, chosen_seq=7),
        OpenRequest(recent, named_seq=None, chosen_seq=12),  # `latest` when it was chosen
        OpenRequest(NOW, named_seq=None, chosen_seq=None),  # not worked on yet: latest is kept
        # older than anyone waits for an answer (e.g. a host gone with its replica): no pin
        OpenRequest(NOW - PIN_MAX_AGE - timedelta(seconds=1), named_seq=3, chosen_seq=4),
    ]
    assert pinned_seqs(requests, NOW) == {7, 12}
    assert pinned_seqs([], NOW) == set()
