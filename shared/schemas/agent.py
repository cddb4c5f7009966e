"""Commands to host agents (`agent.commands.v1`, keyed by agent id, published by services
through their outbox) and what agents report back (`agent.events.v1`, signed, keyed by agent
id). Every command carries an idempotency key (`command_id`): an agent that sees a command id
again replies with the first result and does not repeat the effect."""

from __future__ import annotations

import base64
import binascii
import uuid
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import Field, model_validator

from shared import topics
from shared.schemas.envelope import EventPayload
from shared.schemas.registry import event_type
from shared.schemas.replication import Compression


class InitialReplicationMode(StrEnum):
    """How an agent starts an item: the policy's choices (`shared.schemas.policy`) plus
    `seeded`. Named apart from the policy's enum so the contract's schemas stay distinct."""

    ONLINE_NOW = "online_now"
    ONLINE_SCHEDULED = "online_scheduled"
    OFFLINE = "offline"
    # The target was seeded from a copy it already holds (reverse replication): ship nothing
    # until a ResyncRequested arrives, then only the blocks that differ.
    SEEDED = "seeded"


InitialReplication = InitialReplicationMode  # the name code imports


class _Command(EventPayload):
    command_id: uuid.UUID = Field(description="Idempotency key.")
    agent_id: uuid.UUID


class DiskSpec(EventPayload):
    disk_id: str
    path: str = Field(description="Image file path on the host.")
    size_bytes: int = Field(gt=0)


@event_type("ReplicationEnableRequested", topic=topics.AGENT_COMMANDS)
class ReplicationEnableRequested(_Command):
    """Start replicating a VM: initial replication, then a delta cycle every copy interval."""

    item_id: uuid.UUID
    vm_id: str
    vm_name: str
    disks: list[DiskSpec] = Field(min_length=1, max_length=16)
    copy_interval_seconds: int = Field(ge=1, le=3600)
    compression: Compression = Compression.NONE
    app_consistent_interval_seconds: int = Field(default=0, ge=0)
    initial_replication: InitialReplicationMode = InitialReplicationMode.ONLINE_NOW
    scheduled_at: datetime | None = None
    export_path: str | None = None
    next_cycle_seq: int = Field(default=1, ge=1)


@event_type("ReplicationDisableRequested", topic=topics.AGENT_COMMANDS)
class ReplicationDisableRequested(_Command):
    """Stop replicating the item and forget its change tracking."""

    item_id: uuid.UUID


@event_type("ReplicationPauseRequested", topic=topics.AGENT_COMMANDS)
class ReplicationPauseRequested(_Command):
    """Stop shipping cycles; keep tracking changes (the log grows)."""

    item_id: uuid.UUID


@event_type("ReplicationResumeRequested", topic=topics.AGENT_COMMANDS)
class ReplicationResumeRequested(_Command):
    """Resume shipping cycles after a pause."""

    item_id: uuid.UUID


@event_type("ResyncRequested", topic=topics.AGENT_COMMANDS)
class ResyncRequested(_Command):
    """Send only the blocks whose hashes differ from the replica's. The replica's leaf hashes
    of one disk come in `chunks` commands (base64 of concatenated 32-byte SHA-256 digests,
    starting at block `first_index`); the agent diffs once it has every chunk of every disk,
    then ships a `resync` cycle numbered `cycle_seq`."""

    item_id: uuid.UUID
    resync_id: uuid.UUID
    cycle_seq: int = Field(ge=1)
    disk_id: str
    disk_count: int = Field(ge=1, le=16)
    size_bytes: int = Field(ge=0, description="Replica disk size; 0 if it has none.")
    chunk_no: int = Field(ge=0)
    chunks: int = Field(ge=1)
    first_index: int = Field(ge=0)
    leaf_hashes: str = Field(default="", max_length=900_000)


def _named_once(disk_ids: list[str]) -> None:
    if len(set(disk_ids)) != len(disk_ids):
        raise ValueError("each disk is named once")


class ReplicaDisk(EventPayload):
    """A disk of a recovery point as the replica must hold it."""

    disk_id: str = Field(min_length=1, max_length=100)
    size_bytes: int = Field(gt=0)
    block_size: int = Field(gt=0)
    merkle_root: str = Field(pattern=r"^[0-9a-f]{64}$")


@event_type("ReplicaPointApplyRequested", topic=topics.AGENT_COMMANDS)
class ReplicaPointApplyRequested(_Command):
    """Bring the item's replica on this recovery host to verified recovery point `cycle_seq`.
    The cycle's verified records are on this agent's replica feed,
    `replica.feed.v1.<agent_id>`, partition `partition`, offsets `first_offset`..`last_offset`
    (with other items' records between; none when the cycle changed no block); the agent
    applies the blocks of this item and cycle, and answers with the roots it then holds
    (`CommandCompleted` result {"item_id", "cycle_seq", "roots": {disk_id: root}}). Undo
    records of points older than `keep_from` are pruned."""

    item_id: uuid.UUID
    cycle_seq: int = Field(ge=1)
    partition: int | None = Field(default=None, ge=0)
    first_offset: int | None = Field(default=None, ge=0)
    last_offset: int | None = Field(default=None, ge=0)
    disks: list[ReplicaDisk] = Field(min_length=1, max_length=64)
    keep_from: int = Field(ge=1)
    follows: int | None = Field(
        default=None,
        ge=0,
        description="A catch-up point: the replica is at point `follows` (it missed the points "
        "between, its host down past its feed's retention) and the cycle's blocks are every "
        "block that differs from it. Absent: the point follows `cycle_seq` - 1.",
    )

    @model_validator(mode="after")
    def _follows_an_older_point(self) -> ReplicaPointApplyRequested:
        if self.follows is not None and self.follows >= self.cycle_seq:
            raise ValueError(f"point {self.cycle_seq} cannot follow point {self.follows}")
        return self


@event_type("ReplicaLeavesRequested", topic=topics.AGENT_COMMANDS)
class ReplicaLeavesRequested(_Command):
    """Report the leaf hashes of the item's replica as it is (HEAD): a replica that missed
    points catches up by a resync of the blocks that differ from them, applied as one point
    that follows HEAD (`ReplicaPointApplyRequested.follows`). The agent reports them
    (`ReplicaLeavesReported` with this `request_id`, disk by disk, chunk by chunk), then
    answers with `CommandCompleted` (result {"item_id", "request_id", "cycle_seq", "roots":
    {disk_id: root}}: HEAD's point)."""

    item_id: uuid.UUID
    request_id: uuid.UUID


LEAVES_PER_REPORT = 16_384  # leaf hashes per ReplicaLeavesReported: 512 KiB, ~700 KB base64
_LEAVES_B64 = 4 * -(-LEAVES_PER_REPORT * 32 // 3)  # base64 length of a full report


class SeedImage(EventPayload):
    """An image file on the recovery host that a disk of the replica starts from."""

    disk_id: str = Field(min_length=1, max_length=100)
    path: str = Field(
        min_length=1, max_length=1024, description="Image file on this host, in its storage."
    )
    size_bytes: int = Field(gt=0, description="The disk's size (a shorter file reads as zeros).")
    block_size: int = Field(default=65536, gt=0, le=16 * 2**20)


@event_type("ReplicaSeedRequested", topic=topics.AGENT_COMMANDS)
class ReplicaSeedRequested(_Command):
    """Start the item's replica on this host from these images as point `cycle_seq` (reverse
    replication: the old primary host keeps the images of the VM that ran on it). The agent
    copies each image into the replica, block by block, and reports every disk's leaf hashes
    (`ReplicaLeavesReported` events, disk by disk, chunk by chunk) then answers with
    `CommandCompleted` (result {"item_id", "request_id", "cycle_seq", "roots": {disk_id:
    root}}). Every path must be a file in this host's storage folder, at most `size_bytes`
    long. A repeated command finds the replica seeded and reports the same; an item whose
    replica is at another point or was seeded from other images is refused."""

    item_id: uuid.UUID
    request_id: uuid.UUID = Field(description="The reverse replication request.")
    cycle_seq: int = Field(ge=1)
    disks: list[SeedImage] = Field(min_length=1, max_length=64)

    @model_validator(mode="after")
    def _distinct_disks(self) -> ReplicaSeedRequested:
        _named_once([d.disk_id for d in self.disks])
        return self


@event_type("ReplicaLeavesReported", topic=topics.AGENT_EVENTS, signed=True)
class ReplicaLeavesReported(EventPayload):
    """Leaf hashes of one disk of a replica on this host, seeded (`ReplicaSeedRequested`) or
    asked for (`ReplicaLeavesRequested`): base64
    of concatenated 32-byte SHA-256 digests of the blocks from `first_index` on, at most
    LEAVES_PER_REPORT (16,384) a report, `chunks` reports per disk; all of them are sent before
    the command's `CommandCompleted`, on the same key (the agent id)."""

    item_id: uuid.UUID
    request_id: uuid.UUID
    cycle_seq: int = Field(ge=1)
    disk_id: str = Field(min_length=1, max_length=100)
    disk_count: int = Field(ge=1, le=64)
    size_bytes: int = Field(gt=0)
    block_size: int = Field(gt=0)
    chunk_no: int = Field(ge=0)
    chunks: int = Field(ge=1)
    first_index: int = Field(ge=0)
    leaf_hashes: str = Field(min_length=44, max_length=_LEAVES_B64)

    @model_validator(mode="after")
    def _leaves_of_the_disk(self) -> ReplicaLeavesReported:
        if self.chunk_no >= self.chunks:
            raise ValueError(f"chunk {self.chunk_no} of {self.chunks}")
        try:
            count, rest = divmod(len(base64.b64decode(self.leaf_hashes, validate=True)), 32)
        except binascii.Error:
            raise ValueError("leaf_hashes is not base64") from None
        if rest:  # max_length keeps it to LEAVES_PER_REPORT digests
            raise ValueError("leaf_hashes is not whole 32-byte digests")
        blocks = -(-self.size_bytes // self.block_size)
        if self.first_index + count > blocks:
            raise ValueError(f"leaves past the disk's {blocks} blocks")
        return self


@event_type("ReplicaHandoverRequested", topic=topics.AGENT_COMMANDS)
class ReplicaHandoverRequested(_Command):
    """A failover: bring the item's replica to point `cycle_seq` (rolling back only the blocks
    changed since, if it is older than the latest) and hand its images over as the VM's disks,
    `target_dir/<disk_id>.vhdx` (a rename within this host: no copy). The replica is consumed.
    The result names the disks; a failure (e.g. another filesystem) lets the service copy."""

    item_id: uuid.UUID
    request_id: uuid.UUID = Field(description="The failover service's materialise request.")
    cycle_seq: int = Field(ge=1)
    target_dir: str = Field(min_length=1, max_length=1024)
    disks: list[ReplicaDisk] = Field(min_length=1, max_length=64)


@event_type("DifferencingDisksRequested", topic=topics.AGENT_COMMANDS)
class DifferencingDisksRequested(_Command):
    """A test failover: a differencing (copy-on-write) disk per disk, `target_dir/<disk_id>
    .avhdx`, over a frozen view of the item's replica at point `cycle_seq` (no copy; the
    replica goes on taking points). Deleting the VM in `target_dir` discards the disks and the
    view. The result names the disks; a failure (the point not retained here) lets the
    service copy."""

    item_id: uuid.UUID
    request_id: uuid.UUID = Field(description="The failover service's materialise request.")
    cycle_seq: int = Field(ge=1)
    target_dir: str = Field(min_length=1, max_length=1024)
    disks: list[ReplicaDisk] = Field(min_length=1, max_length=64)


@event_type("ReplicaPointExportRequested", topic=topics.AGENT_COMMANDS)
class ReplicaPointExportRequested(_Command):
    """Verify (`target_dir` None) or export (`target_dir` given) retained point `cycle_seq` of
    the item's replica on this host, for a replication service that keeps no copy of the
    blocks. The agent reads every block of each disk through a frozen view of the point
    (dropped at the end), recomputes its Merkle root and the SHA-256 of the disk's bytes and,
    with `target_dir` (a folder in this host's storage that holds no VM), writes the disk to
    `target_dir/<disk_id>.vhdx` as it reads. `CommandCompleted` result {"item_id",
    "request_id", "cycle_seq", "ok", "disks": [{"disk_id", "size_bytes", "merkle_root",
    "expected_root", "ok", "sha256", "path" (with `target_dir`)}]}: `ok` says the recomputed
    root is the source's (`merkle_root` here); a root that differs is an answer, not a failure
    (the files are written all the same). A point the replica does not retain is a failure.
    A repeated command gives the same answer (the files are written again)."""

    item_id: uuid.UUID
    request_id: uuid.UUID = Field(description="The replication service's verify/export request.")
    cycle_seq: int = Field(ge=1)
    disks: list[ReplicaDisk] = Field(min_length=1, max_length=64)
    target_dir: str | None = Field(default=None, min_length=1, max_length=1024)

    @model_validator(mode="after")
    def _distinct_disks(self) -> ReplicaPointExportRequested:
        _named_once([d.disk_id for d in self.disks])
        return self


@event_type("ReplicaDeleteRequested", topic=topics.AGENT_COMMANDS)
class ReplicaDeleteRequested(_Command):
    """Delete the item's replica on this recovery host (protection disabled with its replica
    deleted, or a failover committed: the VM runs on its own disks). Idempotent."""

    item_id: uuid.UUID


@event_type("VmPowerRequested", topic=topics.AGENT_COMMANDS)
class VmPowerRequested(_Command):
    """Shut down or start a VM on the host."""

    vm_id: str
    action: str = Field(pattern=r"^(shutdown|start)$")


@event_type("DiskImagesCheckRequested", topic=topics.AGENT_COMMANDS)
class DiskImagesCheckRequested(_Command):
    """Which of these disk images this host still has (before a reverse replication is seeded
    from a failed-over VM's old disks). The agent answers with `CommandCompleted` (result
    {"images": {path: size_bytes or null}}): the size of each path that is a regular file in
    this host's storage folder (after following links), null for a path that is missing, not
    a file, or outside the storage. A missing image is an answer, not a failure."""

    images: list[Annotated[str, Field(min_length=1, max_length=1024)]] = Field(
        min_length=1, max_length=64, description="Image file paths on this host."
    )


class CommandOutcome(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@event_type("CommandCompleted", topic=topics.AGENT_EVENTS, signed=True)
class CommandCompleted(EventPayload):
    """An agent's result for a command (sent again, unchanged, for a repeated command id)."""

    command_id: uuid.UUID
    command_type: str
    outcome: CommandOutcome
    error: str = ""
    result: dict[str, Any] = Field(default_factory=dict)


@event_type("InitialReplicationProgressed", topic=topics.AGENT_EVENTS, signed=True)
class InitialReplicationProgressed(EventPayload):
    """Progress of an item's initial replication (or resync) on the source agent."""

    item_id: uuid.UUID
    bytes_done: int = Field(ge=0)
    bytes_total: int = Field(ge=0)
    blocks_done: int = Field(ge=0)
    blocks_total: int = Field(ge=0)


@event_type("ReplicationFaulted", topic=topics.AGENT_EVENTS, signed=True)
class ReplicationFaulted(EventPayload):
    """The agent cannot go on replicating an item without a resync (journal lost after an
    unclean stop, change log over 50 % of the disk, a disk changed while replication was
    off), or hit a recoverable error it retries."""

    item_id: uuid.UUID
    reason: str
    needs_resync: bool


class NicAttachment(EventPayload):
    nic_id: str
    network_id: str | None = Field(description="None: not connected (no network mapping).")
    subnet: str | None = None
    ip_mode: str = Field(default="dhcp", pattern=r"^(static|dhcp)$")
    ip_address: str | None = None


class VmDisk(EventPayload):
    disk_id: str
    file: str = Field(description="Image file name inside the VM's folder.")
    size_bytes: int = Field(gt=0)


@event_type("VmCreateRequested", topic=topics.AGENT_COMMANDS)
class VmCreateRequested(_Command):
    """Create a VM on this (recovery-site) host from disk images already in its storage folder
    `<storage>/<vm_name>/`, attach its NICs, and start it if asked. A VM of that name that
    already exists with the same id is left as is (idempotent)."""

    vm_id: str
    vm_name: str
    generation: int = Field(default=2, ge=1, le=2)
    cpu_count: int = Field(default=2, ge=1)
    memory_mb: int = Field(default=4096, ge=32)
    disks: list[VmDisk] = Field(min_length=1, max_length=16)
    nics: list[NicAttachment] = Field(default_factory=list)
    start: bool = True


@event_type("VmDeleteRequested", topic=topics.AGENT_COMMANDS)
class VmDeleteRequested(_Command):
    """Delete a VM (its folder and disks) from this host, e.g. a test-failover VM at cleanup."""

    vm_name: str
