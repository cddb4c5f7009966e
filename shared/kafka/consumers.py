"""The two consumers of events: `EventConsumer` (services: one PostgreSQL transaction per event
with its inbox row, so the effect is exactly-once though delivery is at-least-once) and
`PlainEventConsumer` (edge processes without a database)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from typing import Any

import asyncpg
from prometheus_client import Counter

from shared import inbox, topics
from shared.kafka.decode import Incoming, RawRecord, Rejected
from shared.kafka.pipeline import (
    EVENTS_CONSUMED,
    EVENTS_DUPLICATE,
    HANDLE_SECONDS,
    Decoded,
    RecordPipeline,
)
from shared.schemas.envelope import Envelope
from shared.schemas.registry import payload_model

log = logging.getLogger(__name__)

RUNS = Counter(
    "dr_consumer_runs_total",
    "Runs of records tried in one transaction: applied, or handled one by one instead",
    ["topic", "result"],
)


class RunFallback(Exception):
    """Raised by a `RunHandler`: handle these records one by one (nothing of the run is kept)."""


# Lookups memoised for one pass over a few records: the transaction of a run (see
# `EventConsumer`) or a delta `prepare` step; e.g. the producer a signature is checked against.
# None elsewhere (set it with a token and reset it: a memo must not outlive its pass).
RUN_MEMO: ContextVar[dict[Any, Any] | None] = ContextVar("dr_run_memo", default=None)


Handler = Callable[[asyncpg.Connection, Incoming], Awaitable[None]]
# A handler of a run of consecutive records of one type and key, in one transaction: its
# effects must be exactly those of the type's `Handler` applied to each record in order. It
# raises (`RunFallback` or anything else) to have the run handled record by record instead.
RunHandler = Callable[[asyncpg.Connection, list[Incoming]], Awaitable[None]]
Verifier = Callable[[asyncpg.Connection, Envelope, bool], Awaitable[None]]


class EventConsumer(RecordPipeline[Handler]):
    """The services' consumer: each event is applied in one PostgreSQL transaction together
    with its inbox row (`shared.inbox`), so the effect is exactly-once even
    though delivery is at-least-once. `verifier` checks signature and vault against the
    service's read model and raises `Rejected`; signed event types need a verifier.

    `run_handlers` (event type -> `RunHandler`): consecutive records of such a type with the
    same key, handled together (`process_many`), are applied in one transaction: their
    de-duplication rows, verification (lookups memoised in `RUN_MEMO`) and the run handler's
    effects. If anything in it fails, the transaction is rolled back and the records go one
    by one through their `handlers`, as without runs."""

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        verifier: Verifier | None = None,
        run_handlers: dict[str, RunHandler] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.pool = pool
        self.verifier = verifier
        self.run_handlers = run_handlers or {}

    def _run_handler(self, result: Decoded | Rejected) -> RunHandler | None:
        if isinstance(result, Rejected) or result[0].type not in self.handlers:
            return None
        return self.run_handlers.get(result[0].type)

    async def _process_range(
        self,
        records: Sequence[RawRecord],
        decoded: Sequence[Decoded | Rejected],
        start: int,
        end: int,
    ) -> None:
        """Records `start`..`end`, in order: runs of consecutive records that `_run_handler`
        takes are tried in one transaction each; the rest, and any run that falls back, one
        by one."""
        i = start
        while i < end:
            j = i + 1
            handler = self._run_handler(decoded[i])
            if handler is not None:
                key = records[i].key
                while (
                    j < end and records[j].key == key and self._run_handler(decoded[j]) is handler
                ):
                    j += 1
            if (
                handler is None
                or j - i < 2
                or not await self._process_run(
                    records[i:j], [d for d in decoded[i:j] if not isinstance(d, Rejected)], handler
                )
            ):
                for k in range(i, j):
                    await self._process_decoded(records[k], decoded[k])
            i = j

    async def _process_run(
        self, records: Sequence[RawRecord], decoded: Sequence[Decoded], handler: RunHandler
    ) -> bool:
        """A run of records of one type and key in one transaction: de-duplication rows,
        verification and the run handler's effects, all or nothing. False (nothing kept) if
        anything in it is not plain sailing: the caller then handles the records one by one,
        which is where rejections, dead letters and retries happen."""
        topic = topics.logical(records[0].topic, self.prefix)
        incomings: list[Incoming] = []
        seen: set[uuid.UUID] = set()
        for record, (envelope, payload) in zip(records, decoded, strict=True):
            if envelope.event_id in seen:  # a re-sent record within the run: one is enough
                continue
            seen.add(envelope.event_id)
            key = record.key.decode(errors="replace") if record.key else None
            incomings.append(
                Incoming(
                    envelope, payload, topic, record.partition, record.offset, key, record.value
                )
            )
        started = time.perf_counter()
        token = RUN_MEMO.set({})
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                fresh = await inbox.claim_all(
                    conn, self.group, [inc.envelope.event_id for inc in incomings]
                )
                todo = [inc for inc in incomings if inc.envelope.event_id in fresh]
                for inc in todo:
                    await self._verify(conn, inc.envelope)
                if todo:
                    await handler(conn, todo)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # incl. Rejected: the one-by-one path says it properly
            log.debug("run of %d records handled one by one: %r", len(records), exc)
            RUNS.labels(topic, "one_by_one").inc()
            return False
        finally:
            RUN_MEMO.reset(token)
        RUNS.labels(topic, "applied").inc()
        share = (time.perf_counter() - started) / len(records)
        EVENTS_DUPLICATE.labels(topic).inc(len(records) - len(todo))
        for inc in todo:
            HANDLE_SECONDS.labels(topic).observe(share)
            EVENTS_CONSUMED.labels(topic, inc.envelope.type).inc()
        self.applied += len(todo)
        return True

    async def _verify(self, conn: asyncpg.Connection, env: Envelope) -> None:
        """Signature and vault by `verifier` (`Rejected` if wrong); a signed event type needs
        one."""
        et = payload_model(env.type, env.schema_version)
        if self.verifier is not None:
            await self.verifier(conn, env, bool(et and et.signed))
        elif et is not None and et.signed:
            raise Rejected("unverifiable", "signed event but this consumer has no verifier")

    async def _apply(self, incoming: Incoming, handler: Handler) -> None:
        env = incoming.envelope
        async with self.pool.acquire() as conn, conn.transaction():
            if not await inbox.claim(conn, self.group, env.event_id):
                EVENTS_DUPLICATE.labels(incoming.topic).inc()
                return
            await self._verify(conn, env)
            deferred: Rejected | None = None
            try:
                await handler(conn, incoming)
            except Rejected as rej:
                if not rej.keep_effects:
                    raise
                deferred = rej
        if deferred is not None:
            raise deferred
        self.applied += 1
        EVENTS_CONSUMED.labels(incoming.topic, env.type).inc()


PlainHandler = Callable[[Incoming], Awaitable[None]]
PlainVerifier = Callable[[Envelope, bool], None]


class PlainEventConsumer(RecordPipeline[PlainHandler]):
    """A consumer without a database (edge processes): handlers get the event alone and own
    their idempotency (e.g. a persisted journal of command ids)."""

    def __init__(self, *, verifier: PlainVerifier | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.verifier = verifier

    async def _apply(self, incoming: Incoming, handler: PlainHandler) -> None:
        et = payload_model(incoming.envelope.type, incoming.envelope.schema_version)
        if self.verifier is not None:
            self.verifier(incoming.envelope, bool(et and et.signed))
        await handler(incoming)
        self.applied += 1
        EVENTS_CONSUMED.labels(incoming.topic, incoming.envelope.type).inc()
