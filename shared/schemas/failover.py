"""Failover contract.

Jobs (`failover.events.v1`, keyed by job id): every long operation is a job of tasks; each
change is published as `JobChanged` / `TaskChanged`.

Requests from the failover service to the replication service (`failover.events.v1`, keyed by
protected item id) and the replication service's answers (`replication.events.v1`):
materialise a recovery point into a recovery host's storage folder, mark an item failed over,
commit a failover, start reverse replication.

Commands to recovery-site host agents are in `shared/schemas/agent.py` (`VmCreateRequested`,
`VmDeleteRequested`, `VmPowerRequested`).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import Field

from shared import topics
from shared.schemas.envelope import EventPayload
from shared.schemas.registry import event_type


class JobState(StrEnum):
    NOT_STARTED = "not_started"
    IN_PROGRESS = "in_progress"
    WAITING_FOR_INPUT = "waiting_for_input"  # a manual action awaits an operator's approval
    SUCCEEDED = "succeeded"
    COMPLETED_WITH_ERRORS = "completed_with_errors"  # unplanned runs go on past errors
    FAILED = "failed"


class FailoverKind(StrEnum):
    TEST = "test"
    PLANNED = "planned"
    UNPLANNED = "unplanned"


class PointChoice(StrEnum):
    LATEST = "latest"
    LATEST_APP_CONSISTENT = "latest_app_consistent"
    CHOSEN = "chosen"  # a given cycle_seq


@event_type("JobChanged", topic=topics.FAILOVER_EVENTS)
class JobChanged(EventPayload):
    """A job was created or changed state (with its progress and error, if any)."""

    job_id: uuid.UUID
    operation: str
    target: str = Field(description="What it runs on: a protected item id or a recovery plan id.")
    state: JobState
    progress: int = Field(ge=0, le=100)
    error: str | None = None
    cause: str | None = None
    recommendation: str | None = None
    restarts: int = Field(default=0, ge=0)


@event_type("TaskChanged", topic=topics.FAILOVER_EVENTS)
class TaskChanged(EventPayload):
    """A task of a job changed state."""

    job_id: uuid.UUID
    task_no: int = Field(ge=0)
    name: str
    state: JobState
    error: str | None = None
    detail: dict[str, Any] = Field(default_factory=dict)


# ------------------------------------------------------------ failover -> replication


@event_type("RecoveryPointMaterialiseRequested", topic=topics.FAILOVER_EVENTS)
class RecoveryPointMaterialiseRequested(EventPayload):
    """Write the disks of an item's recovery point into `target_dir` (a recovery host's
    storage folder for the VM), one `<disk_id>.vhdx` per disk. Idempotent per request id."""

    request_id: uuid.UUID
    item_id: uuid.UUID
    choice: PointChoice = PointChoice.LATEST
    cycle_seq: int | None = Field(default=None, ge=1)
    target_dir: str = Field(min_length=1, max_length=1024)
    handover: bool = Field(
        default=False,
        description="A failover (planned or unplanned): the recovery host that keeps the "
        "item's replica may hand its images over as the VM's disks (brought to the point, no "
        "copy; the replica is consumed). False: the disks are written as copies.",
    )
    differencing: bool = Field(
        default=False,
        description="A test failover: the recovery host that keeps the item's replica creates "
        "a differencing disk per disk (`<disk_id>.avhdx`) over a frozen view of the point (no "
        "copy; replication goes on; deleting the VM discards them). Where the host keeps no "
        "replica of the item, the disks are written as copies.",
    )


@event_type("ItemFailedOver", topic=topics.FAILOVER_EVENTS)
class ItemFailedOver(EventPayload):
    """The item's VM now runs at the recovery site from point `cycle_seq`: replication stops
    taking cycles for it (state failed_over) and tells the source agent to stop replicating."""

    item_id: uuid.UUID
    kind: FailoverKind
    cycle_seq: int = Field(ge=1)
    recovery_vm_name: str
    recovery_agent_id: uuid.UUID


@event_type("ItemFailoverCommitted", topic=topics.FAILOVER_EVENTS)
class ItemFailoverCommitted(EventPayload):
    """The failover is final: every recovery point but `cycle_seq` is deleted."""

    item_id: uuid.UUID
    cycle_seq: int = Field(ge=1)


class SeedDisk(EventPayload):
    disk_id: str = Field(description="Disk id at the new source (the recovery VM's disk).")
    path: str = Field(description="The old primary disk image the new replica starts from.")


class ReverseDisk(EventPayload):
    disk_id: str
    path: str = Field(description="Image path on the new source host (recovery site).")
    size_bytes: int = Field(gt=0)


@event_type("ReverseReplicationRequested", topic=topics.FAILOVER_EVENTS)
class ReverseReplicationRequested(EventPayload):
    """Protect the failed-over VM in the other direction: the recovery host becomes the source
    and the old primary site the target. With `seed_disks` (the old primary's disks still
    exist) the new replica starts from them and only differing blocks are sent (resync by
    block hashes); without, `force_full_resync` must be set and everything is copied."""

    request_id: uuid.UUID
    old_item_id: uuid.UUID
    new_item_id: uuid.UUID
    vm_id: str
    vm_name: str
    source_agent_id: uuid.UUID
    source_site: str
    target_site: str
    disks: list[ReverseDisk] = Field(min_length=1, max_length=16)
    seed_disks: list[SeedDisk] = Field(default_factory=list)
    force_full_resync: bool = False


# ------------------------------------------------------------ replication -> failover


class MaterialisedDisk(EventPayload):
    disk_id: str
    path: str
    size_bytes: int
    sha256: str | None = Field(
        default=None,
        description="SHA-256 of the written image; None when the recovery host handed its "
        "replica image over (its Merkle root, checked against the source's, is the proof).",
    )
    merkle_root: str


@event_type("RecoveryPointMaterialised", topic=topics.REPLICATION_EVENTS)
class RecoveryPointMaterialised(EventPayload):
    """Answer to `RecoveryPointMaterialiseRequested`: the disks are written and verified."""

    request_id: uuid.UUID
    item_id: uuid.UUID
    cycle_seq: int
    source_time: datetime
    app_consistent: bool
    disks: list[MaterialisedDisk]


@event_type("RecoveryPointMaterialiseFailed", topic=topics.REPLICATION_EVENTS)
class RecoveryPointMaterialiseFailed(EventPayload):
    """Answer to `RecoveryPointMaterialiseRequested` when it could not be done."""

    request_id: uuid.UUID
    item_id: uuid.UUID
    error: str
