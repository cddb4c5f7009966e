"""Command handlers of the failover service against a fake unit of work (no database): load,
decide through the job aggregate, commit; refusals leave nothing written."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pytest

from services.failover import handlers
from services.failover.commands import ApproveAction, RestartJob, StartItemOperation
from services.failover.config import FailoverSettings
from services.failover.domain.errors import FailoverRefused, NotFound
from services.failover.domain.items import ItemFailoverState, ItemRow
from services.failover.domain.jobs import Operation
from services.failover.domain.points import PointNotRetained, RetainedPoints
from services.failover.item_failover import ItemFailover
from services.failover.job import Job, JobParams, WaitingFor
from services.failover.workflow import Notifier
from shared.schemas.failover import JobState, MaterialisedDisk
from tests.support.failover_rows import item_row

NOW = datetime(2026, 1, 2, tzinfo=UTC)
VAULT = uuid.uuid4()


class FakeJobs:
    def __init__(self, jobs: list[Job], busy: dict[str, str] | None = None) -> None:
        self.rows = {j.job_id: j for j in jobs}
        self.busy = busy or {}
        self.approvals: list[tuple[uuid.UUID, str, str, str]] = []
        self.locked: list[uuid.UUID] = []

    async def get(self, job_id: uuid.UUID) -> Job | None:
        return self.rows.get(job_id)

    def add(self, job: Job) -> None:
        self.rows[job.job_id] = job

    async def lock_vault(self, vault_id: uuid.UUID) -> None:
        self.locked.append(vault_id)

    async def busy_items(self, vault_id: uuid.UUID, item_ids: list[str]) -> dict[str, str]:
        return {i: op for i, op in self.busy.items() if i in item_ids}

    async def approve(self, job_id: uuid.UUID, action_key: str, by: str, comment: str) -> None:
        self.approvals.append((job_id, action_key, by, comment))

    async def succeeded_tasks(self, job_id: uuid.UUID) -> int:
        return 0


class FakeReads:
    def __init__(
        self,
        items: list[ItemRow] | None = None,
        views: dict[uuid.UUID, ItemFailover] | None = None,
        retained: dict[uuid.UUID, RetainedPoints] | None = None,
    ) -> None:
        self.items = {i.item_id: i for i in items or []}
        self.views = views or {}
        self.retained = retained or {}

    async def item(self, item_id: uuid.UUID) -> ItemRow | None:
        return self.items.get(item_id)

    async def view(self, item_id: uuid.UUID) -> ItemFailover | None:
        return self.views.get(item_id)

    async def reversed_from(self, item_id: uuid.UUID) -> bool:
        return False

    async def retained_points(self, item_id: uuid.UUID) -> RetainedPoints:
        return self.retained.get(item_id, RetainedPoints())

    async def cloud_site(self, vault_id: uuid.UUID, cloud_id: str) -> str | None:
        return {"c-recovery": "recovery"}.get(cloud_id)


class FakeUnitOfWork:
    def __init__(self, jobs: FakeJobs, reads: FakeReads | None = None) -> None:
        self._jobs = jobs
        self._reads = reads or FakeReads()
        self.committed = False
        self.saved: list[Job] = []

    @property
    def jobs(self) -> FakeJobs:
        return self._jobs

    @property
    def reads(self) -> FakeReads:
        return self._reads

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    async def commit(self) -> None:
        self.committed = True
        for job in self._jobs.rows.values():
            if job.events or job.new_history:
                self.saved.append(job)


class FakeEngine:
    def __init__(self) -> None:
        self.submitted: list[uuid.UUID] = []

    def submit(self, job_id: uuid.UUID) -> None:
        self.submitted.append(job_id)


def context(uow: FakeUnitOfWork) -> tuple[handlers.Context, FakeEngine]:
    engine = FakeEngine()
    ctx = handlers.Context(
        pool=None,  # type: ignore[arg-type]
        settings=FailoverSettings(),
        engine=engine,  # type: ignore[arg-type]
        notifier=Notifier(),
        unit_of_work=lambda: uow,
    )
    return ctx, engine


def job(state: JobState, operation: Operation = Operation.PLANNED_FAILOVER) -> Job:
    j = Job.create(
        VAULT,
        operation,
        target_kind="item",
        target="i1",
        params=JobParams(items=["i1"]),
        expected_tasks=3,
        created_by="t",
    )
    j.state = state
    j.events.clear()
    j.new_history.clear()
    return j


async def test_approve_records_the_approval_and_commits() -> None:
    waiting = job(JobState.WAITING_FOR_INPUT)
    waiting.waiting_for = WaitingFor(action_id="a1", action_key="g1:pre:a1", name="Check")
    uow = FakeUnitOfWork(FakeJobs([waiting]))
    ctx, _ = context(uow)
    result: Any = await handlers.handle(
        ctx, ApproveAction(VAULT, waiting.job_id, "a1", "op", "looks fine")
    )
    assert result is waiting and uow.committed
    assert uow.jobs.approvals == [(waiting.job_id, "g1:pre:a1", "op", "looks fine")]
    assert waiting.new_history == ["manual action 'Check' approved by op"]


async def test_approve_refuses_a_job_of_another_vault_or_not_waiting() -> None:
    running = job(JobState.IN_PROGRESS)
    uow = FakeUnitOfWork(FakeJobs([running]))
    ctx, _ = context(uow)
    with pytest.raises(NotFound):
        await handlers.approve(ctx, ApproveAction(uuid.uuid4(), running.job_id, "a1", "op"))
    with pytest.raises(FailoverRefused, match="not waiting for input"):
        await handlers.approve(ctx, ApproveAction(VAULT, running.job_id, "a1", "op"))
    assert not uow.committed and not uow.jobs.approvals


async def test_restart_runs_a_failed_job_again_under_the_vault_lock() -> None:
    failed = job(JobState.FAILED)
    uow = FakeUnitOfWork(FakeJobs([failed]))
    ctx, engine = context(uow)
    restarted = await handlers.restart(ctx, RestartJob(VAULT, failed.job_id, "op"))
    assert restarted.run_no == 2 and restarted.state is JobState.IN_PROGRESS
    assert uow.committed and uow.jobs.locked == [VAULT]
    assert engine.submitted == [failed.job_id]


async def test_restart_is_refused_while_another_job_holds_the_items() -> None:
    failed = job(JobState.FAILED)
    uow = FakeUnitOfWork(FakeJobs([failed], busy={"i1": "test_failover"}))
    ctx, engine = context(uow)
    with pytest.raises(FailoverRefused, match="another job holds"):
        await handlers.restart(ctx, RestartJob(VAULT, failed.job_id, "op"))
    assert not uow.committed and engine.submitted == [] and failed.run_no == 1


async def test_restart_is_refused_for_a_succeeded_job_or_an_unknown_one() -> None:
    done = job(JobState.SUCCEEDED)
    uow = FakeUnitOfWork(FakeJobs([done]))
    ctx, engine = context(uow)
    with pytest.raises(FailoverRefused, match="only a failed job"):
        await handlers.handle(ctx, RestartJob(VAULT, done.job_id, "op"))
    with pytest.raises(NotFound):
        await handlers.handle(ctx, RestartJob(VAULT, uuid.uuid4(), "op"))
    assert engine.submitted == []


def test_every_command_type_has_a_handler() -> None:
    from typing import get_args

    from services.failover.commands import Command

    assert set(get_args(Command)) == set(handlers.COMMAND_HANDLERS)


def protected_item(**over: Any) -> ItemRow:
    return item_row(**{"vault_id": VAULT, **over})


def asking_test_failover(item: ItemRow, seq: int) -> StartItemOperation:
    params = JobParams(choice="chosen", cycle_seq=seq, network="none")
    return StartItemOperation(VAULT, item.item_id, Operation.TEST_FAILOVER, params, "op")


async def test_starting_a_test_failover_creates_the_job_and_hands_it_to_the_engine() -> None:
    item = protected_item()
    kept = {item.item_id: RetainedPoints(seqs=frozenset({7, 8, 9}))}
    uow = FakeUnitOfWork(FakeJobs([]), FakeReads([item], retained=kept))
    ctx, engine = context(uow)
    job = await handlers.handle(ctx, asking_test_failover(item, 8))
    assert uow.committed and engine.submitted == [job.job_id]
    assert job.state is JobState.NOT_STARTED and job.kind == "item:test_failover"
    assert job.params.items == [str(item.item_id)] and job.params.target_site == "recovery"
    assert job.expected_tasks == 3 and job.new_history == ["test_failover created by op"]


async def test_a_pruned_or_busy_item_is_refused_before_any_job_is_created() -> None:
    item = protected_item()
    kept = {item.item_id: RetainedPoints(seqs=frozenset({7, 8, 9}))}
    uow = FakeUnitOfWork(FakeJobs([]), FakeReads([item], retained=kept))
    ctx, engine = context(uow)
    with pytest.raises(PointNotRetained, match=r"retained points are 7\.\.9 \(3 points\)"):
        await handlers.handle(ctx, asking_test_failover(item, 5))
    with pytest.raises(NotFound, match="latest is 9"):
        await handlers.handle(ctx, asking_test_failover(item, 10))
    with pytest.raises(NotFound, match="not found in this vault"):
        await handlers.handle(ctx, asking_test_failover(protected_item(vault_id=uuid.uuid4()), 8))
    busy = FakeUnitOfWork(
        FakeJobs([], busy={str(item.item_id): "test_failover"}), FakeReads([item])
    )
    ctx, engine = context(busy)
    with pytest.raises(FailoverRefused, match="a test failover of web01 is already running"):
        await handlers.handle(ctx, asking_test_failover(item, 8))
    assert not uow.committed and not busy.committed and engine.submitted == []
    assert not uow.jobs.rows


async def test_a_reverse_is_accepted_without_looking_at_the_old_primarys_files(
    tmp_path: Path,
) -> None:
    """The old primary's disks are asked of its host by the job; the request checks the
    item's state only (this process sees no site's files)."""
    item = protected_item(state="failed_over")
    view = ItemFailover(item.item_id, VAULT, ItemFailoverState.COMMITTED)
    view.info.source_disks = {"d0": str(tmp_path / "not-on-this-machine" / "d0.vhdx")}
    view.info.recovery_disks = [
        MaterialisedDisk(disk_id="d0", path="/r/web01/d0.vhdx", size_bytes=1, merkle_root="00")
    ]
    uow = FakeUnitOfWork(FakeJobs([]), FakeReads([item], {item.item_id: view}))
    ctx, engine = context(uow)
    reverse = StartItemOperation(VAULT, item.item_id, Operation.REVERSE, JobParams(), "op")
    job = await handlers.handle(ctx, reverse)
    assert uow.committed and engine.submitted == [job.job_id]
    assert job.kind == "item:reverse_replicate" and job.expected_tasks == 4

    view.state = ItemFailoverState.PROTECTED
    refused = FakeUnitOfWork(FakeJobs([]), FakeReads([item], {item.item_id: view}))
    ctx, engine = context(refused)
    with pytest.raises(FailoverRefused, match="reverse replication comes after a failover"):
        await handlers.handle(ctx, reverse)
    assert not refused.committed and engine.submitted == []
