"""An item's failover state as the rules read it, and the checks each operation makes of the
item before its job starts."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Protocol

from services.failover.domain.errors import FailoverRefused
from shared.schemas.failover import MaterialisedDisk

READY_STATES = frozenset({"replicating", "synced"})


class ItemFailoverState(StrEnum):
    """This service's view of an item (beside the replication service's item state)."""

    PROTECTED = "protected"
    TESTING = "testing"
    FAILOVER_IN_PROGRESS = "failover_in_progress"
    FAILOVER_FAILED = "failover_failed"
    FAILED_OVER = "failed_over"
    COMMITTED = "committed"
    REVERSE_REPLICATING = "reverse_replicating"


@dataclass(frozen=True)
class ItemRow:
    """A protected item as this service knows it (from the replication service's events)."""

    item_id: uuid.UUID
    vault_id: uuid.UUID
    vm_id: str
    vm_name: str
    source_cloud_id: str
    target_cloud_id: str
    pairing_id: uuid.UUID
    source_agent_id: uuid.UUID
    state: str
    health: str
    active: bool
    latest_seq: int | None
    latest_source_time: datetime | None
    latest_app_seq: int | None


class FailoverView(Protocol):
    """What a refusal reads of an item's failover state (services/failover/item_failover.py);
    None: nothing done to the item yet."""

    @property
    def state(self) -> ItemFailoverState: ...

    @property
    def test(self) -> object | None: ...


def _state(view: FailoverView | None) -> ItemFailoverState:
    return view.state if view is not None else ItemFailoverState.PROTECTED


def check_test(item: ItemRow, view: FailoverView | None) -> None:
    if _state(view) is ItemFailoverState.TESTING:
        raise FailoverRefused(
            f"a test failover of {item.vm_name} is already running: clean it up first"
        )
    if item.latest_seq is None:
        raise FailoverRefused(
            f"{item.vm_name} has no recovery point yet: wait for initial replication"
        )
    _not_failed_over(item, view)


def check_planned(item: ItemRow, view: FailoverView | None) -> None:
    if item.state not in READY_STATES or item.latest_seq is None:
        raise FailoverRefused(
            f"{item.vm_name} has not finished initial replication (state "
            f"{item.state}): a planned failover needs every item past initial "
            "replication"
        )
    _not_failed_over(item, view)


def check_unplanned(item: ItemRow, view: FailoverView | None) -> None:
    if item.latest_seq is None:
        raise FailoverRefused(f"{item.vm_name} has no recovery point to fail over to")
    _not_failed_over(item, view)


def _not_failed_over(item: ItemRow, view: FailoverView | None) -> None:
    state = _state(view)
    if state in (
        ItemFailoverState.FAILED_OVER,
        ItemFailoverState.COMMITTED,
        ItemFailoverState.REVERSE_REPLICATING,
    ):
        raise FailoverRefused(f"{item.vm_name} is already failed over ({state.value})")


def check_cleanup(item: ItemRow, view: FailoverView | None) -> None:
    if view is None or view.state is not ItemFailoverState.TESTING or not view.test:
        raise FailoverRefused(f"{item.vm_name} has no test failover to clean up")


def check_commit(item: ItemRow, view: FailoverView | None) -> None:
    state = _state(view)
    if state is not ItemFailoverState.FAILED_OVER:
        raise FailoverRefused(
            f"{item.vm_name} is not failed over (it is {state.value}): commit comes after a "
            "planned or unplanned failover"
        )


def check_reverse(item: ItemRow, view: FailoverView | None) -> None:
    state = _state(view)
    if state not in (ItemFailoverState.FAILED_OVER, ItemFailoverState.COMMITTED):
        raise FailoverRefused(
            f"{item.vm_name} is not failed over (it is "
            f"{state.value}): reverse replication comes after "
            "a failover"
        )


def seed_disks(
    recovery_disks: Sequence[MaterialisedDisk],
    old_primary_disks: Mapping[str, str],
    exists: AbstractSet[str],
    force_full_resync: bool,
) -> list[dict[str, str]]:
    """The old primary's disk images that seed reverse replication (only differing blocks are
    sent then). Refused when one is gone, unless the operator forces a full resync."""
    seeds = []
    for disk in recovery_disks:
        path = old_primary_disks.get(disk.disk_id)
        if path is None or path not in exists:
            if force_full_resync:
                return []
            raise FailoverRefused("old primary unreachable: pass force_full_resync")
        seeds.append({"disk_id": disk.disk_id, "path": path})
    return [] if force_full_resync else seeds
