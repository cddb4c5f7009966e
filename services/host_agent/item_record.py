"""An item's `item.json`: the enable command's settings and the replication's progress, with
its `ReplicationPhase` and the moves between phases that `PHASE_TRANSITIONS` allows."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, model_validator

from services.host_agent.tracking import JournalState
from shared.schemas.agent import DiskSpec, InitialReplication
from shared.schemas.replication import Compression


class ReplicationPhase(StrEnum):
    """Where an item's replication stands (persisted in `item.json`)."""

    INITIAL = "initial"  # no full copy shipped yet (initial replication, or seeded: the resync)
    REPLICATING = "replicating"  # a delta cycle per copy interval
    RESYNC_REQUIRED = "resync_required"  # the journal was lost: nothing ships until a resync
    SYNCED = "synced"  # the final cycle of a shutdown is out: nothing ships until the VM runs


# The moves allowed, and what makes them: a full cycle (initial or resync) shipped -> REPLICATING
# from anywhere; a fault -> RESYNC_REQUIRED from anywhere; the final cycle shipped (only while
# replicating) -> SYNCED; the VM running again after its final cycle -> REPLICATING.
PHASE_TRANSITIONS: dict[ReplicationPhase, frozenset[ReplicationPhase]] = {
    ReplicationPhase.INITIAL: frozenset(
        {ReplicationPhase.REPLICATING, ReplicationPhase.RESYNC_REQUIRED}
    ),
    ReplicationPhase.REPLICATING: frozenset(
        {ReplicationPhase.REPLICATING, ReplicationPhase.RESYNC_REQUIRED, ReplicationPhase.SYNCED}
    ),
    ReplicationPhase.RESYNC_REQUIRED: frozenset(
        {ReplicationPhase.REPLICATING, ReplicationPhase.RESYNC_REQUIRED}
    ),
    ReplicationPhase.SYNCED: frozenset(
        {ReplicationPhase.REPLICATING, ReplicationPhase.RESYNC_REQUIRED, ReplicationPhase.SYNCED}
    ),
}


class IllegalTransition(Exception):
    """A phase change `PHASE_TRANSITIONS` does not allow (a bug, not an input error)."""


def _phase_of_flags(data: dict[str, Any]) -> ReplicationPhase:
    """The phase of an `item.json` written before phases (flags `initial_done`,
    `needs_resync`, `final_shipped`)."""
    if data.get("needs_resync"):
        return ReplicationPhase.RESYNC_REQUIRED
    if not data.get("initial_done"):
        return ReplicationPhase.INITIAL
    if data.get("final_shipped"):
        return ReplicationPhase.SYNCED
    return ReplicationPhase.REPLICATING


class ItemRecord(BaseModel):
    """`item.json`: the enable command's settings and the item's progress."""

    item_id: uuid.UUID
    vm_id: str
    vm_name: str
    disks: list[DiskSpec]
    copy_interval_seconds: int
    compression: Compression
    app_consistent_interval_seconds: int = 0
    initial_replication: InitialReplication = InitialReplication.ONLINE_NOW
    scheduled_at: datetime | None = None
    export_path: str | None = None
    next_seq: int = Field(ge=1)
    phase: ReplicationPhase = ReplicationPhase.INITIAL
    paused: bool = False  # the operator's hold: no deltas ship, whatever the phase
    fault: str = ""  # why the phase is RESYNC_REQUIRED
    last_app_consistent_at: datetime | None = None
    last_cycle_seq: int = 0
    last_cycle_kind: str = ""
    last_cycle_at: datetime | None = None
    roots: dict[str, str] = Field(default_factory=dict)
    journals: dict[str, JournalState] = Field(default_factory=dict)
    closed_stats: dict[str, tuple[int, int]] = Field(
        default_factory=dict, description="disk key -> (size, mtime_ns) at a clean stop"
    )

    @model_validator(mode="before")
    @classmethod
    def _from_flags(cls, data: Any) -> Any:
        if isinstance(data, dict) and "phase" not in data and "initial_done" in data:
            data = {**data, "phase": _phase_of_flags(data)}
        return data

    def move_to(self, phase: ReplicationPhase) -> None:
        """Change the phase; `IllegalTransition` if `PHASE_TRANSITIONS` does not allow it."""
        if phase not in PHASE_TRANSITIONS[self.phase]:
            raise IllegalTransition(f"item {self.item_id}: {self.phase} -> {phase}")
        self.phase = phase

    @property
    def journaling(self) -> bool:
        """Writes to the disks are journaled for the next delta (a full copy is out and no
        fault dropped the journal)."""
        return self.phase in (ReplicationPhase.REPLICATING, ReplicationPhase.SYNCED)

    @property
    def initial_done(self) -> bool:
        """A full copy reached the replica once (the first cycle shipped is always full)."""
        return self.last_cycle_seq > 0


def disk_key(index: int) -> str:
    return f"d{index}"


def image_stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns
