"""Failover rules: operations, job and item states, refusals, recovery-plan limits and action
filtering, the durable-step decisions (what a resumed step does), NIC placement. Pure,
synchronous, no I/O: handlers and the workflow engine load the facts, these functions decide."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared.networking import failover_nic_target
from shared.schemas.agent import NicAttachment
from shared.schemas.failover import FailoverKind, JobState, MaterialisedDisk, PointChoice
from shared.schemas.inventory import Nic, VmNetwork

MAX_PLAN_ITEMS = 100
MAX_PLAN_GROUPS = 7
SCRIPT_NAME = r"^[A-Za-z0-9_][A-Za-z0-9._-]*$"
NAMESPACE = uuid.UUID("6f1c4a52-2f0e-4d84-9a57-0b3c2d51f1e1")


class FailoverRefused(Exception):
    """A refused request: the state of what it names does not allow it now."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(FailoverRefused):
    """The request names something (an item, a job, a plan, a point) that does not exist."""


class InvalidRequest(FailoverRefused):
    """The request itself is incomplete or contradictory, whatever the state."""


class Operation(StrEnum):
    TEST_FAILOVER = "test_failover"
    TEST_CLEANUP = "test_failover_cleanup"
    PLANNED_FAILOVER = "planned_failover"
    UNPLANNED_FAILOVER = "unplanned_failover"
    COMMIT = "commit"
    REVERSE = "reverse_replicate"
    FAILBACK = "failback"


OPERATION_KIND: dict[Operation, FailoverKind | None] = {
    Operation.TEST_FAILOVER: FailoverKind.TEST,
    Operation.PLANNED_FAILOVER: FailoverKind.PLANNED,
    Operation.UNPLANNED_FAILOVER: FailoverKind.UNPLANNED,
    Operation.FAILBACK: FailoverKind.PLANNED,
}

# Operations an operator may restart once failed ("any error stops the run: re-run it").
RESTARTABLE = frozenset(
    {
        Operation.TEST_FAILOVER,
        Operation.TEST_CLEANUP,
        Operation.PLANNED_FAILOVER,
        Operation.COMMIT,
        Operation.REVERSE,
        Operation.FAILBACK,
    }
)


class ItemFailoverState(StrEnum):
    """This service's view of an item (beside the replication service's item state)."""

    PROTECTED = "protected"
    TESTING = "testing"
    FAILOVER_IN_PROGRESS = "failover_in_progress"
    FAILOVER_FAILED = "failover_failed"
    FAILED_OVER = "failed_over"
    COMMITTED = "committed"
    REVERSE_REPLICATING = "reverse_replicating"


UNFINISHED = frozenset({JobState.NOT_STARTED, JobState.IN_PROGRESS, JobState.WAITING_FOR_INPUT})
READY_STATES = frozenset({"replicating", "synced"})


def is_finished(state: JobState) -> bool:
    return state not in UNFINISHED


def final_state(operation: Operation, *, failed: bool, errors: int) -> JobState:
    """The state a job ends in: an error that stopped the run fails it; an unplanned run (or
    a plan that goes on) that met errors completes with errors."""
    if failed:
        return JobState.FAILED
    if errors:
        return JobState.COMPLETED_WITH_ERRORS
    return JobState.SUCCEEDED


def can_restart(operation: Operation, state: JobState) -> str | None:
    """None if the job may be restarted, else why not."""
    if state is not JobState.FAILED:
        return f"only a failed job can be restarted; this one is {state.value}"
    if operation not in RESTARTABLE:
        return (
            f"a failed {operation.value} can't be restarted (it already ran past its errors); "
            "start a new one"
        )
    return None


def progress(done: int, expected: int) -> int:
    if expected <= 0:
        return 0
    return max(0, min(99, done * 100 // expected))


# ------------------------------------------------------------------ durable steps


class StepAction(StrEnum):
    RUN = "run"  # never started: record it, then do the effect
    RESEND = "resend"  # recorded (maybe sent) before a restart: send again with the same id
    WAIT = "wait"  # the answer is already here: just collect it
    SKIP = "skip"  # done: its recorded result stands
    FAILED = "failed"  # failed in this run: the error stands until an operator restart


def step_action(task_state: str | None, answered: bool) -> StepAction:
    """What a (resumed) workflow does at a step, given its recorded task."""
    if task_state is None:
        return StepAction.RUN
    if task_state == JobState.SUCCEEDED.value:
        return StepAction.SKIP
    if task_state == JobState.FAILED.value:
        return StepAction.FAILED
    return StepAction.WAIT if answered else StepAction.RESEND


def command_id_for(job_id: uuid.UUID, step_key: str, run_no: int = 1) -> uuid.UUID:
    """The idempotency key of a step: the same for every re-send within a run, new after an
    operator's restart (so a failed command is not just answered with its old failure)."""
    return uuid.uuid5(NAMESPACE, f"{job_id}/{step_key}/{run_no}")


@dataclass(frozen=True)
class TaskRow:
    """One step of a job as stored: its idempotency key (`command_id`), state and result."""

    job_id: uuid.UUID
    task_no: int
    step_key: str
    name: str
    state: str
    command_id: uuid.UUID
    attempts: int
    started_at: datetime
    ended_at: datetime | None
    error: str | None
    cause: str | None
    recommendation: str | None
    detail: dict[str, object]


def resume_point(tasks: Sequence[TaskRow]) -> str:
    """A line for the job history: where a resumed workflow picks up."""
    done = [t for t in tasks if t.state == JobState.SUCCEEDED.value]
    open_ = [t for t in tasks if t.state not in (JobState.SUCCEEDED.value, "failed")]
    if open_:
        names = ", ".join(t.name for t in open_[:3])
        return f"{len(done)} steps done; resuming {names}"
    return f"{len(done)} steps done; resuming at the next step"


# ------------------------------------------------------------------ refusals


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


# ------------------------------------------------------------------ recovery plans


class PlanAction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    action_id: str = Field(
        default_factory=lambda: uuid.uuid4().hex[:8],
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9._-]+$",
    )
    name: str = Field(min_length=1, max_length=200)
    kind: str = Field(pattern=r"^(script|manual)$")
    script: str | None = Field(
        default=None,
        max_length=255,
        pattern=SCRIPT_NAME,
        description="The script's file name in the failover service's scripts folder "
        "(`DR_FAILOVER_SCRIPTS_DIR`): a name, never a path.",
    )
    args: list[str] = Field(default_factory=list, max_length=50)
    timeout_seconds: float | None = Field(default=None, gt=0, le=24 * 3600)
    instructions: str = Field(default="", max_length=4000)
    run_on: list[FailoverKind] = Field(
        default_factory=lambda: list(FailoverKind),
        description="Limit the action to test, planned and/or unplanned runs.",
    )

    @field_validator("script")
    @classmethod
    def _name_only(cls, value: str | None) -> str | None:
        if value is not None and ".." in value:
            raise ValueError("a script is named by its file name: '..' is not allowed")
        return value

    @field_validator("args")
    @classmethod
    def _short_args(cls, value: list[str]) -> list[str]:
        if any(len(a) > 1024 or "\x00" in a for a in value):
            raise ValueError("a script argument has at most 1024 characters and no NUL")
        return value


class PlanGroup(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[uuid.UUID] = Field(default_factory=list)
    pre_actions: list[PlanAction] = Field(default_factory=list, max_length=20)
    post_actions: list[PlanAction] = Field(default_factory=list, max_length=20)


@dataclass(frozen=True)
class RecoveryPlan:
    plan_id: uuid.UUID
    vault_id: uuid.UUID
    name: str
    description: str
    groups: list[PlanGroup]
    created_at: datetime
    updated_at: datetime

    @property
    def item_count(self) -> int:
        return sum(len(g.items) for g in self.groups)


def plan_problems(groups: Sequence[PlanGroup]) -> list[str]:
    """Why a recovery plan is invalid (empty: valid)."""
    problems = []
    if not groups:
        problems.append("a recovery plan needs at least one group")
    if len(groups) > MAX_PLAN_GROUPS:
        problems.append(
            f"a recovery plan has at most {MAX_PLAN_GROUPS} groups; this one has {len(groups)}"
        )
    items = [i for g in groups for i in g.items]
    if len(items) > MAX_PLAN_ITEMS:
        problems.append(
            f"a recovery plan has at most {MAX_PLAN_ITEMS} protected items; this one has "
            f"{len(items)}"
        )
    dupes = sorted({str(i) for i in items if items.count(i) > 1})
    if dupes:
        problems.append(f"an item can be in only one group of a plan: {', '.join(dupes[:5])}")
    ids = [a.action_id for g in groups for a in (*g.pre_actions, *g.post_actions)]
    if len(ids) != len(set(ids)):
        problems.append("action ids must be unique within a plan")
    for g_no, group in enumerate(groups, 1):
        for action in (*group.pre_actions, *group.post_actions):
            if action.kind == "script" and not action.script:
                problems.append(f"group {g_no}: script action '{action.name}' needs a script")
    return problems


def actions_for(actions: Iterable[PlanAction], kind: FailoverKind | None) -> list[PlanAction]:
    """The actions that run in a run of `kind` (none for cleanup, commit, reverse)."""
    if kind is None:
        return []
    return [a for a in actions if kind in a.run_on]


@dataclass(frozen=True)
class ScriptAction:
    """A plan's script action as compared to decide whether a change needs an admin: where it
    runs and what it runs (its name and instructions left out)."""

    at: str
    action_id: str
    script: str
    args: tuple[str, ...]
    timeout_seconds: float | None
    run_on: tuple[FailoverKind, ...]


def script_actions(groups: Iterable[PlanGroup]) -> list[ScriptAction]:
    """A plan's script actions, as compared to decide whether a change needs an admin: an
    operator may change a plan's items and manual actions, not what it runs."""
    found = [
        ScriptAction(
            at=where,
            action_id=a.action_id,
            script=a.script or "",
            args=tuple(a.args),
            timeout_seconds=a.timeout_seconds,
            run_on=tuple(a.run_on),
        )
        for g in groups
        for where, actions in (("pre", g.pre_actions), ("post", g.post_actions))
        for a in actions
        if a.kind == "script"
    ]
    return sorted(found, key=lambda a: (a.action_id, a.at))


def script_file(folder: Path, name: str) -> Path:
    """The script `name` of the scripts folder, resolved after following links; raises
    ValueError unless it is an executable file inside the folder."""
    if not re.fullmatch(SCRIPT_NAME, name) or ".." in name:
        raise ValueError(f"'{name}' is not a script name (a file name, no path)")
    root = folder.resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root) or path == root:
        raise ValueError(f"script '{name}' resolves outside the scripts folder")
    if not path.is_file():
        raise ValueError(f"script '{name}' is not a file in the scripts folder {folder}")
    if not os.access(path, os.X_OK):
        raise ValueError(f"script '{name}' in the scripts folder is not executable")
    return path


def script_env(path_var: str, values: dict[str, str]) -> dict[str, str]:
    """A script action's whole environment: PATH and the DR_PLAN_* values, nothing of the
    service's own (no tokens, no database URL)."""
    return {"PATH": path_var, **{f"DR_PLAN_{k.upper()}": v for k, v in values.items()}}


SECRET_NAME = re.compile(r"TOKEN|PASSWORD|SECRET|KEY|CREDENTIAL|DATABASE_URL|DSN", re.IGNORECASE)
SECRET_TEXT = re.compile(
    r"(?i)(bearer\s+|(?:token|password|passwd|secret|key|credential)\s*[=:]\s*)\S+"
    r"|\bdr[tkc]_[A-Za-z0-9_-]{12,}"
    r"|[a-z][a-z0-9+.-]*://[^/\s:@]+:[^@\s]+@"
)


def redact(text: str, secrets: Iterable[str]) -> str:
    """`text` with every known secret value and anything shaped like a credential (bearer
    tokens, key=value secrets, passwords in URLs) replaced by [redacted]."""
    for secret in sorted({s for s in secrets if len(s) >= 6}, key=len, reverse=True):
        text = text.replace(secret, "[redacted]")
    return SECRET_TEXT.sub(lambda m: (m.group(1) or "") + "[redacted]", text)


def environment_secrets(environ: dict[str, str]) -> list[str]:
    """The values of the service's environment variables that are secrets by name."""
    return [v for k, v in environ.items() if SECRET_NAME.search(k) and v]


def excerpt(data: bytes, limit: int, secrets: Iterable[str]) -> str:
    """The last `limit` characters of a script's output, secrets removed."""
    text = redact(data.decode(errors="replace"), secrets)
    return text if len(text) <= limit else "[...]" + text[-limit:]


def script_failure(returncode: int | None, stderr: str, timed_out: bool, timeout: float) -> str:
    """Why a script action failed ('' if it succeeded): a timeout, a non-zero exit or any
    output on stderr."""
    if timed_out:
        return f"timed out after {timeout:g} s"
    if returncode:
        return f"exited with status {returncode}" + (f": {stderr.strip()}" if stderr else "")
    if stderr.strip():
        return f"wrote to stderr: {stderr.strip()}"
    return ""


# ------------------------------------------------------------------ points and NICs


@dataclass(frozen=True)
class PointRequest:
    choice: PointChoice
    cycle_seq: int | None


def point_request(choice: PointChoice, cycle_seq: int | None) -> PointRequest:
    if choice is PointChoice.CHOSEN and cycle_seq is None:
        raise InvalidRequest("choose a recovery point: pass cycle_seq")
    return PointRequest(choice, cycle_seq if choice is PointChoice.CHOSEN else None)


class PointNotRetained(FailoverRefused):
    """The chosen recovery point was taken but retention has removed it."""


@dataclass(frozen=True)
class RetainedPoints:
    """The cycles of an item's retained recovery points (and which are app-consistent); empty
    when none are known (points taken before they were listed)."""

    seqs: frozenset[int] = frozenset()
    app_seqs: frozenset[int] = frozenset()

    def describe(self) -> str:
        if not self.seqs:
            return "none"
        n = len(self.seqs)
        return f"{min(self.seqs)}..{max(self.seqs)} ({n} point{'s' if n != 1 else ''})"


def check_point_exists(
    item: ItemRow,
    choice: str | None,
    cycle_seq: int | None,
    retained: RetainedPoints | None = None,
) -> None:
    """The point a test or unplanned failover asks for exists, checked when the job is asked
    for (not when its materialise step runs): a chosen cycle past the item's latest point is
    NotFound, one that retention removed PointNotRetained (naming the retained range), a
    latest app-consistent point where none was taken a refusal."""
    choice = choice or PointChoice.LATEST.value
    latest = item.latest_seq
    if choice == PointChoice.CHOSEN.value and latest is not None and cycle_seq is not None:
        seq = cycle_seq
        if seq > latest:
            raise NotFound(
                f"{item.vm_name} has no recovery point {seq}: its latest is {latest}; "
                "list the retained points (GET .../protected-items/{item_id}/recovery-points) "
                "and choose one of them"
            )
        if retained is not None and retained.seqs and seq not in retained.seqs:
            raise PointNotRetained(
                f"{item.vm_name} has no retained recovery point {seq}: the retained points "
                f"are {retained.describe()}; list them (GET "
                ".../protected-items/{item_id}/recovery-points) and choose one of them"
            )
    app_pruned = retained is not None and bool(retained.seqs) and not retained.app_seqs
    if choice == PointChoice.LATEST_APP_CONSISTENT.value and (
        item.latest_app_seq is None or app_pruned
    ):
        raise FailoverRefused(
            f"{item.vm_name} has no app-consistent recovery point yet: choose latest or a "
            "chosen point, or wait for the policy's app-consistent snapshot"
        )


def data_loss_seconds(failover_at: datetime, source_time: datetime) -> float:
    """The data-loss window: what the source did after the point used is lost."""
    return max(0.0, (failover_at - source_time).total_seconds())


def zero_data_loss(
    materialised: Mapping[str, str], final_roots: Mapping[str, str]
) -> tuple[bool, str]:
    """Planned failover's proof: every materialised disk's Merkle root equals the root the
    source agent computed after its final cycle."""
    if not final_roots:
        return False, "the source agent reported no final roots"
    bad = [
        f"{disk}: replica {materialised.get(disk, 'missing')[:12]} != source {root[:12]}"
        for disk, root in sorted(final_roots.items())
        if materialised.get(disk) != root
    ]
    if set(materialised) - set(final_roots):
        bad.append(f"disks without a source root: {sorted(set(materialised) - set(final_roots))}")
    return (not bad), "; ".join(bad)


@dataclass(frozen=True)
class NetworkMapping:
    """A network mapping: NICs on the source network fail over to the target network."""

    source_network_id: str
    target_network_id: str


def mapped_network(
    network_id: str | None,
    mappings: Sequence[NetworkMapping],
    networks: Mapping[str, VmNetwork],
) -> VmNetwork | None:
    """The target network a NIC's network maps to. A mapping also works backwards (failback:
    a NIC on the mapping's target network lands on its source network)."""
    if network_id is None:
        return None
    for m in mappings:
        if m.source_network_id == network_id:
            return networks.get(m.target_network_id)
    for m in mappings:
        if m.target_network_id == network_id:
            return networks.get(m.source_network_id)
    return None


def failover_nics(
    nics: Sequence[Nic],
    mappings: Sequence[NetworkMapping],
    networks: Mapping[str, VmNetwork],
    used_ips: AbstractSet[str],
    test_network: VmNetwork | None = None,
    test: bool = False,
) -> list[NicAttachment]:
    """The recovery VM's NICs: by network mapping and the IP rules (docs/reference.md), or, for a
    test failover, all on the test network (none: not connected)."""
    used = set(used_ips)
    out = []
    for nic in nics:
        target = test_network if test else mapped_network(nic.network_id, mappings, networks)
        placed = failover_nic_target(nic, target, used)
        if placed.ip_address:
            used.add(placed.ip_address)
        out.append(
            NicAttachment(
                nic_id=nic.nic_id,
                network_id=placed.network_id if placed.connected else None,
                subnet=placed.subnet,
                ip_mode=placed.ip_mode.value,
                ip_address=placed.ip_address,
            )
        )
    return out
