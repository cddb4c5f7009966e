"""The durable workflow engine. A job runs as a sequence of steps; each step is a task row
written to PostgreSQL before its effect (a command to an agent, a request to the replication
service, a local change), and marked done with its result before anything relies on it. Every
command a step sends carries the step's idempotency key (`tasks.command_id`), so when a
restarted service resumes an unfinished job, a step that was recorded (and maybe sent) is sent
again with the same key, the receiver answers with its first result, and nothing happens twice.

Crash points (`DR_CRASH_AT`): `failover.<step>.recorded` (task written, effect not done),
`failover.<step>.sent` (effect done, answer not collected) and `failover.<step>.done`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeVar

import asyncpg
from prometheus_client import Counter, Gauge, Histogram
from pydantic import BaseModel, ConfigDict

from services.failover import job_repository as jobs_repo
from services.failover import repository as repo
from services.failover.config import FailoverSettings
from services.failover.domain.jobs import StepAction, command_id_for, resume_point, step_action
from services.failover.domain.plans import PlanAction
from services.failover.job import ItemResult, Job, JobResult, WaitingFor
from services.failover.unit_of_work import PgUnitOfWork
from shared.faults import crash_point
from shared.schemas.failover import JobState

log = logging.getLogger(__name__)

JOBS = Counter(
    "dr_failover_jobs_total",
    "Finished failover jobs by operation and final state",
    ["type", "state"],
)
JOB_SECONDS = Histogram(
    "dr_failover_job_seconds",
    "Duration of finished failover jobs",
    ["type"],
    buckets=(1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600),
)
JOBS_RUNNING = Gauge("dr_failover_jobs_running", "Failover jobs running in this process")
RESUMED = Counter("dr_failover_jobs_resumed_total", "Unfinished jobs resumed after a restart")


class StepFailed(Exception):
    """A step could not be done: the task (and maybe the job) fails with this error."""

    def __init__(self, error: str, cause: str = "", recommendation: str = "") -> None:
        super().__init__(error)
        self.error = error
        self.cause = cause
        self.recommendation = recommendation


class Notifier:
    """Wakes waiting steps when an answer or approval arrives (they also re-check on a timer,
    since the wake-up may come before the answer's transaction commits)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def poke(self, delay: float = 0.05) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        loop.call_later(delay, self._fire)

    def _fire(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout)


class StepResult(BaseModel):
    """What a step records as its task's detail (JSON) and returns, also when it is skipped
    on a resume (read back as the same type)."""

    model_config = ConfigDict(extra="forbid")


class Approval(StepResult):
    approved_by: str
    comment: str = ""


R = TypeVar("R", bound=BaseModel)
# a step's effect (its command or local change; None: the wait gives the result) and its wait
Effect = Callable[[uuid.UUID], Awaitable[R | None]]
Wait = Callable[[uuid.UUID], Awaitable[R]]
# a job's workflow returns the job's result (the engine adds the items' results)
Workflow = Callable[["Run"], Awaitable[JobResult]]


@dataclass
class Run:
    """One execution of a job (fresh after every restart); steps are resumed from the DB."""

    engine: Engine
    job: Job
    errors: int = 0
    item_results: dict[str, ItemResult] = field(default_factory=dict)

    @property
    def job_id(self) -> uuid.UUID:
        return self.job.job_id

    @property
    def vault_id(self) -> uuid.UUID:
        return self.job.vault_id

    @property
    def pool(self) -> asyncpg.Pool:
        return self.engine.pool

    @property
    def settings(self) -> FailoverSettings:
        return self.engine.settings

    async def step(
        self,
        key: str,
        name: str,
        result_type: type[R],
        effect: Effect[R] | None = None,
        wait: Wait[R] | None = None,
        *,
        crash: str = "step",
    ) -> R:
        """Run step `key` once: record, effect, answer, done. Returns the step's result."""
        task = await jobs_repo.task(self.pool, self.job_id, key)
        answered = False
        if task is not None and wait is not None:
            answered = await repo.answer(self.pool, task.command_id) is not None
        action = step_action(task.state if task else None, answered)
        if action is StepAction.SKIP:
            assert task is not None
            return result_type.model_validate(task.detail)
        if action is StepAction.FAILED:
            assert task is not None
            raise StepFailed(task.error or "failed", task.cause or "", task.recommendation or "")
        if task is None:
            command_id = command_id_for(self.job_id, key, self.job.run_no)
            async with self.pool.acquire() as conn, conn.transaction():
                task = await jobs_repo.insert_task(
                    conn, self.vault_id, self.job_id, key, name, command_id
                )
            crash_point(f"failover.{crash}.recorded")
        command_id = task.command_id
        try:
            result: R | None = None
            if effect is not None and action is not StepAction.WAIT:
                result = await effect(command_id)
            crash_point(f"failover.{crash}.sent")
            if wait is not None:
                result = await wait(command_id)
        except StepFailed as exc:
            await self.fail_task(key, exc)
            raise
        if result is None:
            result = result_type.model_validate({})
        await self.finish_task(key, result)
        crash_point(f"failover.{crash}.done")
        return result

    async def fail_task(self, key: str, exc: StepFailed) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await jobs_repo.fail_task(
                conn,
                self.vault_id,
                self.job_id,
                key,
                error=exc.error,
                cause=exc.cause or None,
                recommendation=exc.recommendation or None,
            )

    async def finish_task(self, key: str, result: BaseModel) -> None:
        detail = result.model_dump(mode="json")
        async with self.engine.uow() as uow:
            await jobs_repo.finish_task(uow.conn, self.vault_id, self.job_id, key, detail)
            job = await self._load(uow)
            job.tasks_done(await uow.jobs.succeeded_tasks(self.job_id))
            await uow.commit()
        self.job = job

    async def _load(self, uow: PgUnitOfWork) -> Job:
        job = await uow.jobs.get(self.job_id)
        if job is None:
            raise StepFailed(f"job {self.job_id} is gone", "its row was deleted")
        return job

    async def wait_answer(
        self,
        command_id: uuid.UUID,
        what: str,
        *,
        timeout: float | None = None,
        recommendation: str = "",
    ) -> dict[str, object]:
        """The answer (as its answerer sent it: the caller reads it into its type) to the
        command or request `command_id`; StepFailed if it failed or didn't come in time."""
        limit = timeout or self.settings.step_timeout_seconds
        deadline = time.monotonic() + limit
        while True:
            found = await repo.answer(self.pool, command_id)
            if found is not None:
                if not found.ok:
                    raise StepFailed(
                        f"{what} failed: {found.error}",
                        cause=f"the {found.kind} answer reported an error",
                        recommendation=recommendation or "fix the cause, then restart the job",
                    )
                return dict(found.result)
            if time.monotonic() > deadline:
                raise StepFailed(
                    f"{what}: no answer within {limit:g} s",
                    cause="the agent or the replication service is down, disconnected or slow",
                    recommendation="check the agent's connection state and the replication "
                    "service, then restart the job",
                )
            await self.engine.notifier.wait(
                min(self.settings.poll_seconds, deadline - time.monotonic() + 0.01)
            )

    async def wait_until(
        self, probe: Callable[[], Awaitable[R | None]], what: str, timeout: float
    ) -> R:
        deadline = time.monotonic() + timeout
        while True:
            found = await probe()
            if found is not None:
                return found
            if time.monotonic() > deadline:
                raise StepFailed(
                    f"{what}: not reached within {timeout:g} s",
                    cause="the replication service did not report it in time",
                    recommendation="check the item's replication state, then restart the job",
                )
            await self.engine.notifier.wait(self.settings.poll_seconds)

    async def manual(self, key: str, action: PlanAction) -> Approval:
        """A manual action: the job waits in `waiting_for_input` until an operator approves."""
        task = await jobs_repo.task(self.pool, self.job_id, key)
        if task is not None and task.state == JobState.SUCCEEDED.value:
            return Approval.model_validate(task.detail)
        waiting = WaitingFor(
            action_id=action.action_id,
            action_key=key,
            name=action.name,
            instructions=action.instructions,
        )
        async with self.engine.uow() as uow:
            if task is None:
                cid = command_id_for(self.job_id, key, self.job.run_no)
                await jobs_repo.insert_task(
                    uow.conn,
                    self.vault_id,
                    self.job_id,
                    key,
                    f"manual action: {action.name}",
                    cid,
                    JobState.WAITING_FOR_INPUT,
                )
            job = await self._load(uow)
            job.wait_for(waiting)
            await uow.commit()
        self.job = job
        crash_point("failover.manual.waiting")
        while True:
            approved = await jobs_repo.approval(self.pool, self.job_id, key)
            if approved is not None:
                break
            await self.engine.notifier.wait(self.settings.poll_seconds * 4)
        result = Approval(approved_by=approved.approved_by, comment=approved.comment)
        async with self.engine.uow() as uow:
            job = await self._load(uow)
            job.input_given()
            await uow.commit()
        self.job = job
        await self.finish_task(key, result)
        return result


class Engine:
    """Runs jobs as asyncio tasks; `resume_all()` picks up every unfinished job at start-up."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        settings: FailoverSettings,
        workflows: dict[str, Workflow],
        notifier: Notifier | None = None,
    ) -> None:
        self.pool = pool
        self.settings = settings
        self.workflows = workflows
        self.notifier = notifier or Notifier()
        self.running: dict[uuid.UUID, asyncio.Task[None]] = {}

    def submit(self, job_id: uuid.UUID) -> None:
        if job_id in self.running and not self.running[job_id].done():
            return
        task = asyncio.create_task(self.run_job(job_id), name=f"job-{job_id}")
        self.running[job_id] = task
        task.add_done_callback(lambda _t: self.running.pop(job_id, None))

    async def resume_all(self) -> int:
        jobs = await jobs_repo.unfinished_jobs(self.pool)
        for found in jobs:
            if found.state is not JobState.NOT_STARTED:
                tasks = await jobs_repo.tasks(self.pool, found.job_id)
                async with self.uow() as uow:
                    job = await uow.jobs.get(found.job_id)
                    if job is not None:
                        job.resumed(resume_point(tasks))
                    await uow.commit()
                RESUMED.inc()
            self.submit(found.job_id)
        return len(jobs)

    def uow(self) -> PgUnitOfWork:
        return PgUnitOfWork(self.pool)

    async def stop(self) -> None:
        for task in list(self.running.values()):
            task.cancel()
        await asyncio.gather(*self.running.values(), return_exceptions=True)

    async def run_job(self, job_id: uuid.UUID) -> None:
        async with self.uow() as uow:
            job = await uow.jobs.get(job_id)
            if job is None or job.finished:
                return
            if job.state is JobState.NOT_STARTED:
                job.start(datetime.now(UTC))
            await uow.commit()
        run = Run(self, job)
        JOBS_RUNNING.inc()
        failure: StepFailed | None = None
        result = JobResult()
        try:
            result = await self.workflows[job.kind](run)
        except StepFailed as exc:
            failure = exc
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("workflow crashed", extra={"job_id": str(job_id)})
            failure = StepFailed(
                f"internal error: {type(exc).__name__}: {exc}",
                cause="a bug or an unexpected state in the failover service",
                recommendation="see the failover service's log; restart the job",
            )
        finally:
            JOBS_RUNNING.dec()
        await self.finish(run, failure, result)

    async def finish(self, run: Run, failure: StepFailed | None, result: JobResult) -> None:
        now = datetime.now(UTC)
        async with self.uow() as uow:
            job = await uow.jobs.get(run.job_id)
            if job is None:
                return
            job.finish(
                now,
                failure=(failure.error, failure.cause, failure.recommendation) if failure else None,
                errors=run.errors,
                result=(
                    result.model_copy(update={"items": dict(run.item_results)})
                    if run.item_results
                    else result
                ),
            )
            await uow.commit()
        state = job.state
        JOBS.labels(job.operation.value, state.value).inc()
        started = job.started_at or job.created_at or now
        JOB_SECONDS.labels(job.operation.value).observe((now - started).total_seconds())
        log.log(
            logging.WARNING if failure else logging.INFO,
            "job finished",
            extra={
                "job_id": str(run.job_id),
                "operation": job.operation.value,
                "state": state.value,
                "error": failure.error if failure else None,
            },
        )
