"""The failover job as an aggregate: its state changes are methods that check the rule, change
the state and record what happened (history lines, `JobChanged` events). Pure: a repository
loads and saves it (services/failover/job_repository.py) through a unit of work
(services/failover/unit_of_work.py) that writes the row, its history and the outbox together.

States: not_started -> in_progress <-> waiting_for_input -> succeeded | failed |
completed_with_errors; a failed job of a restartable operation goes back to in_progress with a
new run number (new idempotency keys for the steps that did not succeed)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from services.failover.domain.errors import FailoverRefused
from services.failover.domain.jobs import Operation, can_restart, final_state, is_finished
from services.failover.domain.jobs import progress as progress_percent
from services.failover.domain.plans import PlanGroup
from shared.schemas.envelope import EventPayload
from shared.schemas.failover import JobChanged, JobState


class JobParams(BaseModel):
    """What a job was asked to do; each operation reads the options that apply to it. Only the
    options that were given are stored (and shown)."""

    model_config = ConfigDict(extra="forbid")

    choice: str | None = None
    cycle_seq: int | None = None
    network: str | None = None
    notes: str | None = None
    shutdown_source: bool | None = None
    force_full_resync: bool | None = None
    target_site: str | None = None
    items: list[str] = Field(default_factory=list)
    groups: list[PlanGroup] | None = None
    plan_name: str | None = None

    def stored(self) -> dict[str, object]:
        """The options that were given, as stored; a plan's groups whole (defaults too)."""
        out: dict[str, object] = self.model_dump(
            mode="json", exclude_unset=True, exclude={"groups"}
        )
        if "groups" in self.model_fields_set:
            groups = self.groups
            out["groups"] = None if groups is None else [g.model_dump(mode="json") for g in groups]
        return out


class ItemResult(BaseModel):
    """What a job did to one of its items, as the job's result shows it; only the fields the
    operation set are stored (and shown)."""

    model_config = ConfigDict(extra="forbid")

    vm_name: str
    state: str
    error: str | None = None
    errors: list[str] | None = None
    test_vm: str | None = None
    test_network_id: str | None = None
    cycle_seq: int | None = None
    source_time: str | None = None
    failed_over_at: str | None = None
    data_loss_seconds: float | None = None
    zero_data_loss: bool | None = None
    recovery_vm: str | None = None
    new_item_id: str | None = None
    seeded: bool | None = None


class JobResult(BaseModel):
    """A finished job's result: per item (id -> what was done) and, for a plan, its groups."""

    model_config = ConfigDict(extra="forbid")

    groups: int | None = None
    items: dict[str, ItemResult] | None = None

    def stored(self) -> dict[str, object]:
        out: dict[str, object] = self.model_dump(mode="json", exclude_unset=True)
        return out


class WaitingFor(BaseModel):
    """The manual action a job waits for."""

    model_config = ConfigDict(extra="forbid")

    action_id: str
    action_key: str
    name: str
    instructions: str = ""


@dataclass
class Job:
    job_id: uuid.UUID
    vault_id: uuid.UUID
    operation: Operation
    target_kind: str
    target: str
    params: JobParams
    state: JobState = JobState.NOT_STARTED
    progress: int = 0
    expected_tasks: int = 1
    error: str | None = None
    cause: str | None = None
    recommendation: str | None = None
    run_no: int = 1
    restarts: int = 0
    waiting_for: WaitingFor | None = None
    result: JobResult = field(default_factory=JobResult)
    created_by: str = ""
    created_at: datetime | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    updated_at: datetime | None = None
    # recorded by the methods, written (and cleared) by the repository
    events: list[EventPayload] = field(default_factory=list, repr=False, compare=False)
    new_history: list[str] = field(default_factory=list, repr=False, compare=False)
    drop_unfinished_tasks: bool = field(default=False, repr=False, compare=False)

    # ------------------------------------------------------------ creation

    @classmethod
    def create(
        cls,
        vault_id: uuid.UUID,
        operation: Operation,
        *,
        target_kind: str,
        target: str,
        params: JobParams,
        expected_tasks: int,
        created_by: str,
        job_id: uuid.UUID | None = None,
    ) -> Job:
        job = cls(
            job_id=job_id or uuid.uuid4(),
            vault_id=vault_id,
            operation=operation,
            target_kind=target_kind,
            target=target,
            params=params,
            expected_tasks=expected_tasks,
            created_by=created_by,
        )
        job._record(f"{operation.value} created by {created_by or 'system'}")
        return job

    # ------------------------------------------------------------ the run

    @property
    def kind(self) -> str:
        """The workflow that runs it: `item:<operation>` or `plan:<operation>`."""
        return f"{self.target_kind}:{self.operation.value}"

    @property
    def finished(self) -> bool:
        return is_finished(self.state)

    def start(self, now: datetime) -> None:
        if self.state is not JobState.NOT_STARTED:
            raise FailoverRefused(f"job {self.job_id} has started already ({self.state.value})")
        self.state = JobState.IN_PROGRESS
        self.started_at = now
        self._record("started")

    def resumed(self, where: str) -> None:
        """The service restarted while the job ran; it goes on from `where`."""
        self.restarts += 1
        self._record(f"service restarted: job resumed ({where})")

    def tasks_done(self, done: int) -> None:
        self.progress = progress_percent(done, self.expected_tasks)
        self._record()

    def wait_for(self, waiting: WaitingFor) -> None:
        self.state = JobState.WAITING_FOR_INPUT
        self.waiting_for = waiting
        self._record()

    def approve(self, action_id: str, by: str) -> str:
        """An operator approves the manual action the job waits for; returns its step key."""
        waiting = self.waiting_for
        if self.state is not JobState.WAITING_FOR_INPUT or waiting is None:
            raise FailoverRefused(
                f"job {self.job_id} is not waiting for input (it is {self.state.value})"
            )
        if waiting.action_id != action_id:
            raise FailoverRefused(
                f"job {self.job_id} waits for action '{waiting.action_id}', not '{action_id}'"
            )
        self.new_history.append(f"manual action '{waiting.name}' approved by {by}")
        return waiting.action_key

    def input_given(self) -> None:
        self.state = JobState.IN_PROGRESS
        self.waiting_for = None
        self._record()

    def restart(self, by: str, *, items_busy: bool) -> None:
        """An operator re-runs a failed job: failed steps run again with new idempotency keys
        (a new run number), done steps stand."""
        why = can_restart(self.operation, self.state)
        if why:
            raise FailoverRefused(why)
        if items_busy:
            raise FailoverRefused("another job holds the job's items; wait for it to finish")
        self.state = JobState.IN_PROGRESS
        self.run_no += 1
        self.restarts += 1
        self.error = self.cause = self.recommendation = None
        self.ended_at = None
        self.drop_unfinished_tasks = True
        self._record(f"restarted by {by}")

    def finish(
        self,
        now: datetime,
        *,
        failure: tuple[str, str, str] | None,
        errors: int,
        result: JobResult,
    ) -> None:
        """The end of a run: `failure` (error, cause, recommendation) stopped it; `errors`
        steps failed in a run that goes on past errors."""
        self.state = final_state(self.operation, failed=failure is not None, errors=errors)
        self.ended_at = now
        self.waiting_for = None
        self.result = result
        if failure is not None:
            self.error, cause, recommendation = failure
            self.cause, self.recommendation = cause or None, recommendation or None
        else:
            self.progress = 100
            if self.state is JobState.COMPLETED_WITH_ERRORS:
                self.error = f"{errors} error(s); see the failed tasks"
                self.cause = "some steps failed; an unplanned run goes on past errors"
                self.recommendation = "check the failed tasks and the items they name"
        self._record(f"finished: {self.state.value}")

    # ------------------------------------------------------------ events

    def _record(self, history: str | None = None) -> None:
        if history is not None:
            self.new_history.append(history)
        self.events.append(
            JobChanged(
                job_id=self.job_id,
                operation=self.operation.value,
                target=self.target,
                state=self.state,
                progress=self.progress,
                error=self.error,
                cause=self.cause,
                recommendation=self.recommendation,
                restarts=self.restarts,
            )
        )
