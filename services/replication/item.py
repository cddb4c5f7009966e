"""The protected item as an aggregate: one replicated VM's row, typed, with the methods that
check the delta protocol's and the state machine's rules, change its fields and record the
events and agent commands that follow. Pure: no I/O. The repository builds it from its row
(`repository.load_item`); the unit of work (services/replication/unit_of_work.py) saves the
fields it changed and its recorded events (outbox) in the caller's transaction.

States (docs/reference.md): waiting_for_initial -> initial_replication -> replicating
(<-> suspended by the operator) -> synced after a final cycle; any cycle the replica cannot
take -> waiting_to_start_resync -> resynchronizing -> replicating at the resync's point."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from typing import Any, Literal

from services.replication import domain
from services.replication.domain import CycleVerdict
from shared.schemas import agent as cmd
from shared.schemas import replication as ev
from shared.schemas.envelope import EventPayload
from shared.schemas.replication import CycleKind, Health, ItemState

HASHES_PER_CHUNK = 16_384  # 512 KiB of digests -> ~700 KB base64 per resync command
DEFAULT_BLOCK_SIZE = 65_536  # a cycle's disk that does not say its block size
# states in which a replica that missed points catches up (by a resync)
_CATCH_UP_STATES = frozenset(
    {ItemState.REPLICATING, ItemState.RESYNCHRONIZING, ItemState.WAITING_TO_START_RESYNC}
)


@dataclass(frozen=True)
class ItemDisk:
    """A protected disk: its id, image path on the source host and size."""

    disk_id: str
    size_bytes: int
    path: str = ""

    def as_row(self) -> dict[str, Any]:
        return {"disk_id": self.disk_id, "path": self.path, "size_bytes": self.size_bytes}


@dataclass(frozen=True)
class Pending:
    """An event or agent command the item recorded, with its Kafka key (who reads it in
    order: the item itself, its source agent or its recovery host)."""

    payload: EventPayload
    key: str


@dataclass(frozen=True)
class ResyncPlan:
    """What `require_resync` decided: the attempt's number, the backoff before the agent is
    asked (0: at once) and whether the caller asks it now (`request_resync`)."""

    attempt: int
    delay_seconds: float
    ask_now: bool


@dataclass(frozen=True)
class FeedRange:
    """Where a cycle's verified batches went on the recovery host's replica feed (None
    offsets: a cycle that changed nothing)."""

    partition: int | None
    first: int | None
    last: int | None


@dataclass(kw_only=True)
class ProtectedItem:
    """One protected item: its row's columns, typed, and what changed since it was loaded."""

    item_id: uuid.UUID
    vault_id: uuid.UUID
    vm_id: str
    vm_name: str
    pairing_id: uuid.UUID
    policy_id: uuid.UUID
    source_agent_id: uuid.UUID
    source_site: str
    target_site: str
    target_cloud_id: str
    disks: list[ItemDisk]
    copy_interval_seconds: int
    state: ItemState
    health: Health = Health.NORMAL
    health_reasons: list[str] = field(default_factory=list)
    error: str | None = None
    paused: bool = False
    active: bool = True
    last_committed_seq: int | None = None
    resync_seq: int | None = None
    resync_id: uuid.UUID | None = None
    resync_attempts: int = 0
    resync_not_before: datetime | None = None
    last_point_source_time: datetime | None = None
    last_cycle_at: datetime | None = None
    initial_done_at: datetime | None = None
    initial_progress: dict[str, Any] = field(default_factory=dict)
    protected_since: datetime
    created_at: datetime | None = None
    updated_at: datetime | None = None
    recovery_agent_id: uuid.UUID | None = None
    replica_seq: int | None = None
    replica_error: str | None = None
    # a catch-up of a replica that missed points: the point it is at (the resync's point is
    # applied over it), and the request for its leaves until the host answers
    replica_follows: int | None = None
    replica_catchup_id: uuid.UUID | None = None
    # what changed since the item was loaded (column names) and what it recorded to emit
    changed: set[str] = field(default_factory=set, init=False, repr=False, compare=False)
    pending: list[Pending] = field(default_factory=list, init=False, repr=False, compare=False)

    def __setattr__(self, name: str, value: object) -> None:
        super().__setattr__(name, value)
        if name in COLUMNS and "changed" in self.__dict__:
            self.changed.add(name)

    # ------------------------------------------------------------ what it is

    @property
    def expected_seq(self) -> int:
        """The number of the next cycle the replica can take."""
        return (self.last_committed_seq or 0) + 1

    @property
    def has_point(self) -> bool:
        return self.last_committed_seq is not None

    def as_row(self) -> dict[str, Any]:
        """The item as its row reads (the API's view of it)."""
        row = {name: getattr(self, name) for name in COLUMNS}
        row.update(
            state=self.state.value,
            health=self.health.value,
            disks=[d.as_row() for d in self.disks],
        )
        return row

    def changed_fields(self) -> dict[str, Any]:
        """The changed columns and their values as stored."""
        row = self.as_row()
        return {name: row[name] for name in COLUMNS if name in self.changed}

    # ------------------------------------------------------------ state machine

    def change_state(
        self, state: ItemState, *, reason: str = "", health: Health | None = None
    ) -> None:
        """Move to `state` (and `health`); `ItemStateChanged` when either changed."""
        previous, previous_health = self.state, self.health
        self.state = state
        self.health = health or previous_health
        if previous is not state or previous_health is not self.health:
            self._emit(
                ev.ItemStateChanged(
                    item_id=self.item_id,
                    vm_id=self.vm_id,
                    state=state,
                    previous_state=previous,
                    health=self.health,
                    reason=reason,
                )
            )

    def pause(self) -> None:
        """The operator pauses replication: the source agent is told, the item is suspended."""
        self._operator_toggle("pause", ItemState.SUSPENDED)

    def resume(self) -> None:
        """The operator resumes: replicating again, or waiting for its initial copy."""
        state = ItemState.REPLICATING if self.has_point else ItemState.WAITING_FOR_INITIAL
        self._operator_toggle("resume", state)

    def _operator_toggle(self, action: Literal["pause", "resume"], state: ItemState) -> None:
        domain.check_action(self.state, action)
        request = (
            cmd.ReplicationPauseRequested if action == "pause" else cmd.ReplicationResumeRequested
        )
        self._command(
            request(command_id=uuid.uuid4(), agent_id=self.source_agent_id, item_id=self.item_id)
        )
        self.paused = action == "pause"
        self.change_state(state, reason=f"{action}d by operator")

    def check_resync_allowed(self) -> None:
        """Refuse an operator's resync in a state where it makes no sense."""
        domain.check_action(self.state, "resync")

    def disable(self, *, delete_replica: bool) -> None:
        """Protection ends: the source agent stops, the recovery host drops its replica if
        asked, the item is inactive and `ProtectionDisabled` says whether its replica went."""
        self._command(
            cmd.ReplicationDisableRequested(
                command_id=uuid.uuid4(), agent_id=self.source_agent_id, item_id=self.item_id
            )
        )
        if delete_replica:
            self.drop_site_replica()
        self.end_protection("protection disabled", replica_deleted=delete_replica)

    def end_protection(self, reason: str, *, replica_deleted: bool = False) -> None:
        """The item protects its VM no more (disabled, or a new item protects it in reverse):
        inactive, not enabled, and `ProtectionDisabled`."""
        self.active = False
        self.change_state(ItemState.NOT_ENABLED, reason=reason)
        self._emit(
            ev.ProtectionDisabled(
                item_id=self.item_id, vm_id=self.vm_id, replica_deleted=replica_deleted
            )
        )

    def drop_site_replica(self) -> None:
        """Command the recovery host to delete its replica (idempotent; none: nothing)."""
        if self.recovery_agent_id is None:
            return
        self._replica_command(
            cmd.ReplicaDeleteRequested(
                command_id=uuid.uuid5(self.item_id, "replica-delete"),
                agent_id=self.recovery_agent_id,
                item_id=self.item_id,
            )
        )

    # ------------------------------------------------------------ failover

    def failover_refusal(self) -> str | None:
        """Why the item can't be marked failed over (None: it can)."""
        return domain.failover_refusal(self.state, self.has_point)

    def fail_over(self, reason: str) -> None:
        """The VM runs at the recovery site: the source agent stops replicating, the item
        is failed over (no resync pending, healthy: nothing replicates any more)."""
        self._command(
            cmd.ReplicationDisableRequested(
                command_id=uuid.uuid5(self.item_id, "failover:disable"),
                agent_id=self.source_agent_id,
                item_id=self.item_id,
            )
        )
        self.error = None
        self.health_reasons = []
        self.resync_seq = None
        self.resync_id = None
        self.resync_not_before = None
        self.change_state(ItemState.FAILED_OVER, reason=reason, health=Health.NORMAL)

    def keep_only_point(self, seq: int, source_time: datetime, pruned: list[int]) -> None:
        """A committed failover keeps only point `seq`: the others (`pruned`) are gone."""
        self.last_committed_seq = seq
        self.last_point_source_time = source_time
        self._emit(ev.RecoveryPointsPruned(item_id=self.item_id, cycle_seqs=pruned))

    # ------------------------------------------------------------ health

    def record_health(self, health: Health, reasons: list[str], error: str | None) -> None:
        """The periodic evaluation's verdict (`ItemStateChanged` when the health changed)."""
        self.health_reasons = reasons
        self.error = error
        self.change_state(self.state, reason="; ".join(reasons) or "healthy", health=health)

    # ------------------------------------------------------------ enable

    @property
    def enable_command_id(self) -> uuid.UUID:
        """The id of the enable command the item waits on (one per starting point)."""
        return uuid.uuid5(self.item_id, f"enable:{self.last_committed_seq or 0}")

    def request_enable(self, settings: dict[str, Any]) -> None:
        """Command the source agent to replicate the item, per its policy's `settings`."""
        initial = settings.get("initial_replication", "online_now")
        self._command(
            cmd.ReplicationEnableRequested(
                command_id=self.enable_command_id,
                agent_id=self.source_agent_id,
                item_id=self.item_id,
                vm_id=self.vm_id,
                vm_name=self.vm_name,
                disks=[cmd.DiskSpec(**d.as_row()) for d in self.disks],
                copy_interval_seconds=int(settings["copy_frequency_seconds"]),
                compression=(
                    ev.Compression.ZLIB if settings.get("compression") else ev.Compression.NONE
                ),
                app_consistent_interval_seconds=int(
                    settings.get("app_consistent_frequency_hours", 0)
                )
                * 3600,
                initial_replication=cmd.InitialReplication(initial),
                scheduled_at=settings.get("initial_replication_start_at"),
                export_path=settings.get("offline_export_path"),
                next_cycle_seq=self.expected_seq,
            )
        )

    def enable_failed(self, error: str) -> None:
        """The source agent could not start replicating: a non-recoverable error."""
        self.error = (
            f"agent could not enable replication: {error} (cause: the source host could not "
            "start tracking the VM's disks; recommendation: check the VM's disk images on its "
            "host, then disable and enable protection again)"
        )
        self.change_state(ItemState.ERROR, reason=error, health=Health.CRITICAL)

    def note_progress(self, progress: dict[str, Any]) -> None:
        """The source agent's progress through the initial copy."""
        self.initial_progress = progress

    # ------------------------------------------------------------ delta protocol

    def geometry_problem(
        self, disks: list[dict[str, Any]], max_disk_bytes: int, max_block_bytes: int
    ) -> tuple[str, str] | None:
        """(reason, text) if a cycle's disks are not the item's, or exceed the bounds."""
        return domain.geometry_problem(
            [d.as_row() for d in self.disks], disks, max_disk_bytes, max_block_bytes
        )

    def start_cycle(self, seq: int, kind: CycleKind, unfinished: int | None) -> CycleVerdict:
        """Judge a `CycleStarted` (`unfinished`: a cycle that started and never completed);
        the item's first accepted cycle starts its initial replication. The caller stages an
        accepted cycle, rejects a replay and, on a gap, calls `require_resync`."""
        verdict = domain.judge_cycle_start(
            self.state, self.last_committed_seq, self.resync_seq, seq, kind, unfinished
        )
        if verdict is CycleVerdict.ACCEPT and self.state is ItemState.WAITING_FOR_INITIAL:
            self.change_state(ItemState.INITIAL_REPLICATION, reason="initial cycle")
        return verdict

    def gap_reason(self, seq: int, dead_letter: str | None) -> str:
        """Why cycle `seq` (a gap) sends the item to resync; `dead_letter`: why a record
        of the item was dead-lettered before, if one was."""
        return f"sequence gap: expected cycle {self.expected_seq}, got {seq}" + (
            f" (after {dead_letter})" if dead_letter else ""
        )

    def commit_point(
        self,
        msg: ev.CycleCompleted,
        *,
        geometry: dict[str, dict[str, Any]],
        changed_blocks: int,
        bytes_stored: int,
        now: datetime,
        feed: FeedRange,
        keep_from: int | None,
    ) -> None:
        """The replica committed the cycle's recovery point: `RecoveryPointCreated`, the state
        it brings (critical health clears), the resync over, the disks' sizes as the cycle
        gave them, and the recovery host commanded to apply it (`keep_from`: the oldest
        retained point it must be able to return to)."""
        point_type = point_type_of(msg.app_consistent)
        # The point first, then the state it brings: a view never sees the item `replicating`
        # (e.g. past its resync) before the recovery point that made it so.
        self._emit(
            ev.RecoveryPointCreated(
                item_id=self.item_id,
                vm_id=self.vm_id,
                cycle_seq=msg.cycle_seq,
                kind=msg.kind,
                point_type=point_type,
                source_time=msg.source_time,
                disks=msg.disks,
                changed_blocks=changed_blocks,
                bytes_stored=bytes_stored,
            )
        )
        self.last_committed_seq = msg.cycle_seq
        self.last_point_source_time = msg.source_time
        self.last_cycle_at = now
        self.error = None
        self.resync_seq = None
        self.resync_id = None
        self.resync_attempts = 0
        self.disks = [
            ItemDisk(d.disk_id, int(geometry[d.disk_id]["size_bytes"]), d.path)
            if d.disk_id in geometry
            else d
            for d in self.disks
        ]
        if self.initial_done_at is None:
            self.initial_done_at = now
        self.change_state(
            domain.state_after_point(self.state, msg.kind),
            reason=f"recovery point {msg.cycle_seq}",
            health=Health.NORMAL if self.health is Health.CRITICAL else None,
        )
        if self.recovery_agent_id is not None:
            self._replica_command(
                cmd.ReplicaPointApplyRequested(
                    command_id=uuid.uuid5(self.item_id, f"replica-apply:{msg.cycle_seq}"),
                    agent_id=self.recovery_agent_id,
                    item_id=self.item_id,
                    cycle_seq=msg.cycle_seq,
                    partition=feed.partition,
                    first_offset=feed.first,
                    last_offset=feed.last,
                    disks=[
                        cmd.ReplicaDisk(
                            disk_id=d.disk_id,
                            size_bytes=d.size_bytes,
                            block_size=geometry.get(d.disk_id, {}).get(
                                "block_size", DEFAULT_BLOCK_SIZE
                            ),
                            merkle_root=d.merkle_root,
                        )
                        for d in msg.disks
                    ],
                    keep_from=keep_from or msg.cycle_seq,
                    # a catch-up's point: applied over the point the replica is at
                    follows=self.replica_follows
                    if self.replica_follows is not None and self.replica_follows < msg.cycle_seq
                    else None,
                )
            )

    # ------------------------------------------------------------ resync

    def require_resync(
        self, reason: str, *, now: datetime, backoff: Callable[[int], float]
    ) -> ResyncPlan:
        """The replica can't take the next cycle: the item waits for a resync (critical).
        The first time the agent is asked at once; a resync that fails again is retried after
        `backoff(retries before)` seconds."""
        retrying = self.state in (ItemState.RESYNCHRONIZING, ItemState.WAITING_TO_START_RESYNC)
        attempt = self.resync_attempts + 1 if retrying else 1
        delay = backoff(attempt - 1) if retrying else 0.0
        self.error = reason
        self.resync_attempts = attempt
        self.resync_not_before = now + timedelta(seconds=delay)
        self.change_state(ItemState.WAITING_TO_START_RESYNC, reason=reason, health=Health.CRITICAL)
        return ResyncPlan(attempt=attempt, delay_seconds=delay, ask_now=not retrying)

    def request_resync(self, leaf_hashes: dict[str, list[bytes]], resync_id: uuid.UUID) -> None:
        """Ask the source agent for the blocks whose hashes differ from the replica's latest
        point (`leaf_hashes` by disk; none before a first point: every block). The hashes
        travel in chunks of `HASHES_PER_CHUNK`; the resync cycle gets the next number."""
        seq = self.expected_seq
        for disk in self.disks:
            hashes = leaf_hashes.get(disk.disk_id, []) if self.has_point else []
            size = disk.size_bytes if self.has_point else 0
            chunks = max(1, -(-len(hashes) // HASHES_PER_CHUNK))
            for chunk_no in range(chunks):
                part = hashes[chunk_no * HASHES_PER_CHUNK : (chunk_no + 1) * HASHES_PER_CHUNK]
                self._command(
                    cmd.ResyncRequested(
                        command_id=uuid.uuid5(resync_id, f"{disk.disk_id}:{chunk_no}"),
                        agent_id=self.source_agent_id,
                        item_id=self.item_id,
                        resync_id=resync_id,
                        cycle_seq=seq,
                        disk_id=disk.disk_id,
                        disk_count=len(self.disks),
                        size_bytes=size,
                        chunk_no=chunk_no,
                        chunks=chunks,
                        first_index=chunk_no * HASHES_PER_CHUNK,
                        leaf_hashes=base64.b64encode(b"".join(part)).decode(),
                    )
                )
        self.resync_seq = seq
        self.resync_id = resync_id
        self.resync_not_before = None
        self.change_state(
            ItemState.RESYNCHRONIZING,
            reason=self.error or "resync requested",
            health=Health.CRITICAL,
        )

    def agent_fault(self, needs_resync: bool) -> bool:
        """True if an agent's fault report sends the item to resync (not while one runs)."""
        return needs_resync and self.state is not ItemState.RESYNCHRONIZING

    # ------------------------------------------------------------ the recovery host's replica

    def replica_failed(self, error: str) -> None:
        self.replica_error = error

    def replica_behind(self, held: int, error: str, asked: int | None = None) -> bool:
        """The recovery host could not apply point `asked`: its replica is at point `held`
        and missed the points after it (its host was down past its feed's retention, or lost
        the replica: `held` 0). True if it must catch up now (the caller then sends the item
        to resync, `require_resync`): not for a stale answer (a point the replica is known to
        hold since, e.g. an answer sent again), nor while a catch-up from `held` is under way,
        nor when the item no longer replicates."""
        self.replica_error = error
        known = self.replica_seq or 0
        stale = asked <= known if asked is not None else held < known
        if stale or self.replica_follows == held:
            return False
        if self.state not in _CATCH_UP_STATES or self.recovery_agent_id is None:
            return False
        self.replica_follows = held
        return True

    def ask_replica_leaves(self, request_id: uuid.UUID) -> None:
        """Catch-up, first step: the recovery host reports the leaf hashes of the point its
        replica is at (`ReplicaLeavesRequested`); the resync waits for them."""
        self.replica_catchup_id = request_id
        self._replica_command(
            cmd.ReplicaLeavesRequested(
                command_id=uuid.uuid5(request_id, "replica-leaves"),
                agent_id=self.recovery_agent_id,
                item_id=self.item_id,
                request_id=request_id,
            )
        )
        self.resync_not_before = None
        self.change_state(
            ItemState.RESYNCHRONIZING,
            reason=f"the recovery host's replica missed the points after {self.replica_follows}: "
            "waiting for its leaf hashes",
            health=Health.CRITICAL,
        )

    def replica_leaves_answered(self, request_id: uuid.UUID) -> bool:
        """Whether an answer to `ReplicaLeavesRequested` is the one the catch-up waits for;
        it then waits no more."""
        if self.replica_catchup_id != request_id:
            return False
        self.replica_catchup_id = None
        return True

    def replica_applied(self, seq: int, roots_match: bool) -> list[int]:
        """The recovery host holds point `seq`: the latest it holds if its roots are the
        source's; else the mismatch is the replica's error. Returns the points a catch-up
        skipped (those after the point it followed, before `seq`): the replica never held
        them; the caller prunes those that are no longer anywhere."""
        if not roots_match:
            self.replica_error = f"the recovery host's roots for point {seq} are not the source's"
            return []
        self.replica_seq = max(seq, self.replica_seq or 0)
        self.replica_error = None
        follows = self.replica_follows
        if follows is None or seq <= follows:
            return []
        self.replica_follows = None
        return list(range(follows + 1, seq))

    def points_pruned(self, seqs: list[int]) -> None:
        """Recovery points dropped outside retention (`RecoveryPointsPruned`)."""
        if seqs:
            self._emit(ev.RecoveryPointsPruned(item_id=self.item_id, cycle_seqs=seqs))

    # ------------------------------------------------------------ recording

    def _emit(self, payload: EventPayload) -> None:
        self.pending.append(Pending(payload, str(self.item_id)))

    def _command(self, payload: EventPayload) -> None:
        """A command to the item's source agent."""
        self.pending.append(Pending(payload, str(self.source_agent_id)))

    def _replica_command(self, payload: EventPayload) -> None:
        """A command to the item's recovery host."""
        self.pending.append(Pending(payload, str(self.recovery_agent_id)))


def point_type_of(app_consistent: bool) -> ev.RecoveryPointType:
    return (
        ev.RecoveryPointType.APP_CONSISTENT
        if app_consistent
        else ev.RecoveryPointType.CRASH_CONSISTENT
    )


COLUMNS = tuple(f.name for f in fields(ProtectedItem) if f.init)  # the row's, in order
