"""Replication contract.

Data plane, `replication.deltas.v1` (signed by the source host agent, keyed by protected item
id so one item's cycles stay ordered in one partition): a delta cycle is `CycleStarted`, then
`BlocksShipped` batches (each message well under Kafka's 1 MiB default; block bytes base64,
zlib-compressed when the policy says so, every block with its SHA-256), then `CycleCompleted`
(sequence number, per-disk Merkle root of the whole disk after the cycle, app-consistent flag).
Initial replication and resync are the same stream (kind `initial` / `resync`).

Service events, `replication.events.v1` (keyed by protected item id): protection, state and
health changes, recovery points.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import AwareDatetime, Field, model_validator

from shared import topics
from shared.schemas.envelope import EventPayload
from shared.schemas.registry import event_type

HEX64 = r"^[0-9a-f]{64}$"
MAX_BLOCKS_PER_BATCH = 64


class CycleKind(StrEnum):
    INITIAL = "initial"
    DELTA = "delta"
    RESYNC = "resync"
    FINAL = "final"  # planned failover: the last delta after the source VM was shut down


class Compression(StrEnum):
    NONE = "none"
    ZLIB = "zlib"


class DiskGeometry(EventPayload):
    disk_id: str = Field(min_length=1, max_length=100)
    size_bytes: int = Field(gt=0, le=64 * 2**40)
    block_size: int = Field(default=65536, ge=4096, le=4 * 2**20)


@event_type("CycleStarted", topic=topics.REPLICATION_DELTAS, signed=True)
class CycleStarted(EventPayload):
    """A delta cycle begins: the disks' geometry at the captured instant."""

    item_id: uuid.UUID
    cycle_seq: int = Field(ge=1)
    kind: CycleKind
    disks: list[DiskGeometry] = Field(min_length=1, max_length=16)
    source_time: AwareDatetime = Field(description="Instant of the source state captured.")
    app_consistent: bool = False


class Block(EventPayload):
    index: int = Field(ge=0)
    sha256: str = Field(pattern=HEX64)
    data: str | None = Field(
        default=None, description="base64 of the block (zlib first if compressed); None if zero"
    )
    zero: bool = Field(default=False, description="All-zero block: no data is sent.")
    compressed: bool | None = Field(
        default=None,
        description=(
            "Whether `data` is zlib-compressed; None (absent): as the batch's `compression`"
            " says. A sender compressing with zlib sends a block that does not shrink raw,"
            " with `compressed: false`."
        ),
    )

    @model_validator(mode="after")
    def _data_or_zero(self) -> Block:
        if self.zero == (self.data is not None):
            raise ValueError("a block has either data or zero=true")
        if self.zero and self.compressed is not None:
            raise ValueError("a zero block has no data to be compressed or not")
        return self


def blocks_signed_view(payload: dict[str, Any]) -> dict[str, Any]:
    """What a `BlocksShipped` signature covers: the payload with each block's `data` left out
    (index, sha256, zero and compressed stay). The bytes are bound to the signed SHA-256: the
    replica verifies every block against it before storing anything, so altered data is
    refused (`block_hash_mismatch`) and hashing ~600 KB of base64 per batch is avoided."""
    blocks = payload.get("blocks")
    if not isinstance(blocks, list):
        return payload
    return {
        **payload,
        "blocks": [
            {k: v for k, v in b.items() if k != "data"} if isinstance(b, dict) else b
            for b in blocks
        ],
    }


@event_type(
    "BlocksShipped",
    topic=topics.REPLICATION_DELTAS,
    signed=True,
    signed_view=blocks_signed_view,
)
class BlocksShipped(EventPayload):
    """One batch of changed blocks of one disk within a cycle. Its signature covers every
    block's index, SHA-256 and flags but not the block data (bound to the signed hash)."""

    item_id: uuid.UUID
    cycle_seq: int = Field(ge=1)
    batch_no: int = Field(ge=0)
    disk_id: str = Field(min_length=1, max_length=100)
    compression: Compression = Compression.NONE
    blocks: list[Block] = Field(min_length=1, max_length=MAX_BLOCKS_PER_BATCH)


class DiskRoot(EventPayload):
    disk_id: str = Field(min_length=1, max_length=100)
    size_bytes: int = Field(gt=0)
    merkle_root: str = Field(pattern=HEX64)


@event_type("CycleCompleted", topic=topics.REPLICATION_DELTAS, signed=True)
class CycleCompleted(EventPayload):
    """The cycle's last message: how many batches and blocks it had, and each disk's Merkle
    root after the cycle. The replica commits a recovery point only if all arrived and its own
    roots match."""

    item_id: uuid.UUID
    cycle_seq: int = Field(ge=1)
    kind: CycleKind
    batches: int = Field(ge=0)
    blocks: int = Field(ge=0)
    disks: list[DiskRoot] = Field(min_length=1, max_length=16)
    source_time: AwareDatetime
    app_consistent: bool = False


# --------------------------------------------------------------------- service events


class ItemState(StrEnum):
    """Protected item states (docs/reference.md "Replication lifecycle")."""

    NOT_ENABLED = "not_enabled"
    READY_FOR_INITIAL = "ready_for_initial_replication"
    WAITING_FOR_INITIAL = "waiting_for_initial_replication"
    INITIAL_REPLICATION = "initial_replication_in_progress"
    REPLICATING = "replicating"
    SYNCED = "synced"
    FAILOVER_WAITING_COMPLETION = "failover_waiting_completion"
    FAILED_OVER = "failed_over"
    SUSPENDED = "suspended"
    ERROR = "error"
    WAITING_TO_START_RESYNC = "waiting_to_start_resync"
    RESYNCHRONIZING = "resynchronizing"
    RESYNC_SUSPENDED = "resync_suspended"


class Health(StrEnum):
    NORMAL = "Normal"
    WARNING = "Warning"
    CRITICAL = "Critical"


class RecoveryPointType(StrEnum):
    CRASH_CONSISTENT = "crash_consistent"
    APP_CONSISTENT = "app_consistent"


@event_type("ProtectionEnabled", topic=topics.REPLICATION_EVENTS)
class ProtectionEnabled(EventPayload):
    """A VM became a protected item (replication enabled)."""

    item_id: uuid.UUID
    vm_id: str
    vm_name: str
    source_cloud_id: str
    target_cloud_id: str
    pairing_id: uuid.UUID
    policy_id: uuid.UUID
    source_agent_id: uuid.UUID


@event_type("ProtectionDisabled", topic=topics.REPLICATION_EVENTS)
class ProtectionDisabled(EventPayload):
    """Replication was disabled for an item (replica deleted or kept, per policy)."""

    item_id: uuid.UUID
    vm_id: str
    replica_deleted: bool


@event_type("ItemStateChanged", topic=topics.REPLICATION_EVENTS)
class ItemStateChanged(EventPayload):
    """A protected item's replication state or health changed."""

    item_id: uuid.UUID
    vm_id: str
    state: ItemState
    previous_state: ItemState | None
    health: Health
    reason: str = ""


@event_type("RecoveryPointCreated", topic=topics.REPLICATION_EVENTS)
class RecoveryPointCreated(EventPayload):
    """A verified recovery point was committed (its roots matched the source's)."""

    item_id: uuid.UUID
    vm_id: str
    cycle_seq: int
    kind: CycleKind
    point_type: RecoveryPointType
    source_time: datetime
    disks: list[DiskRoot]
    changed_blocks: int
    bytes_stored: int


@event_type("RecoveryPointsPruned", topic=topics.REPLICATION_EVENTS)
class RecoveryPointsPruned(EventPayload):
    """Retention removed recovery points past the policy's window."""

    item_id: uuid.UUID
    cycle_seqs: list[int]
