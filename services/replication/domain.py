"""Replication rules: pure, synchronous, no I/O.

How a delta cycle is judged (sequence continuity, completeness), the protected item's state
machine (docs/reference.md states), health (Normal / Warning / Critical by the product's rules) and
RPO.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from shared.schemas.replication import CycleKind, Health, ItemState


class ReplicationError(Exception):
    """A refused request; `status` is the HTTP status it maps to."""

    status = 409

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# ------------------------------------------------------------------ enable prerequisites


@dataclass(frozen=True)
class FailedCheck:
    rule: str
    message: str


@dataclass(frozen=True)
class PrerequisiteVerdict:
    """The policy service's last verdict on enabling a VM (its failed checks only)."""

    ok: bool
    failed: tuple[FailedCheck, ...] = ()


class VerdictPending(Exception):
    """The verdict that would decide is not (or not yet correctly) known here: the caller
    waits a moment for the policy service's next verdict."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def check_prerequisites(vm_id: str, verdict: PrerequisiteVerdict | None) -> None:
    """Allow enabling `vm_id` (which this service does not protect: the caller checked) or
    raise. No verdict yet, or one whose only failure is "already protected" (the policy
    service has not yet seen the VM's protection disabled): `VerdictPending`. Any other failed
    check: `ReplicationError` (409) naming each failed check."""
    if verdict is None:
        raise VerdictPending(
            f"the prerequisite check of VM {vm_id} has not reached the replication service yet "
            "(the VM was discovered or its cloud paired a moment ago)"
        )
    if verdict.ok:
        return
    if [c.rule for c in verdict.failed] == ["not_protected"]:
        raise VerdictPending(
            f"the policy service still counts VM {vm_id} as protected (its protection was "
            "disabled a moment ago)"
        )
    detail = "; ".join(f"{c.rule}: {c.message}" for c in verdict.failed)
    raise ReplicationError(f"prerequisites not met for VM {vm_id}: {detail}")


class CycleVerdict(StrEnum):
    ACCEPT = "accept"  # the expected next cycle: stage it
    REPLAY = "replay"  # an already committed sequence number: reject (DLQ)
    GAP = "gap"  # a sequence number past the expected one: resync required
    IGNORE = "ignore"  # not what the item waits for now (e.g. deltas during a resync)


def judge_cycle_start(
    state: ItemState,
    last_committed: int | None,
    expected_resync_seq: int | None,
    seq: int,
    kind: CycleKind,
    unfinished: int | None = None,
) -> CycleVerdict:
    """Decide what to do with a `CycleStarted` for an item in `state`.

    `unfinished` is the number of a cycle that started but never completed: an agent that
    crashed mid-cycle ships everything since its last complete cycle under the next number, so
    a later cycle after an unfinished expected one replaces it (no gap)."""
    if last_committed is not None and seq <= last_committed:
        return CycleVerdict.REPLAY
    if state in (ItemState.WAITING_TO_START_RESYNC, ItemState.RESYNCHRONIZING):
        if kind is CycleKind.RESYNC and seq == expected_resync_seq:
            return CycleVerdict.ACCEPT
        return CycleVerdict.IGNORE
    if state in (ItemState.SUSPENDED, ItemState.FAILED_OVER, ItemState.NOT_ENABLED):
        return CycleVerdict.IGNORE
    if state is ItemState.WAITING_FOR_INITIAL and kind is CycleKind.DELTA:
        return CycleVerdict.IGNORE  # offline initial replication not imported yet
    expected = (last_committed or 0) + 1
    if last_committed is None and kind not in (CycleKind.INITIAL, CycleKind.RESYNC):
        return CycleVerdict.GAP  # a delta before any full copy: the replica can't apply it
    if seq == expected or (unfinished == expected and seq > unfinished):
        return CycleVerdict.ACCEPT
    return CycleVerdict.GAP


def incomplete_reason(
    expected_batches: int, expected_blocks: int, got_batches: int, got_blocks: int
) -> str | None:
    """None if the cycle arrived whole, else why it is truncated."""
    if got_batches != expected_batches or got_blocks != expected_blocks:
        return (
            f"truncated cycle: {got_batches}/{expected_batches} batches and "
            f"{got_blocks}/{expected_blocks} blocks arrived"
        )
    return None


def state_after_point(state: ItemState, kind: CycleKind) -> ItemState:
    """The state once a recovery point of `kind` is committed."""
    if kind is CycleKind.FINAL:
        return ItemState.SYNCED
    if state is ItemState.SUSPENDED:
        return state
    return ItemState.REPLICATING


READY_FOR_FAILOVER = {ItemState.REPLICATING, ItemState.SYNCED, ItemState.SUSPENDED}


# Failover (ItemFailedOver): planned after the final cycle (synced); unplanned from whatever
# state a disaster left the item in, as long as it has a recovery point.
FAILOVER_FROM = {
    ItemState.SYNCED,
    ItemState.REPLICATING,
    ItemState.SUSPENDED,
    ItemState.ERROR,
    ItemState.WAITING_TO_START_RESYNC,
    ItemState.RESYNCHRONIZING,
    ItemState.RESYNC_SUSPENDED,
}


def failover_refusal(state: ItemState, has_point: bool) -> str | None:
    """Why an item can't be marked failed over (None: it can)."""
    if not has_point:
        return "it has no recovery point (initial replication has not finished)"
    if state not in FAILOVER_FROM:
        return f"it is in state '{state.value}'; allowed in: " + ", ".join(
            sorted(s.value for s in FAILOVER_FROM)
        )
    return None


@dataclass(frozen=True)
class PointRef:
    cycle_seq: int
    app_consistent: bool


def choose_point(
    points: list[PointRef], choice: str, seq: int | None, *, held: int | None = None
) -> int:
    """The cycle to recover from among the live points: `latest`, `latest_app_consistent`
    or `chosen` (`seq`). ReplicationError says why there is none.

    `held`: the newest point the recovery host's replica holds, for a test failover over it.
    `latest` and `latest_app_consistent` then mean the latest the replica holds, when it holds
    one that qualifies: a drill does not wait for (or copy around) points still being
    applied there. Without such a point the choice is made among all live points."""
    if not points:
        raise ReplicationError("the item has no retained recovery point")
    if held is not None and choice != "chosen":
        on_replica = [p for p in points if p.cycle_seq <= held]
        if any(p.app_consistent for p in on_replica) or (on_replica and choice == "latest"):
            points = on_replica
    if choice == "latest":
        return max(p.cycle_seq for p in points)
    if choice == "latest_app_consistent":
        app = [p.cycle_seq for p in points if p.app_consistent]
        if not app:
            raise ReplicationError("the item has no app-consistent recovery point")
        return max(app)
    if choice == "chosen":
        if seq is None:
            raise ReplicationError("choice 'chosen' needs a cycle_seq")
        if seq not in {p.cycle_seq for p in points}:
            live = ", ".join(str(p.cycle_seq) for p in sorted(points, key=lambda p: p.cycle_seq))
            raise ReplicationError(
                f"recovery point {seq} is not retained (pruned or never committed); "
                f"retained: {live}"
            )
        return seq
    raise ReplicationError(f"unknown recovery point choice '{choice}'")


STORAGE_ERRNOS = {errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def storage_fault(exc: OSError) -> str | None:
    """The item's error for a replica-store write that failed for a reason an operator must
    fix (None: not such a failure): the error, its cause and a recommendation."""
    if exc.errno not in STORAGE_ERRNOS:
        return None
    cause = {
        errno.ENOSPC: "the replica store's filesystem is full",
        errno.EDQUOT: "the replica store's disk quota is used up",
        errno.EFBIG: "a replica store file reached the filesystem's size limit",
        errno.EROFS: "the replica store's filesystem is read-only",
        errno.EIO: "the replica store's disk reported an I/O error",
    }[exc.errno]
    return (
        f"replica storage failure: cycles cannot be stored ({exc.strerror or exc}); cause: "
        f"{cause}; recommendation: free or add space (or repair the disk) under the "
        "replication service's store directory; the cycles wait in Kafka and are stored, "
        "nothing lost, once writes succeed"
    )


@dataclass(frozen=True)
class FaultNotes:
    """What is noted about an item until a cycle of it commits again."""

    storage_fault: str | None = None  # its cycles cannot be stored (`storage_fault`)
    dead_letter: str | None = None  # why a delta record of it was dead-lettered


@dataclass(frozen=True)
class HealthInputs:
    state: ItemState
    paused: bool
    now: datetime
    protected_since: datetime
    last_cycle_at: datetime | None
    points_in_window: int
    copy_interval_seconds: int
    window_seconds: int
    stale_log_seconds: int
    missed_ratio_warning: float
    error: str | None
    rpo_seconds: float | None = None
    rpo_threshold_seconds: float | None = None
    storage_fault: str | None = None
    dead_letter: str | None = None  # why a record of the item was dead-lettered, if one was
    broker_problem: str | None = None  # why this service cannot reach Kafka now, if it cannot


@dataclass(frozen=True)
class HealthVerdict:
    health: Health
    reasons: tuple[str, ...]
    expected_cycles: int
    missed_cycles: int


def evaluate_health(h: HealthInputs) -> HealthVerdict:
    """docs/reference.md: Critical on non-recoverable errors and when resync is required; Warning
    when more than 20 % of the cycles in the monitoring window were missed, or no log was
    shipped for over 1 h, or replication is paused."""
    window_start = max(h.now - timedelta(seconds=h.window_seconds), h.protected_since)
    elapsed = max((h.now - window_start).total_seconds(), 0.0)
    expected = int(elapsed // h.copy_interval_seconds)
    missed = max(expected - h.points_in_window, 0)
    critical: list[str] = []
    warning: list[str] = []
    if h.state in (
        ItemState.WAITING_TO_START_RESYNC,
        ItemState.RESYNCHRONIZING,
        ItemState.RESYNC_SUSPENDED,
    ):
        critical.append(f"resync required: {h.error or 'replica diverged from the source'}")
    if h.state is ItemState.ERROR:
        critical.append(f"non-recoverable error: {h.error or 'unknown'}")
    if h.storage_fault:
        critical.append(h.storage_fault)
    if h.dead_letter:
        warning.append(h.dead_letter)
    if h.paused or h.state is ItemState.SUSPENDED:
        warning.append("replication is paused")
    replicating = h.state in (ItemState.REPLICATING, ItemState.INITIAL_REPLICATION)
    if replicating and expected >= 5 and missed > h.missed_ratio_warning * expected:
        warning.append(f"{missed} of {expected} cycles missed in the monitoring window")
    since = h.last_cycle_at or h.protected_since
    silent = (h.now - since).total_seconds()
    if replicating and silent > h.stale_log_seconds:
        warning.append(f"no cycle shipped for {silent:.0f}s")
    over = h.rpo_threshold_seconds
    if replicating and h.rpo_seconds is not None and over is not None and h.rpo_seconds > over:
        cause = (
            f"cause: the replication service cannot reach Kafka ({h.broker_problem}), where "
            "the cycles wait; recommendation: check the brokers (nothing is lost)"
            if h.broker_problem
            else "check the source agent, the broker and the replica storage"
        )
        warning.append(
            f"RPO {h.rpo_seconds:.0f}s is over its threshold of {over:.0f}s: cycles are late "
            f"({cause})"
        )
    if critical:
        return HealthVerdict(Health.CRITICAL, tuple(critical + warning), expected, missed)
    if warning:
        return HealthVerdict(Health.WARNING, tuple(warning), expected, missed)
    return HealthVerdict(Health.NORMAL, (), expected, missed)


def rpo_seconds(now: datetime, latest_point_source_time: datetime | None) -> float | None:
    """RPO = now - the source time captured by the latest recovery point (None: no point)."""
    if latest_point_source_time is None:
        return None
    return max((now - latest_point_source_time).total_seconds(), 0.0)


def rpo_threshold_seconds(copy_interval_seconds: int) -> float:
    """The RPO an item should stay under (alerting): two copy intervals, at least 30 s."""
    return float(max(2 * copy_interval_seconds, 30))


def check_action(state: ItemState, action: str) -> None:
    """Refuse item actions that make no sense in `state`, with a clear message."""
    allowed: dict[str, set[ItemState]] = {
        "pause": {
            ItemState.REPLICATING,
            ItemState.INITIAL_REPLICATION,
            ItemState.WAITING_FOR_INITIAL,
        },
        "resume": {ItemState.SUSPENDED},
        "resync": {
            ItemState.REPLICATING,
            ItemState.WAITING_TO_START_RESYNC,
            ItemState.ERROR,
            ItemState.SUSPENDED,
            ItemState.RESYNCHRONIZING,
        },
    }
    if action in allowed and state not in allowed[action]:
        raise ReplicationError(
            f"cannot {action} an item in state '{state.value}'; allowed in: "
            + ", ".join(sorted(s.value for s in allowed[action]))
        )


def geometry_problem(
    known: list[dict[str, Any]],
    disks: list[dict[str, Any]],
    max_disk_bytes: int,
    max_block_bytes: int,
) -> tuple[str, str] | None:
    """(reason, text) if a cycle's disks are not the item's known disks with their sizes, or
    exceed the service's bounds; None if they are fine."""
    sizes = {d["disk_id"]: d["size_bytes"] for d in known}
    seen = set()
    for disk in disks:
        disk_id, size = disk["disk_id"], disk["size_bytes"]
        if disk_id in seen:
            return "bad_geometry", f"disk {disk_id} appears twice in the cycle"
        seen.add(disk_id)
        if size > max_disk_bytes:
            return "disk_too_large", f"disk {disk_id}: {size} bytes > the {max_disk_bytes} allowed"
        if disk["block_size"] > max_block_bytes:
            return (
                "bad_geometry",
                f"disk {disk_id}: block size {disk['block_size']} > the {max_block_bytes} allowed",
            )
        if disk_id not in sizes:
            return "unknown_disk", f"disk {disk_id} is not a disk of the protected item"
        if size != sizes[disk_id]:
            return (
                "disk_size_mismatch",
                f"disk {disk_id}: {size} bytes, the item's disk has {sizes[disk_id]}",
            )
    return None
