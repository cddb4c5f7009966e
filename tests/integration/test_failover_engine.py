"""The durable workflow engine over the real PostgreSQL: jobs and tasks are stored; a job
interrupted mid-step resumes in a new engine instance over the same database at its last
completed step, re-sending the open step with the same idempotency key; a failed job is
restarted by an operator with a new key for its failed step."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from pydantic import ConfigDict

from kit.poll import eventually
from kit.stack import migrated_pool
from services.failover import job_repository as jobs_repo
from services.failover import repository as repo
from services.failover.__main__ import MIGRATIONS
from services.failover.commands import RestartJob
from services.failover.config import FailoverSettings
from services.failover.domain.jobs import Operation
from services.failover.job import ItemResult, Job, JobParams, JobResult
from services.failover.workflow import Engine, Run, StepFailed, StepResult

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    async with migrated_pool(database_url, "failover", MIGRATIONS) as p:
        yield p


class Value(StepResult):
    value: int


class Answer(StepResult):
    model_config = ConfigDict(extra="allow")


class Recorder:
    """A two-step workflow whose effects are counted; step 2 waits for an answer row."""

    def __init__(self) -> None:
        self.effects: list[tuple[str, uuid.UUID]] = []

    async def workflow(self, run: Run) -> JobResult:
        async def first(cid: uuid.UUID) -> Value:
            self.effects.append(("first", cid))
            return Value(value=1)

        async def second(cid: uuid.UUID) -> None:
            self.effects.append(("second", cid))

        async def answer(cid: uuid.UUID) -> Answer:
            return Answer.model_validate(await run.wait_answer(cid, "second step", timeout=30))

        one = await run.step("first", "first step", Value, first)
        two = await run.step("second", "second step", Answer, second, answer)
        state = "answered ok" if two.model_dump() == {"ok": True} else "answered"
        run.item_results["i1"] = ItemResult(vm_name="vm1", state=state, cycle_seq=one.value)
        return JobResult()


async def new_job(pool: asyncpg.Pool) -> uuid.UUID:
    job = Job.create(
        uuid.uuid4(),
        Operation.COMMIT,
        target_kind="item",
        target=str(uuid.uuid4()),
        params=JobParams(items=[]),
        expected_tasks=2,
        created_by="test",
    )
    async with pool.acquire() as conn, conn.transaction():
        await jobs_repo.add_job(conn, job)
    return job.job_id


def engine(pool: asyncpg.Pool, recorder: Recorder) -> Engine:
    settings = FailoverSettings(poll_seconds=0.05)
    return Engine(pool, settings, {"item:commit": recorder.workflow})


async def test_resume_after_restart_skips_done_steps_and_resends_with_same_key(
    pool: asyncpg.Pool,
) -> None:
    job_id = await new_job(pool)
    before = Recorder()
    first_engine = engine(pool, before)
    first_engine.submit(job_id)

    async def second_sent() -> bool:
        return len(before.effects) == 2

    await eventually(second_sent, timeout=10, what="the second step sent")
    await first_engine.stop()  # the process "dies" waiting for the answer
    job = await jobs_repo.job(pool, job_id)
    assert job is not None and job.state == "in_progress"

    after = Recorder()
    second_engine = engine(pool, after)
    assert await second_engine.resume_all() >= 1
    await eventually(lambda: _resent(after), timeout=10, what="the open step re-sent")
    assert [name for name, _ in after.effects] == ["second"]  # the done step is not redone
    assert after.effects[0][1] == before.effects[1][1]  # same idempotency key
    async with pool.acquire() as conn:
        await repo.save_answer(conn, after.effects[0][1], "agent", True, "", {"ok": True})
    second_engine.notifier.poke(0)

    async def done() -> Job | None:
        found = await jobs_repo.job(pool, job_id)
        return found if found and found.state == "succeeded" else None

    job = await eventually(done, timeout=10, what="job succeeded")
    assert job.restarts == 1 and job.progress == 100
    assert job.result.stored() == {
        "items": {"i1": {"vm_name": "vm1", "state": "answered ok", "cycle_seq": 1}}
    }
    history = [h.message for h in await jobs_repo.job_history(pool, job_id)]
    assert any(m.startswith("service restarted: job resumed (1 steps done") for m in history)
    tasks = await jobs_repo.tasks(pool, job_id)
    assert [(t.step_key, t.state) for t in tasks] == [
        ("first", "succeeded"),
        ("second", "succeeded"),
    ]


async def _resent(rec: Recorder) -> bool:
    return bool(rec.effects)


async def test_failed_step_fails_the_job_and_an_operator_restart_uses_a_new_key(
    pool: asyncpg.Pool,
) -> None:
    from services.failover import handlers
    from services.failover.workflow import Notifier

    job_id = await new_job(pool)
    rec = Recorder()
    eng = engine(pool, rec)
    eng.submit(job_id)
    await eventually(lambda: _count(rec, 2), timeout=10, what="second step sent")
    async with pool.acquire() as conn:
        await repo.save_answer(conn, rec.effects[1][1], "agent", False, "disk full", {})
    eng.notifier.poke(0)

    async def failed() -> Job | None:
        found = await jobs_repo.job(pool, job_id)
        return found if found and found.state == "failed" else None

    job = await eventually(failed, timeout=10, what="job failed")
    assert job.error is not None and "disk full" in job.error and job.recommendation
    task = await jobs_repo.task(pool, job_id, "second")
    assert task is not None and task.state == "failed"
    ctx = handlers.Context(pool=pool, settings=eng.settings, engine=eng, notifier=Notifier())
    restarted = await handlers.restart(ctx, RestartJob(job.vault_id, job_id, "operator"))
    assert restarted.run_no == 2
    await eventually(lambda: _count(rec, 3), timeout=10, what="second step re-sent")
    old_key, new_key = rec.effects[1][1], rec.effects[2][1]
    assert new_key != old_key
    # a late answer to the failed run's key does not complete the restarted step
    async with pool.acquire() as conn:
        await repo.save_answer(conn, old_key, "agent", True, "", {"late": True})
    eng.notifier.poke(0)
    await asyncio.sleep(0.3)  # several poll rounds (poll_seconds=0.05): the step must still wait
    task = await jobs_repo.task(pool, job_id, "second")
    assert task is not None and task.state == "in_progress", task
    found = await jobs_repo.job(pool, job_id)
    assert found is not None and found.state == "in_progress"
    async with pool.acquire() as conn:
        await repo.save_answer(conn, new_key, "agent", True, "", {"ok": True})
    eng.notifier.poke(0)

    async def succeeded() -> Job | None:
        found = await jobs_repo.job(pool, job_id)
        return found if found and found.state == "succeeded" else None

    job = await eventually(succeeded, timeout=10, what="the restarted job succeeded")
    # the new key's answer, not the late one
    assert job.result.items is not None and job.result.items["i1"].state == "answered ok"
    await eng.stop()


async def test_a_step_that_raises_step_failed_fails_its_job_with_the_reason(
    pool: asyncpg.Pool,
) -> None:
    async def failing(run: Run) -> JobResult:
        async def effect(_cid: uuid.UUID) -> Value:
            raise StepFailed("host unreachable", "the agent is down", "start the agent")

        await run.step("only", "only step", Value, effect)
        return JobResult()

    job_id = await new_job(pool)
    eng = Engine(pool, FailoverSettings(poll_seconds=0.05), {"item:commit": failing})
    eng.submit(job_id)

    async def failed() -> Job | None:
        found = await jobs_repo.job(pool, job_id)
        return found if found and found.state == "failed" else None

    job = await eventually(failed, timeout=10, what="the job failed")
    assert job.error is not None and "host unreachable" in job.error
    assert job.cause == "the agent is down" and job.recommendation == "start the agent"
    task = await jobs_repo.task(pool, job_id, "only")
    assert task is not None and task.state == "failed" and task.error == "host unreachable"
    await eng.stop()


async def _count(rec: Recorder, n: int) -> bool:
    await asyncio.sleep(0)
    return len(rec.effects) >= n
