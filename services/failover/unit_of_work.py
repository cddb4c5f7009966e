"""The unit of work of the failover service: one transaction in which handlers and the workflow
engine load job aggregates, change them through their methods, and commit; the commit writes
every job it handed out (its row, new history lines and `JobChanged` events into the outbox) in
that transaction, or nothing. Leaving the block without `commit()` rolls back.

`UnitOfWork` is the interface handlers see; `PgUnitOfWork` is the PostgreSQL one (a fake one
in memory tests the handlers without a database: tests/unit/test_failover_handlers.py)."""

from __future__ import annotations

import uuid
from types import TracebackType
from typing import Protocol, Self

import asyncpg

from services.failover import item_failover_repository as failover_repo
from services.failover import job_repository as jobs_repo
from services.failover import read_model_repository as read_models
from services.failover.domain.items import ItemRow
from services.failover.domain.points import RetainedPoints
from services.failover.item_failover import ItemFailover
from services.failover.job import Job


class JobStore(Protocol):
    async def get(self, job_id: uuid.UUID) -> Job | None:
        """The job, locked until the end of the unit of work."""

    def add(self, job: Job) -> None: ...

    async def lock_vault(self, vault_id: uuid.UUID) -> None:
        """Serialise, per vault, what creates jobs or depends on none running."""

    async def busy_items(self, vault_id: uuid.UUID, item_ids: list[str]) -> dict[str, str]:
        """item id -> operation of an unfinished job that holds it."""

    async def approve(self, job_id: uuid.UUID, action_key: str, by: str, comment: str) -> None:
        """Record an operator's approval of a manual action."""

    async def succeeded_tasks(self, job_id: uuid.UUID) -> int: ...


class ReadModels(Protocol):
    """What the service knows of other services' state, as a decision reads it."""

    async def item(self, item_id: uuid.UUID) -> ItemRow | None:
        """The protected item (rm_items row)."""

    async def view(self, item_id: uuid.UUID) -> ItemFailover | None:
        """The item's failover state as stored (None: nothing done to it yet)."""

    async def reversed_from(self, item_id: uuid.UUID) -> bool:
        """True if the item protects a VM in reverse (after a failover)."""

    async def retained_points(self, item_id: uuid.UUID) -> RetainedPoints: ...

    async def cloud_site(self, vault_id: uuid.UUID, cloud_id: str) -> str | None: ...


class UnitOfWork(Protocol):
    @property
    def jobs(self) -> JobStore: ...

    @property
    def reads(self) -> ReadModels: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def commit(self) -> None: ...


class PgJobs:
    """Jobs in PostgreSQL, on the unit of work's connection."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.seen: dict[uuid.UUID, tuple[Job, bool]] = {}  # job id -> (job, is new)

    async def get(self, job_id: uuid.UUID) -> Job | None:
        job = await jobs_repo.job(self.conn, job_id, for_update=True)
        if job is not None:
            self.seen[job.job_id] = (job, False)
        return job

    def add(self, job: Job) -> None:
        self.seen[job.job_id] = (job, True)

    async def lock_vault(self, vault_id: uuid.UUID) -> None:
        await jobs_repo.lock_vault_jobs(self.conn, vault_id)

    async def busy_items(self, vault_id: uuid.UUID, item_ids: list[str]) -> dict[str, str]:
        return await jobs_repo.busy_items(self.conn, vault_id, item_ids)

    async def approve(self, job_id: uuid.UUID, action_key: str, by: str, comment: str) -> None:
        await jobs_repo.approve(self.conn, job_id, action_key, by, comment)

    async def succeeded_tasks(self, job_id: uuid.UUID) -> int:
        return await jobs_repo.succeeded_tasks(self.conn, job_id)

    async def write(self) -> None:
        for job, new in self.seen.values():
            if new:
                await jobs_repo.add_job(self.conn, job)
            else:
                await jobs_repo.save_job(self.conn, job)
        self.seen.clear()


class PgReadModels:
    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def item(self, item_id: uuid.UUID) -> ItemRow | None:
        return await read_models.item(self.conn, item_id)

    async def view(self, item_id: uuid.UUID) -> ItemFailover | None:
        return await failover_repo.failover_view(self.conn, item_id)

    async def reversed_from(self, item_id: uuid.UUID) -> bool:
        return await failover_repo.link_of(self.conn, new=item_id) is not None

    async def retained_points(self, item_id: uuid.UUID) -> RetainedPoints:
        return await read_models.retained_points(self.conn, item_id)

    async def cloud_site(self, vault_id: uuid.UUID, cloud_id: str) -> str | None:
        return await read_models.cloud_site(self.conn, vault_id, cloud_id)


class PgUnitOfWork:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @property
    def jobs(self) -> PgJobs:
        return self._jobs

    @property
    def reads(self) -> PgReadModels:
        return self._reads

    async def __aenter__(self) -> Self:
        self.conn: asyncpg.Connection = await self.pool.acquire()
        self.tx = self.conn.transaction()
        await self.tx.start()
        self._jobs = PgJobs(self.conn)
        self._reads = PgReadModels(self.conn)
        self.done = False
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if not self.done:
                await self.tx.rollback()
        finally:
            await self.pool.release(self.conn)

    async def commit(self) -> None:
        await self.jobs.write()
        await self.tx.commit()
        self.done = True
