"""Failover jobs: the operations, the states a job ends in, which may be restarted, its
progress, and the durable-step decisions (what a resumed step does, its idempotency key)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from shared.schemas.failover import FailoverKind, JobState

NAMESPACE = uuid.UUID("6f1c4a52-2f0e-4d84-9a57-0b3c2d51f1e1")


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


UNFINISHED = frozenset({JobState.NOT_STARTED, JobState.IN_PROGRESS, JobState.WAITING_FOR_INPUT})


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
