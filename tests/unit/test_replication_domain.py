from __future__ import annotations

import errno
from datetime import UTC, datetime, timedelta

import pytest

from services.replication import domain
from services.replication.domain import CycleVerdict, HealthInputs
from shared.schemas.replication import CycleKind, Health, ItemState

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
R = ItemState.REPLICATING


@pytest.mark.parametrize(
    ("state", "last", "resync_seq", "seq", "kind", "verdict"),
    [
        (ItemState.WAITING_FOR_INITIAL, None, None, 1, CycleKind.INITIAL, CycleVerdict.ACCEPT),
        (ItemState.WAITING_FOR_INITIAL, None, None, 1, CycleKind.DELTA, CycleVerdict.IGNORE),
        (ItemState.INITIAL_REPLICATION, None, None, 1, CycleKind.DELTA, CycleVerdict.GAP),
        (R, 5, None, 6, CycleKind.DELTA, CycleVerdict.ACCEPT),
        (R, 5, None, 5, CycleKind.DELTA, CycleVerdict.REPLAY),
        (R, 5, None, 2, CycleKind.DELTA, CycleVerdict.REPLAY),
        (R, 5, None, 8, CycleKind.DELTA, CycleVerdict.GAP),
        (ItemState.RESYNCHRONIZING, 5, 6, 6, CycleKind.RESYNC, CycleVerdict.ACCEPT),
        (ItemState.RESYNCHRONIZING, 5, 6, 7, CycleKind.DELTA, CycleVerdict.IGNORE),
        (ItemState.RESYNCHRONIZING, 5, 6, 6, CycleKind.DELTA, CycleVerdict.IGNORE),
        (ItemState.SUSPENDED, 5, None, 6, CycleKind.DELTA, CycleVerdict.IGNORE),
        (R, 5, None, 6, CycleKind.FINAL, CycleVerdict.ACCEPT),
    ],
)
def test_cycle_verdicts(
    state: ItemState,
    last: int | None,
    resync_seq: int | None,
    seq: int,
    kind: CycleKind,
    verdict: CycleVerdict,
) -> None:
    assert domain.judge_cycle_start(state, last, resync_seq, seq, kind) is verdict


def test_a_cycle_after_an_unfinished_one_replaces_it() -> None:
    # The agent crashed mid-cycle 6 and re-ships everything since 5 as cycle 7.
    assert domain.judge_cycle_start(R, 5, None, 7, CycleKind.DELTA, 6) is CycleVerdict.ACCEPT
    # An agent that crashed during its initial copy starts it again under the next number.
    initial = ItemState.INITIAL_REPLICATION
    assert (
        domain.judge_cycle_start(initial, None, None, 2, CycleKind.INITIAL, 1)
        is CycleVerdict.ACCEPT
    )
    assert domain.judge_cycle_start(initial, None, None, 2, CycleKind.DELTA, 1) is CycleVerdict.GAP
    # Without a started cycle 6, 7 is a gap.
    assert domain.judge_cycle_start(R, 5, None, 7, CycleKind.DELTA, None) is CycleVerdict.GAP


def test_truncated_cycle_is_reported() -> None:
    assert domain.incomplete_reason(3, 100, 3, 100) is None
    why = domain.incomplete_reason(3, 100, 2, 64)
    assert why is not None and "2/3 batches" in why


def test_final_cycle_leaves_the_item_synced() -> None:
    assert domain.state_after_point(R, CycleKind.FINAL) is ItemState.SYNCED
    assert domain.state_after_point(ItemState.RESYNCHRONIZING, CycleKind.RESYNC) is R
    assert domain.state_after_point(ItemState.INITIAL_REPLICATION, CycleKind.INITIAL) is R


def inputs(**overrides: object) -> HealthInputs:
    base: dict[str, object] = {
        "state": R,
        "paused": False,
        "now": NOW,
        "protected_since": NOW - timedelta(hours=1),
        "last_cycle_at": NOW - timedelta(seconds=30),
        "points_in_window": 120,
        "copy_interval_seconds": 30,
        "window_seconds": 12 * 3600,
        "stale_log_seconds": 3600,
        "missed_ratio_warning": 0.2,
        "error": None,
    }
    base.update(overrides)
    return HealthInputs(**base)  # type: ignore[arg-type]


def test_all_cycles_arrived_is_normal() -> None:
    verdict = domain.evaluate_health(inputs())
    assert verdict.health is Health.NORMAL
    assert verdict.expected_cycles == 120 and verdict.missed_cycles == 0


def test_more_than_20_percent_missed_is_warning() -> None:
    assert domain.evaluate_health(inputs(points_in_window=97)).health is Health.NORMAL  # 19 %
    verdict = domain.evaluate_health(inputs(points_in_window=95))  # 21 % missed
    assert verdict.health is Health.WARNING
    assert "25 of 120 cycles missed" in verdict.reasons[0]


def test_rpo_over_its_threshold_is_warning_by_itself() -> None:
    fine = inputs(rpo_seconds=50.0, rpo_threshold_seconds=60.0)
    assert domain.evaluate_health(fine).health is Health.NORMAL
    verdict = domain.evaluate_health(inputs(rpo_seconds=62.0, rpo_threshold_seconds=60.0))
    assert verdict.health is Health.WARNING
    assert "RPO 62s is over its threshold of 60s" in verdict.reasons[0]


def test_late_cycles_name_an_unreachable_broker_as_the_cause() -> None:
    verdict = domain.evaluate_health(
        inputs(rpo_seconds=62.0, rpo_threshold_seconds=60.0, broker_problem="no broker answered")
    )
    assert verdict.health is Health.WARNING
    assert "cannot reach Kafka (no broker answered)" in verdict.reasons[0], verdict.reasons


def test_no_log_for_over_an_hour_is_warning() -> None:
    verdict = domain.evaluate_health(
        inputs(
            last_cycle_at=NOW - timedelta(hours=2),
            protected_since=NOW - timedelta(days=1),
            points_in_window=1000,
            copy_interval_seconds=3600,
        )
    )
    assert verdict.health is Health.WARNING
    assert any("no cycle shipped" in r for r in verdict.reasons)


def test_paused_is_warning_and_resync_is_critical() -> None:
    assert domain.evaluate_health(inputs(paused=True)).health is Health.WARNING
    critical = domain.evaluate_health(inputs(state=ItemState.RESYNCHRONIZING, error="gap"))
    assert critical.health is Health.CRITICAL and "resync required: gap" in critical.reasons[0]
    assert domain.evaluate_health(inputs(state=ItemState.ERROR)).health is Health.CRITICAL


def test_rpo_is_now_minus_source_time_of_latest_point() -> None:
    assert domain.rpo_seconds(NOW, None) is None
    assert domain.rpo_seconds(NOW, NOW - timedelta(seconds=7)) == 7


def test_actions_are_refused_in_the_wrong_state() -> None:
    domain.check_action(R, "pause")
    with pytest.raises(domain.ReplicationError, match="cannot resume an item in state"):
        domain.check_action(R, "resume")


def test_which_states_can_fail_over() -> None:
    assert domain.failover_refusal(ItemState.SYNCED, True) is None
    for state in (R, ItemState.SUSPENDED, ItemState.RESYNCHRONIZING, ItemState.ERROR):
        assert domain.failover_refusal(state, True) is None
    assert "no recovery point" in (domain.failover_refusal(R, False) or "")
    refused = domain.failover_refusal(ItemState.WAITING_FOR_INITIAL, True) or ""
    assert "waiting_for_initial_replication" in refused and "synced" in refused


def test_the_recovery_point_to_fail_over_to() -> None:
    points = [domain.PointRef(3, True), domain.PointRef(5, False), domain.PointRef(4, False)]
    assert domain.choose_point(points, "latest", None) == 5
    assert domain.choose_point(points, "latest_app_consistent", None) == 3
    assert domain.choose_point(points, "chosen", 4) == 4
    with pytest.raises(domain.ReplicationError, match=r"2 is not retained.*3, 4, 5"):
        domain.choose_point(points, "chosen", 2)
    with pytest.raises(domain.ReplicationError, match="needs a cycle_seq"):
        domain.choose_point(points, "chosen", None)
    with pytest.raises(domain.ReplicationError, match="no app-consistent"):
        domain.choose_point(points[1:], "latest_app_consistent", None)
    with pytest.raises(domain.ReplicationError, match="no retained"):
        domain.choose_point([], "latest", None)


def test_a_drill_over_the_replica_takes_the_latest_point_the_replica_holds() -> None:
    points = [domain.PointRef(s, s == 3) for s in (3, 4, 5, 6)]
    assert domain.choose_point(points, "latest", None, held=4) == 4
    assert domain.choose_point(points, "latest", None, held=9) == 6
    assert domain.choose_point(points, "latest_app_consistent", None, held=4) == 3
    # the replica holds no qualifying point yet: chosen among all (the host is waited for)
    assert domain.choose_point(points, "latest", None, held=2) == 6
    later_app = [domain.PointRef(3, False), domain.PointRef(5, True)]
    assert domain.choose_point(later_app, "latest_app_consistent", None, held=4) == 5
    # a chosen point stays the chosen one
    assert domain.choose_point(points, "chosen", 6, held=4) == 6


def test_rpo_threshold_is_two_intervals_at_least_30_s() -> None:
    assert domain.rpo_threshold_seconds(1) == 30
    assert domain.rpo_threshold_seconds(300) == 600


def test_a_storage_failure_is_critical_with_cause_and_recommendation() -> None:
    full = domain.storage_fault(OSError(errno.ENOSPC, "No space left on device"))
    assert full is not None
    assert "No space left on device" in full
    assert "cause: the replica store's filesystem is full" in full
    assert "recommendation:" in full
    assert domain.storage_fault(OSError(errno.ECONNREFUSED, "refused")) is None
    verdict = domain.evaluate_health(inputs(storage_fault=full))
    assert verdict.health is Health.CRITICAL and verdict.reasons == (full,)


def test_a_cycles_disks_must_be_the_items_known_disks_within_bounds() -> None:
    known = [{"disk_id": "d0", "size_bytes": 1 << 20}, {"disk_id": "d1", "size_bytes": 2 << 20}]

    def disk(disk_id: str, size: int, block: int = 65536) -> dict[str, int | str]:
        return {"disk_id": disk_id, "size_bytes": size, "block_size": block}

    def problem(*disks: dict[str, int | str]) -> str | None:
        found = domain.geometry_problem(known, list(disks), 4 << 20, 1 << 20)
        return None if found is None else found[0]

    assert problem(disk("d0", 1 << 20), disk("d1", 2 << 20)) is None
    assert problem(disk("d1", 2 << 20)) is None
    assert problem(disk("d9", 1 << 20)) == "unknown_disk"
    assert problem(disk("d0", 3 << 20)) == "disk_size_mismatch"
    assert problem(disk("d0", 64 << 40)) == "disk_too_large"
    assert problem(disk("d0", 1 << 20, 4 << 20)) == "bad_geometry"
    assert problem(disk("d0", 1 << 20), disk("d0", 1 << 20)) == "bad_geometry"


# ------------------------------------------------------------------ enable prerequisites


def test_enable_allowed_by_a_passing_verdict() -> None:
    domain.check_prerequisites("vm-1", domain.PrerequisiteVerdict(ok=True))


def test_enable_waits_for_an_unknown_verdict() -> None:
    with pytest.raises(domain.VerdictPending, match="has not reached the replication service"):
        domain.check_prerequisites("vm-1", None)


def test_enable_refused_naming_every_failed_check() -> None:
    verdict = domain.PrerequisiteVerdict(
        ok=False,
        failed=(
            domain.FailedCheck("no_encrypted_disk", "encrypted disks are not supported: os"),
            domain.FailedCheck("not_protected", "the VM is already protected"),
        ),
    )
    with pytest.raises(domain.ReplicationError) as refused:
        domain.check_prerequisites("vm-1", verdict)
    assert refused.value.status == 409
    assert refused.value.message == (
        "prerequisites not met for VM vm-1: no_encrypted_disk: encrypted disks are not "
        "supported: os; not_protected: the VM is already protected"
    )


def test_enable_waits_when_only_a_stale_protection_fails() -> None:
    """This service protects the VM no more; the policy service has not seen that yet."""
    verdict = domain.PrerequisiteVerdict(
        ok=False, failed=(domain.FailedCheck("not_protected", "the VM is already protected"),)
    )
    with pytest.raises(domain.VerdictPending, match="still counts VM vm-1 as protected"):
        domain.check_prerequisites("vm-1", verdict)
