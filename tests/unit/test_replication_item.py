"""The protected item aggregate: the delta protocol's and the state machine's rules, the fields
each step changes and the events and agent commands it records, without a database."""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.replication.domain import CycleVerdict, ReplicationError
from services.replication.item import HASHES_PER_CHUNK, FeedRange, ItemDisk, ProtectedItem
from shared.schemas import agent as cmd
from shared.schemas import replication as ev
from shared.schemas.replication import CycleKind, Health, ItemState

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
ROOT = "ab" * 32


def new_item(**overrides: Any) -> ProtectedItem:
    values: dict[str, Any] = {
        "item_id": uuid.uuid4(),
        "vault_id": uuid.uuid4(),
        "vm_id": "vm-1",
        "vm_name": "web01",
        "pairing_id": uuid.uuid4(),
        "policy_id": uuid.uuid4(),
        "source_agent_id": uuid.uuid4(),
        "recovery_agent_id": uuid.uuid4(),
        "source_site": "primary",
        "target_site": "recovery",
        "target_cloud_id": "cloud-b",
        "disks": [ItemDisk("d0", 1 << 20, "/vms/web01/d0.img")],
        "copy_interval_seconds": 30,
        "state": ItemState.REPLICATING,
        "last_committed_seq": 5,
        "protected_since": NOW - timedelta(hours=1),
    }
    values.update(overrides)
    return ProtectedItem(**values)


def completed(seq: int, kind: CycleKind = CycleKind.DELTA) -> ev.CycleCompleted:
    return ev.CycleCompleted(
        item_id=uuid.uuid4(),
        cycle_seq=seq,
        kind=kind,
        source_time=NOW - timedelta(seconds=3),
        app_consistent=False,
        batches=1,
        blocks=2,
        disks=[ev.DiskRoot(disk_id="d0", size_bytes=2 << 20, merkle_root=ROOT)],
    )


def commit(item: ProtectedItem, seq: int, kind: CycleKind = CycleKind.DELTA) -> None:
    item.commit_point(
        completed(seq, kind),
        geometry={"d0": {"disk_id": "d0", "size_bytes": 2 << 20, "block_size": 4096}},
        changed_blocks=2,
        bytes_stored=8192,
        now=NOW,
        feed=FeedRange(3, 10, 11),
        keep_from=2,
    )


def types(item: ProtectedItem) -> list[type]:
    return [type(p.payload) for p in item.pending]


def no_backoff(retries: int) -> float:
    return 60.0 * retries


# ------------------------------------------------------------ cycle sequencing


def test_a_loaded_item_has_nothing_to_save() -> None:
    item = new_item()
    assert item.changed == set() and item.pending == []
    assert item.changed_fields() == {}


def test_the_next_cycle_is_accepted_without_changing_a_replicating_item() -> None:
    item = new_item()
    assert item.start_cycle(6, CycleKind.DELTA, None) is CycleVerdict.ACCEPT
    assert item.pending == [] and item.changed == set()


def test_a_replayed_cycle_is_refused_and_changes_nothing() -> None:
    item = new_item()
    assert item.start_cycle(5, CycleKind.DELTA, None) is CycleVerdict.REPLAY
    assert item.start_cycle(1, CycleKind.DELTA, None) is CycleVerdict.REPLAY
    assert item.pending == [] and item.changed == set()


def test_a_gap_sends_the_item_to_resync_with_the_reason() -> None:
    item = new_item()
    assert item.start_cycle(8, CycleKind.DELTA, None) is CycleVerdict.GAP
    reason = item.gap_reason(8, "a record of cycle 6 was dead-lettered")
    assert reason == (
        "sequence gap: expected cycle 6, got 8 (after a record of cycle 6 was dead-lettered)"
    )
    plan = item.require_resync(reason, now=NOW, backoff=no_backoff)
    assert plan.ask_now and plan.attempt == 1 and plan.delay_seconds == 0
    assert item.state is ItemState.WAITING_TO_START_RESYNC and item.health is Health.CRITICAL
    assert item.error == reason and item.resync_not_before == NOW
    changed = item.pending[-1].payload
    assert isinstance(changed, ev.ItemStateChanged) and changed.reason == reason
    assert changed.previous_state is ItemState.REPLICATING


def test_a_cycle_after_an_unfinished_one_replaces_it() -> None:
    item = new_item()
    assert item.start_cycle(7, CycleKind.DELTA, 6) is CycleVerdict.ACCEPT


@pytest.mark.parametrize(
    "state", [ItemState.SUSPENDED, ItemState.FAILED_OVER, ItemState.NOT_ENABLED]
)
def test_cycles_are_ignored_while_paused_failed_over_or_disabled(state: ItemState) -> None:
    item = new_item(state=state)
    assert item.start_cycle(6, CycleKind.DELTA, None) is CycleVerdict.IGNORE
    assert item.pending == [] and item.changed == set()


def test_during_a_resync_only_the_resync_cycle_is_taken() -> None:
    item = new_item(state=ItemState.RESYNCHRONIZING, resync_seq=6, health=Health.CRITICAL)
    assert item.start_cycle(6, CycleKind.DELTA, None) is CycleVerdict.IGNORE
    assert item.start_cycle(7, CycleKind.RESYNC, None) is CycleVerdict.IGNORE
    assert item.start_cycle(6, CycleKind.RESYNC, None) is CycleVerdict.ACCEPT


def test_the_first_initial_cycle_starts_initial_replication() -> None:
    item = new_item(state=ItemState.WAITING_FOR_INITIAL, last_committed_seq=None)
    assert item.start_cycle(1, CycleKind.DELTA, None) is CycleVerdict.IGNORE
    assert item.pending == []
    assert item.start_cycle(1, CycleKind.INITIAL, None) is CycleVerdict.ACCEPT
    assert item.state is ItemState.INITIAL_REPLICATION
    assert item.changed_fields() == {
        "state": ItemState.INITIAL_REPLICATION.value,
        "health": "Normal",
    }
    (pending,) = item.pending
    assert isinstance(pending.payload, ev.ItemStateChanged)
    assert pending.payload.reason == "initial cycle" and pending.key == str(item.item_id)


def test_a_delta_before_any_full_copy_is_a_gap() -> None:
    item = new_item(state=ItemState.INITIAL_REPLICATION, last_committed_seq=None)
    assert item.start_cycle(1, CycleKind.DELTA, None) is CycleVerdict.GAP


# ------------------------------------------------------------ committing a point


def test_the_first_point_ends_initial_replication() -> None:
    item = new_item(state=ItemState.INITIAL_REPLICATION, last_committed_seq=None)
    commit(item, 1, CycleKind.INITIAL)
    assert item.state is ItemState.REPLICATING and item.last_committed_seq == 1
    assert item.initial_done_at == NOW and item.last_cycle_at == NOW
    assert item.disks == [ItemDisk("d0", 2 << 20, "/vms/web01/d0.img")]  # the cycle's size
    assert types(item) == [
        ev.RecoveryPointCreated,
        ev.ItemStateChanged,
        cmd.ReplicaPointApplyRequested,
    ]
    point, state, apply = (p.payload for p in item.pending)
    assert isinstance(point, ev.RecoveryPointCreated)
    assert point.point_type is ev.RecoveryPointType.CRASH_CONSISTENT and point.cycle_seq == 1
    assert isinstance(state, ev.ItemStateChanged) and state.reason == "recovery point 1"
    assert isinstance(apply, cmd.ReplicaPointApplyRequested)
    assert (apply.partition, apply.first_offset, apply.last_offset) == (3, 10, 11)
    assert apply.keep_from == 2 and apply.disks[0].block_size == 4096
    assert item.pending[2].key == str(item.recovery_agent_id)
    saved = item.changed_fields()
    assert saved["last_committed_seq"] == 1 and saved["state"] == "replicating"
    assert saved["disks"] == [{"disk_id": "d0", "path": "/vms/web01/d0.img", "size_bytes": 2 << 20}]


def test_a_later_point_keeps_when_initial_replication_ended() -> None:
    done = NOW - timedelta(days=1)
    item = new_item(initial_done_at=done)
    commit(item, 6)
    assert item.initial_done_at == done
    assert types(item) == [ev.RecoveryPointCreated, cmd.ReplicaPointApplyRequested]


def test_the_resync_point_ends_the_resync_and_clears_critical_health() -> None:
    item = new_item(
        state=ItemState.RESYNCHRONIZING,
        health=Health.CRITICAL,
        error="sequence gap",
        resync_seq=6,
        resync_id=uuid.uuid4(),
        resync_attempts=2,
    )
    commit(item, 6, CycleKind.RESYNC)
    assert item.state is ItemState.REPLICATING and item.health is Health.NORMAL
    assert (item.error, item.resync_seq, item.resync_id, item.resync_attempts) == (
        None,
        None,
        None,
        0,
    )
    state = item.pending[1].payload
    assert isinstance(state, ev.ItemStateChanged)
    assert state.previous_state is ItemState.RESYNCHRONIZING and state.health is Health.NORMAL


def test_a_point_leaves_a_warning_to_the_health_evaluation() -> None:
    item = new_item(health=Health.WARNING)
    commit(item, 6)
    assert item.health is Health.WARNING


def test_a_final_point_leaves_the_item_synced_and_a_paused_one_stays_paused() -> None:
    final = new_item()
    commit(final, 6, CycleKind.FINAL)
    assert final.state is ItemState.SYNCED
    paused = new_item(state=ItemState.SUSPENDED, paused=True)
    commit(paused, 6)
    assert paused.state is ItemState.SUSPENDED


def test_without_a_recovery_host_no_replica_command_is_recorded() -> None:
    item = new_item(recovery_agent_id=None)
    commit(item, 6)
    assert cmd.ReplicaPointApplyRequested not in types(item)


# ------------------------------------------------------------ resync


def test_a_resync_that_fails_again_waits_for_its_backoff() -> None:
    item = new_item(state=ItemState.RESYNCHRONIZING, resync_attempts=1, health=Health.CRITICAL)
    plan = item.require_resync("cycle 6: truncated", now=NOW, backoff=no_backoff)
    assert not plan.ask_now and plan.attempt == 2 and plan.delay_seconds == 60
    assert item.resync_not_before == NOW + timedelta(seconds=60)
    assert item.state is ItemState.WAITING_TO_START_RESYNC


def test_the_resync_request_sends_the_replica_hashes_in_chunks() -> None:
    item = new_item(state=ItemState.WAITING_TO_START_RESYNC, error="sequence gap")
    hashes = [bytes([i % 256]) * 32 for i in range(HASHES_PER_CHUNK + 1)]
    resync_id = uuid.uuid4()
    item.request_resync({"d0": hashes}, resync_id)
    commands = [p.payload for p in item.pending if isinstance(p.payload, cmd.ResyncRequested)]
    assert [(c.chunk_no, c.chunks, c.first_index) for c in commands] == [
        (0, 2, 0),
        (1, 2, HASHES_PER_CHUNK),
    ]
    assert all(c.cycle_seq == 6 and c.size_bytes == 1 << 20 for c in commands)
    assert base64.b64decode(commands[1].leaf_hashes) == hashes[-1]
    assert all(p.key == str(item.source_agent_id) for p in item.pending[:2])
    assert item.state is ItemState.RESYNCHRONIZING
    assert (item.resync_seq, item.resync_id, item.resync_not_before) == (6, resync_id, None)
    state = item.pending[-1].payload
    assert isinstance(state, ev.ItemStateChanged) and state.reason == "sequence gap"


def test_a_resync_before_any_point_asks_for_every_block() -> None:
    item = new_item(state=ItemState.WAITING_TO_START_RESYNC, last_committed_seq=None)
    item.request_resync({"d0": [b"x" * 32]}, uuid.uuid4())
    (request,) = [p.payload for p in item.pending if isinstance(p.payload, cmd.ResyncRequested)]
    assert request.size_bytes == 0 and request.leaf_hashes == "" and request.cycle_seq == 1


def test_an_agent_fault_resyncs_unless_a_resync_runs() -> None:
    assert new_item().agent_fault(True)
    assert not new_item().agent_fault(False)
    assert not new_item(state=ItemState.RESYNCHRONIZING).agent_fault(True)


# ------------------------------------------------------------ operator actions


def test_pause_commands_the_agent_then_suspends() -> None:
    item = new_item()
    item.pause()
    assert item.state is ItemState.SUSPENDED and item.paused
    assert types(item) == [cmd.ReplicationPauseRequested, ev.ItemStateChanged]
    assert item.pending[0].key == str(item.source_agent_id)
    assert set(item.changed_fields()) == {"state", "health", "paused"}


def test_resume_goes_back_to_replicating_or_to_waiting_for_the_initial_copy() -> None:
    item = new_item(state=ItemState.SUSPENDED, paused=True)
    item.resume()
    assert item.state is ItemState.REPLICATING and not item.paused
    fresh = new_item(state=ItemState.SUSPENDED, paused=True, last_committed_seq=None)
    fresh.resume()
    assert fresh.state is ItemState.WAITING_FOR_INITIAL


@pytest.mark.parametrize(
    ("state", "action"),
    [
        (ItemState.RESYNCHRONIZING, "pause"),
        (ItemState.SUSPENDED, "pause"),
        (ItemState.REPLICATING, "resume"),
        (ItemState.WAITING_FOR_INITIAL, "resync"),
        (ItemState.FAILED_OVER, "resync"),
    ],
)
def test_actions_are_refused_in_the_wrong_state(state: ItemState, action: str) -> None:
    item = new_item(state=state)
    run = {"pause": item.pause, "resume": item.resume, "resync": item.check_resync_allowed}
    with pytest.raises(ReplicationError, match=f"cannot {action} an item in state"):
        run[action]()
    assert item.pending == [] and item.changed == set() and item.state is state


def test_disable_stops_the_agent_drops_the_replica_and_says_so() -> None:
    item = new_item()
    item.disable(delete_replica=True)
    assert not item.active and item.state is ItemState.NOT_ENABLED
    assert types(item) == [
        cmd.ReplicationDisableRequested,
        cmd.ReplicaDeleteRequested,
        ev.ItemStateChanged,
        ev.ProtectionDisabled,
    ]
    assert item.pending[1].key == str(item.recovery_agent_id)
    gone = item.pending[-1].payload
    assert isinstance(gone, ev.ProtectionDisabled) and gone.replica_deleted


def test_disable_keeping_the_replica_sends_no_delete() -> None:
    item = new_item()
    item.disable(delete_replica=False)
    assert cmd.ReplicaDeleteRequested not in types(item)


# ------------------------------------------------------------ other transitions


def test_a_state_change_that_changes_nothing_records_no_event() -> None:
    item = new_item()
    item.change_state(ItemState.REPLICATING, reason="same")
    assert item.pending == []
    item.change_state(ItemState.REPLICATING, reason="worse", health=Health.WARNING)
    assert types(item) == [ev.ItemStateChanged]


def test_an_enable_the_agent_refused_is_a_critical_error() -> None:
    item = new_item(state=ItemState.WAITING_FOR_INITIAL, last_committed_seq=None)
    item.enable_failed("disk image not found")
    assert item.state is ItemState.ERROR and item.health is Health.CRITICAL
    assert item.error is not None and "disk image not found" in item.error


def test_the_enable_command_starts_after_the_last_point() -> None:
    item = new_item(last_committed_seq=4)
    item.request_enable({"copy_frequency_seconds": 30, "compression": True})
    (pending,) = item.pending
    enable = pending.payload
    assert isinstance(enable, cmd.ReplicationEnableRequested)
    assert enable.next_cycle_seq == 5 and enable.command_id == item.enable_command_id
    assert enable.compression is ev.Compression.ZLIB and enable.disks[0].path.endswith("d0.img")


def test_failover_stops_the_source_and_clears_the_resync() -> None:
    item = new_item(state=ItemState.RESYNCHRONIZING, resync_seq=6, health=Health.CRITICAL)
    assert item.failover_refusal() is None
    item.fail_over("planned failover to recovery point 5")
    assert item.state is ItemState.FAILED_OVER and item.health is Health.NORMAL
    assert item.resync_seq is None
    assert types(item) == [cmd.ReplicationDisableRequested, ev.ItemStateChanged]
    assert new_item(last_committed_seq=None).failover_refusal() is not None


def test_the_replica_tracks_the_latest_point_whose_roots_match() -> None:
    item = new_item(replica_seq=7, replica_error="old")
    item.replica_applied(6, True)
    assert (item.replica_seq, item.replica_error) == (7, None)
    item.replica_applied(8, False)
    assert item.replica_seq == 7 and item.replica_error is not None
    assert "point 8" in item.replica_error


# ------------------------------------------------------------ a replica that missed points


def test_a_replica_that_missed_points_catches_up_by_a_resync_against_its_leaves() -> None:
    item = new_item(last_committed_seq=20, replica_seq=12)
    assert not item.replica_behind(11, "stale answer")  # it is known to hold 12
    assert item.replica_follows is None and item.replica_error == "stale answer"
    assert item.replica_behind(12, "point 14 cannot follow")
    assert not item.replica_behind(12, "point 15 cannot follow")  # under way already
    assert item.replica_follows == 12
    item.ask_replica_leaves(request := uuid.uuid4())
    asked = next(p.payload for p in item.pending if p.key == str(item.recovery_agent_id))
    assert isinstance(asked, cmd.ReplicaLeavesRequested)
    assert (asked.agent_id, asked.request_id) == (item.recovery_agent_id, request)
    assert item.state is ItemState.RESYNCHRONIZING and item.health is Health.CRITICAL
    assert not item.replica_leaves_answered(uuid.uuid4())  # another request's answer
    assert item.replica_leaves_answered(request) and item.replica_catchup_id is None
    item.request_resync({"d0": [b"\x01" * 32]}, uuid.uuid4())
    commit(item, 21, CycleKind.RESYNC)
    apply = [p.payload for p in item.pending if p.key == str(item.recovery_agent_id)][-1]
    assert isinstance(apply, cmd.ReplicaPointApplyRequested)
    assert (apply.cycle_seq, apply.follows) == (21, 12)
    assert item.replica_applied(21, True) == list(range(13, 21))  # never on the replica
    assert (item.replica_seq, item.replica_follows, item.replica_error) == (21, None, None)
    commit(item, 22)
    apply = [p.payload for p in item.pending if p.key == str(item.recovery_agent_id)][-1]
    assert isinstance(apply, cmd.ReplicaPointApplyRequested) and apply.follows is None
    assert item.replica_applied(22, True) == []


def test_a_replica_catches_up_only_while_the_item_replicates() -> None:
    item = new_item(state=ItemState.FAILED_OVER, replica_seq=3)
    assert not item.replica_behind(3, "cannot follow") and item.replica_follows is None
    item = new_item(recovery_agent_id=None)
    assert not item.replica_behind(3, "cannot follow")


def test_a_catch_up_point_must_follow_an_older_point() -> None:
    disk = cmd.ReplicaDisk(disk_id="d0", size_bytes=4096, block_size=4096, merkle_root=ROOT)
    fields: dict[str, Any] = {
        "command_id": uuid.uuid4(),
        "agent_id": uuid.uuid4(),
        "item_id": uuid.uuid4(),
        "cycle_seq": 9,
        "disks": [disk],
        "keep_from": 1,
    }
    assert cmd.ReplicaPointApplyRequested(**fields, follows=0).follows == 0
    with pytest.raises(ValueError, match="cannot follow"):
        cmd.ReplicaPointApplyRequested(**fields, follows=9)


def test_a_replica_its_host_lost_catches_up_from_nothing_but_a_stale_answer_does_not() -> None:
    item = new_item(last_committed_seq=20, replica_seq=12)
    assert not item.replica_behind(0, "answered again", asked=11)  # before what it holds since
    assert item.replica_follows is None
    assert item.replica_behind(0, "point 13 cannot follow", asked=13)  # lost: from nothing
    assert item.replica_follows == 0
    item.request_resync({}, uuid.uuid4())  # every block (no leaves to compare with)
    commit(item, 21, CycleKind.RESYNC)
    apply = [p.payload for p in item.pending if p.key == str(item.recovery_agent_id)][-1]
    assert isinstance(apply, cmd.ReplicaPointApplyRequested) and apply.follows == 0
    assert item.replica_applied(21, True) == list(range(1, 21))
