"""A service's process runtime: database pool + migrations, Kafka producer and topics, the
outbox relay, supervised background tasks (consumers, sweepers), health, graceful shutdown.

Nothing connects at construction; `start()` does, `stop()` undoes it in reverse order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import asyncpg
import uvicorn
from fastapi import FastAPI

from shared import db, inbox, outbox
from shared.kafka.admin import ensure_topics
from shared.kafka.pipeline import INFRA_ERRORS
from shared.kafka.producer import KafkaProducer
from shared.outbox import OutboxRelay
from shared.settings import ServiceSettings

log = logging.getLogger(__name__)

TaskFactory = Callable[[], Coroutine[Any, Any, None]]

PROBE_SECONDS = 2.0
# what a dependency going away raises; asyncpg's InternalClientError ("cannot switch to
# state ...; another operation is in progress") comes from a connection the server closed
# in the middle of an operation
UNAVAILABLE: tuple[type[BaseException], ...] = (*INFRA_ERRORS, asyncpg.InternalClientError)


@dataclass(frozen=True)
class Role:
    """A process's part in its deployment where only one instance may do the work, for
    /healthz: `active` (it does the work), `standby` (healthy: it waits to take over) or
    `refused` (it cannot take over: degraded, `reason` says why and what to do). `active`
    names the instance doing the work (host, pid, since), when known."""

    name: Literal["active", "standby", "refused"]
    reason: str | None = None
    active: Mapping[str, str | int | None] | None = None


def health_status(healthy: bool, role: Role | None) -> str:
    """/healthz's status: `ok`, `standby` (healthy, waiting to take over) or `degraded` (a
    check failed, or a standby that cannot take over)."""
    if not healthy or (role is not None and role.name == "refused"):
        return "degraded"
    return "standby" if role is not None and role.name == "standby" else "ok"


class DependencyWatch:
    """Whether this process reaches a dependency (Kafka: a metadata request; PostgreSQL: a
    `SELECT 1`), asked every few seconds: what /healthz reports (`kafka`), and what lets a
    service tell the platform's outage from its edges' (registration suspends its
    missed-heartbeat clock while Kafka or its database is unreachable and restarts it at
    `recovered_at`)."""

    def __init__(self, what: str = "Kafka") -> None:
        self.what = what
        self._ask: Callable[[], Awaitable[str | None]] | None = None
        self.problem: str | None = "not probed yet"
        self.down_since: float | None = None
        self.recovered_at: datetime | None = None  # wall clock: compared with heartbeat times

    @property
    def reachable(self) -> bool:
        return self.problem is None

    async def probe(self, ask: Callable[[], Awaitable[str | None]] | None = None) -> bool:
        """Ask now (with `ask`, remembered for the next calls); True: reachable."""
        self._ask = ask or self._ask
        if self._ask is None:
            return False
        problem = await self._ask()
        now = time.monotonic()
        if problem is not None and self.problem is None:
            log.warning(f"{self.what} unreachable", extra={"error": problem})
            self.down_since = now
        if problem is None and self.problem is not None:
            if self.down_since is not None:
                log.warning(
                    f"{self.what} reachable again", extra={"down_seconds": now - self.down_since}
                )
            self.recovered_at = datetime.now(UTC)
            self.down_since = None
        self.problem = problem
        return problem is None

    def check(self) -> str:
        return "ok" if self.problem is None else f"unreachable: {self.problem}"

    async def watch(
        self, ask: Callable[[], Awaitable[str | None]], every: float = PROBE_SECONDS
    ) -> None:
        """Probe with `ask` now and then every `every` seconds (a process's background task)."""
        while True:
            await self.probe(ask)
            await asyncio.sleep(every)


class Runtime:
    def __init__(
        self,
        name: str,
        settings: ServiceSettings,
        *,
        migrations: Path | None = None,
        topics: tuple[str, ...] = (),
        relay_outbox: bool = True,
    ) -> None:
        """`relay_outbox=False`: the outbox relay starts with `start_outbox_relay()` (a
        service with one active instance relays from the active one only: two relays would
        publish one outbox out of order)."""
        self.name = name
        self.settings = settings
        self.schema = settings.db_schema or name
        self.migrations = migrations
        self.topics = topics
        self._pool: asyncpg.Pool | None = None
        self._producer: KafkaProducer | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._task_state: dict[str, str] = {}
        self._stop_hooks: list[Callable[[], Coroutine[Any, Any, Any]]] = []
        self._checks: dict[str, Callable[[], bool]] = {}
        self._role: Callable[[], Role] | None = None
        self._relay_outbox = relay_outbox
        self._stopping = False
        self.kafka = DependencyWatch("Kafka")
        self.database = DependencyWatch("PostgreSQL")

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("runtime not started")
        return self._pool

    @property
    def producer(self) -> KafkaProducer:
        if self._producer is None:
            raise RuntimeError("runtime not started")
        return self._producer

    async def start(self) -> None:
        s = self.settings
        problem = s.admin_token_problem()
        if problem is not None:
            log.critical("refusing to start", extra={"reason": problem})
            raise SystemExit(f"{self.name}: {problem}")
        self._pool = await _retry("postgres", lambda: db.create_pool(s.database_url, self.schema))
        folders = [self.migrations] if self.migrations else []
        await db.migrate(self._pool, self.schema, *folders)
        await _retry(
            "kafka topics",
            lambda: ensure_topics(
                s.kafka_bootstrap_servers,
                s.topic_prefix,
                self.topics,
                partitions=s.topic_partitions,
            ),
        )
        self._producer = KafkaProducer(s.kafka_bootstrap_servers, s.topic_prefix, self.name)
        await _retry("kafka producer", self._producer.start)
        if self._relay_outbox:
            self.start_outbox_relay()
        producer = self._producer
        self.spawn("kafka-probe", lambda: self.kafka.watch(producer.unreachable))
        self.spawn("postgres-probe", lambda: self.database.watch(self._postgres_unreachable))
        self.spawn_every("prune-processed", 3600, lambda: prune_processed(self.pool, s))
        log.info("service started", extra={"schema": self.schema})

    def start_outbox_relay(self) -> None:
        """Publish the outbox from now on (at start unless `relay_outbox=False`)."""
        if "outbox-relay" not in self._tasks:
            relay = OutboxRelay(self.pool, self.producer, poll_ms=self.settings.outbox_poll_ms)
            self.spawn("outbox-relay", relay.run)

    async def _postgres_unreachable(self) -> str | None:
        """None when PostgreSQL answers a `SELECT 1` within the probe interval, else why not."""
        try:  # asyncpg's own timeouts: a cancelled query would leave its connection busy
            async with self.pool.acquire(timeout=PROBE_SECONDS) as conn:
                await conn.fetchval("SELECT 1", timeout=PROBE_SECONDS)
        except TimeoutError:
            return f"no answer to SELECT 1 within {PROBE_SECONDS:g}s"
        except (*UNAVAILABLE, asyncpg.PostgresError) as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    def spawn(self, name: str, factory: TaskFactory, *, once: bool = False) -> None:
        """Run `factory()` in the background; restart it with backoff if it crashes. A task
        that ends is reported stopped (degraded), unless it is a one-off job (`once`): that
        is reported done once it succeeded."""

        async def supervised() -> None:
            delay = 0.5
            while not self._stopping:
                self._task_state[name] = "running"
                try:
                    await factory()
                    if once:
                        self._task_state[name] = "done"
                    return
                except asyncio.CancelledError:
                    raise
                except UNAVAILABLE as exc:  # PostgreSQL or Kafka away: theirs, not a bug here
                    self._task_state[name] = "restarting"
                    log.warning(
                        "background task: dependency unavailable; restarting",
                        extra={"task": name, "error": repr(exc)},
                    )
                except Exception:
                    self._task_state[name] = "restarting"
                    log.exception("background task crashed; restarting", extra={"task": name})
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 10)

        self._tasks[name] = asyncio.create_task(supervised(), name=name)

    def spawn_every(self, name: str, seconds: float, work: Callable[[], Awaitable[object]]) -> None:
        """Run `work()` now and then every `seconds` in the background (supervised)."""

        async def loop() -> None:
            while True:
                await work()
                await asyncio.sleep(seconds)

        self.spawn(name, loop)

    def on_stop(self, hook: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        """Run `hook` at shutdown, before the tasks are cancelled (last registered, first run)."""
        self._stop_hooks.append(hook)

    def add_check(self, name: str, check: Callable[[], bool]) -> None:
        """A health check reported by /healthz (False: degraded)."""
        self._checks[name] = check

    def report_role(self, role: Callable[[], Role]) -> None:
        """Report `role()` on /healthz: `role`, `reason` and `active_instance`; the status is
        `standby` (HTTP 200) for a healthy standby, `degraded` for a refused one."""
        self._role = role

    async def health(self) -> dict[str, Any]:
        checks: dict[str, str] = {}
        try:
            await asyncio.wait_for(self.pool.fetchval("SELECT 1"), timeout=2)
            checks["postgres"] = "ok"
        except Exception as exc:
            checks["postgres"] = f"error: {type(exc).__name__}"
        checks["kafka_producer"] = "ok" if self._producer and self._producer.started else "down"
        checks["kafka"] = self.kafka.check()
        for name, task in self._tasks.items():
            state = self._task_state.get(name, "starting")
            checks[f"task:{name}"] = "stopped" if task.done() and state != "done" else state
        for name, check in self._checks.items():
            checks[name] = "ok" if check() else "down"
        healthy = all(v in ("ok", "running", "done") for v in checks.values())
        role = self._role() if self._role is not None else None
        report: dict[str, Any] = {"service": self.name, "status": health_status(healthy, role)}
        if role is not None:
            report["role"] = role.name
            if role.reason is not None:
                report["reason"] = role.reason
            if role.active is not None:
                report["active_instance"] = dict(role.active)
        report["checks"] = checks
        return report

    async def stop(self) -> None:
        self._stopping = True
        for hook in reversed(self._stop_hooks):
            try:
                await hook()
            except Exception:
                log.exception("stop hook failed")
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        if self._producer is not None:
            await self._producer.stop()
        if self._pool is not None:
            await self._pool.close()
        log.info("service stopped")


async def prune_processed(pool: asyncpg.Pool, settings: ServiceSettings) -> int:
    """Delete de-duplication rows and published outbox rows older than the retention."""
    older_than_s = settings.processed_events_retention_hours * 3600
    done = await inbox.prune(pool, older_than_s)
    await outbox.prune_published(pool, older_than_s)
    return done


async def _retry(what: str, action: Callable[[], Coroutine[Any, Any, Any]], tries: int = 30) -> Any:
    delay = 0.5
    for attempt in range(1, tries + 1):
        try:
            return await action()
        except db.DatabaseTlsError:
            raise  # a setting to fix (DATABASE_URL's TLS), not a dependency still starting
        except Exception as exc:
            if attempt == tries:
                raise
            log.warning(
                "dependency not ready; retrying",
                extra={"dependency": what, "attempt": attempt, "error": repr(exc)},
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5)
    raise AssertionError("unreachable")


def serve(app: FastAPI, host: str, port: int) -> None:
    """Run the HTTP server; SIGTERM/SIGINT shut it down gracefully (lifespan stop)."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
    )
    uvicorn.Server(config).run()
