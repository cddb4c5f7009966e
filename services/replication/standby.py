"""One active replication instance per deployment, in the process: the replica store's
identity file, the deployment's lock held on a connection of its own, and the takeover.

Without a block copy (`DR_REPLICATION_KEEP_BLOCK_COPY=false`, `store_bound=False`) every
instance does the pipeline's work (started before this) and the lock only picks the instance
that coordinates (`activate`: the outbox relay, health, resync, retention); the others wait
to take that over, whatever their store.

At start (after the migrations) an instance tries the lock. Holding it and with the
deployment's store (`services/replication/instance.py` decides), it is the active instance:
it records itself, starts the work (`activate`: the delta pipeline, the side consumer, the
failover worker, the periodic tasks, the outbox relay) and refreshes its heartbeat. Otherwise
it is a standby: /healthz, /metrics and the OpenAPI document answer, its API answers 503
naming the active instance, it consumes nothing, and it tries the lock again every
`DR_REPLICATION_STANDBY_POLL_SECONDS`. PostgreSQL releases the lock when the active
instance's connection ends (a graceful stop, or the process killed), and a standby with the
same store takes over.

The store's identity: `<store_dir>/.store-id`, a random UUID written once (fsynced, linked
into place so that two processes sharing the folder agree on one).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
from fastapi import HTTPException
from prometheus_client import Gauge

from services.replication import instance_repository as repo
from services.replication.config import ReplicationSettings
from services.replication.instance import (
    ActiveInstance,
    Decision,
    Role,
    decide,
    takeover_wait,
)
from shared import db
from shared.files import fsync_dir
from shared.runtime import UNAVAILABLE, Runtime
from shared.runtime import Role as ReportedRole

log = logging.getLogger(__name__)

STORE_ID_FILE = ".store-id"
ACTIVE = Gauge(
    "dr_replication_active",
    "1: this replication instance does the deployment's work (the active one; without a "
    "block copy, every instance sharing the delta partitions); 0: a standby",
)
COORDINATOR = Gauge(
    "dr_replication_coordinator",
    "1: this replication instance coordinates its deployment (outbox relay, health, resync, "
    "retention); 0: it does not",
)
# what losing the lock's connection or not reaching PostgreSQL raises
LOST = (*UNAVAILABLE, asyncpg.PostgresError, TimeoutError, OSError)


def lock_connection_name(schema: str, pid: int) -> str:
    """The `application_name` of an instance's lock connection (in `pg_stat_activity`)."""
    return f"{schema}-active-lock-{pid}"[:63]


class StoreIdentityError(RuntimeError):
    """The store's identity file exists but holds no identity."""


def store_identity(root: Path) -> uuid.UUID:
    """The identity of the replica store at `root`: read, or created once (durably)."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / STORE_ID_FILE
    if not path.exists():
        tmp = root / f"{STORE_ID_FILE}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{uuid.uuid4()}\n")
            fh.flush()
            os.fsync(fh.fileno())
        try:  # a link never replaces: of two processes creating it, one identity wins
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(root)
    text = path.read_text().strip()
    try:
        return uuid.UUID(text)
    except ValueError:
        raise StoreIdentityError(
            f"{path}: {text[:60]!r} is not a replica store identity (a UUID); restore the file "
            "from the store's backup (the deployment's database records which store it is)"
        ) from None


class OneActiveInstance:
    """This process's part in its deployment (see the module); `activate` starts the work."""

    def __init__(
        self,
        runtime: Runtime,
        settings: ReplicationSettings,
        activate: Callable[[], Awaitable[None]],
        *,
        store_bound: bool = True,
    ) -> None:
        """`store_bound` False (no block copy): the lock picks the coordinator only; any
        instance may take it whatever its store, and every instance does the pipeline's
        work (started by the caller)."""
        self.rt = runtime
        self.store_bound = store_bound
        self.settings = settings
        self.activate = activate
        self.deployment = settings.topic_prefix
        self.key = repo.lock_key(runtime.schema, settings.topic_prefix)
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.store_id: uuid.UUID | None = None
        self.decision = Decision(Role.STANDBY, reason="not decided yet")
        self.record: ActiveInstance | None = None
        self.serving = False  # active, and the work started
        self._conn: asyncpg.Connection | None = None  # holds the lock while active
        self._told: tuple[Role, str | None, int | None] | None = None

    async def start(self) -> None:
        """Become the active instance now, or a standby that keeps trying."""
        self.store_id = await asyncio.to_thread(store_identity, self.settings.store_dir)
        ACTIVE.set(0 if self.store_bound else 1)
        COORDINATOR.set(0)
        self.rt.report_role(self.role)
        self.rt.on_stop(self.release)
        if not await self._try_to_take_over():
            self.rt.spawn("standby", self._wait_for_the_lock)

    def role(self) -> ReportedRole:
        """For /healthz."""
        active = self.record.summary() if self.record is not None else None
        if not self.store_bound:  # every instance works; one of them coordinates
            coordinator = "this instance" if self.serving else "another instance (`active`)"
            return ReportedRole(
                "active",
                reason=f"shares the delta partitions with the deployment's other instances; "
                f"{coordinator} coordinates (outbox relay, health, resync, retention)",
                active=active,
            )
        if self.serving:
            return ReportedRole("active", active=active)
        if self.decision.role is Role.REFUSED:
            return ReportedRole("refused", reason=self.decision.reason, active=active)
        reason = self.decision.reason or (
            "another replication instance is active for this deployment; this one takes "
            "over if it stops"
        )
        return ReportedRole("standby", reason=reason, active=active)

    def require_active(self) -> None:
        """A dependency of the API's routes: a standby answers 503 naming the active one."""
        if self.serving:
            return
        where = ""
        if self.record is not None and self.decision.role is Role.STANDBY:
            where = f" ({self.record.host}, pid {self.record.pid})"
        raise HTTPException(
            503,
            f"this replication instance is a standby: send requests to the active "
            f"instance{where}; its /healthz says more",
            headers={"Retry-After": "5"},
        )

    async def release(self) -> None:
        """At shutdown (after the work stopped): free the lock for a standby."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(*LOST):
                async with self.rt.pool.acquire() as c:
                    await repo.released(c, self.deployment, self.pid, self.host)
            with contextlib.suppress(*LOST):
                await repo.unlock(conn, self.key)
            with contextlib.suppress(*LOST):
                await conn.close(timeout=5)
            log.info("active role released", extra={"deployment": self.deployment})
        self.serving = False
        ACTIVE.set(0)
        COORDINATOR.set(0)

    # -- taking over -------------------------------------------------------------------

    async def _connect(self) -> asyncpg.Connection:
        return await db.connect(
            self.settings.database_url,
            # names the instance in pg_stat_activity (63 characters at most)
            server_settings={"application_name": lock_connection_name(self.rt.schema, self.pid)},
        )

    async def _try_to_take_over(self) -> bool:
        """Take the lock if it is free and this instance may be active; True: active now."""
        assert self.store_id is not None
        conn = await self._connect()
        try:
            taken = await repo.try_lock(conn, self.key)
            async with self.rt.pool.acquire() as c:
                record = await repo.record(c, self.deployment)
                protects = await repo.protects(c)
            if self.store_bound:
                decision = decide(
                    lock_taken=taken, own_store=self.store_id, record=record, protects=protects
                )
            else:  # no store to agree on: the lock decides
                decision = Decision(Role.ACTIVE if taken else Role.STANDBY, claim=taken)
            if decision.role is Role.ACTIVE:
                await self._until_the_last_one_stopped(record)
                async with self.rt.pool.acquire() as c:
                    record = await repo.become_active(
                        c,
                        self.deployment,
                        store_id=self.store_id,
                        host=self.host,
                        pid=self.pid,
                        store_dir=str(self.settings.store_dir.resolve()),
                        heartbeat_seconds=self.settings.standby_poll_seconds,
                    )
                self._conn, conn = conn, None
            elif taken:
                await repo.unlock(conn, self.key)  # for the instance with the store
        finally:
            if conn is not None:
                await conn.close(timeout=5)
        self.decision, self.record = decision, record
        self._tell(protects)
        if decision.role is not Role.ACTIVE:
            return False
        try:
            await self.activate()
        except Exception:
            log.exception("the active instance's work did not start; stopping")
            os.kill(self.pid, signal.SIGTERM)
            raise
        self.serving = True
        ACTIVE.set(1)
        COORDINATOR.set(1)
        self.rt.spawn("active-heartbeat", self._hold)
        return True

    def last_one_gone(self, record: ActiveInstance | None) -> bool:
        """Whether `record`'s instance ran on this host and its process ended (the same
        process id: this process restarted in its container)."""
        if record is None or record.host != self.host:
            return False
        if record.pid == self.pid:
            return True
        try:
            os.kill(record.pid, 0)  # signal 0: only whether the process exists
        except ProcessLookupError:
            return True
        except PermissionError:
            return False  # it exists (another user's)
        return False

    async def _until_the_last_one_stopped(self, record: ActiveInstance | None) -> None:
        """Holding the lock: wait until the instance active before, if it did not release
        the role (killed, or cut off from its lock), missed two heartbeats."""
        while (wait := takeover_wait(record, gone=self.last_one_gone(record))) > 0:
            assert record is not None
            self.decision = Decision(
                Role.STANDBY,
                reason=f"taking over in {wait:.1f} s, once the previous active instance "
                f"({record.host}, pid {record.pid}) missed two heartbeats",
            )
            self.record = record
            log.warning(
                "waiting for the previous active instance's heartbeat to stop",
                extra={"active_instance": record.summary(), "wait_seconds": round(wait, 1)},
            )
            await asyncio.sleep(wait)
            async with self.rt.pool.acquire() as c:
                record = await repo.record(c, self.deployment)

    async def _wait_for_the_lock(self) -> None:
        while True:
            await asyncio.sleep(self.settings.standby_poll_seconds)
            try:
                if await self._try_to_take_over():
                    return
            except LOST as exc:  # PostgreSQL away: try again in a moment
                log.warning("standby: the lock could not be tried", extra={"error": repr(exc)})

    def _tell(self, protects: bool) -> None:
        """One log line per change of role (or of the reason, or of the active instance)."""
        d = self.decision
        holder = self.record.pid if self.record is not None else None
        told = (d.role, d.reason, holder if d.role is Role.STANDBY else None)
        if told == self._told:
            return
        self._told = told
        extra: dict[str, object] = {
            "deployment": self.deployment,
            "store_id": str(self.store_id),
            "store_dir": str(self.settings.store_dir),
        }
        if self.record is not None:
            extra["active_instance"] = self.record.summary()
        if d.role is Role.ACTIVE and not self.store_bound:
            log.warning("coordinating the deployment", extra=extra)
        elif d.role is Role.STANDBY and not self.store_bound:
            log.info("another replication instance coordinates the deployment", extra=extra)
        elif d.role is Role.ACTIVE:
            log.warning(
                "taking over as the active replication instance",
                extra={**extra, "claimed_store": d.claim, "protects": protects},
            )
        elif d.role is Role.STANDBY:
            log.warning(
                "standby: another replication instance is active",
                extra={**extra, "reason": d.reason},
            )
        else:
            log.error(
                "refused: cannot take over with this store", extra={**extra, "reason": d.reason}
            )

    # -- holding the role ----------------------------------------------------------------

    async def _hold(self) -> None:
        """While active: the heartbeat, and a check that the lock's connection is alive."""
        while self._conn is not None:
            await asyncio.sleep(self.settings.standby_poll_seconds)
            conn = self._conn
            if conn is None:
                return  # released meanwhile (stopping)
            try:
                await conn.fetchval("SELECT 1", timeout=self.settings.standby_poll_seconds)
            except LOST as exc:
                log.warning("the active lock's connection was lost", extra={"error": repr(exc)})
                await self._retake()
                if self._conn is None:
                    return  # stopping: another instance is active
            async with self.rt.pool.acquire() as c:
                await repo.heartbeat(c, self.deployment, self.pid, self.host)

    async def _retake(self) -> None:
        """The lock's connection ended (PostgreSQL restarted, the network): take the lock
        again; if another instance took it meanwhile, this one stops (it is no longer the
        active one, and a restart makes it a standby)."""
        old, self._conn = self._conn, None
        if old is not None:
            old.terminate()
        while True:
            try:
                conn = await self._connect()
                if await repo.try_lock(conn, self.key):
                    self._conn = conn
                    log.warning("active lock taken again", extra={"deployment": self.deployment})
                    return
                await conn.close(timeout=5)
                break
            except LOST as exc:
                log.warning("active lock: PostgreSQL not reachable", extra={"error": repr(exc)})
                await asyncio.sleep(self.settings.standby_poll_seconds)
        log.error(
            "lost the active role: another replication instance took over; stopping",
            extra={"deployment": self.deployment},
        )
        self.serving = False
        ACTIVE.set(0)
        COORDINATOR.set(0)
        os.kill(self.pid, signal.SIGTERM)
