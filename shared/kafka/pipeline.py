"""The record pipeline under every consumer: decode, hand to a handler, dead-letter.

`RecordPipeline` consumes a consumer group's topics and applies each event with its handler; a
subclass says how (`_apply`: in a PostgreSQL transaction, or on its own). Anything invalid goes to
`<topic>.dlq` with a reason header, a metric and a log line, and the Kafka offset is committed
only after the effect (or the dead-lettering) is durable. Infrastructure errors (database or
broker down) are retried with backoff without skipping the record; a handler that keeps failing
on one record dead-letters it after a few tries so one bad record never stalls its partition.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Generic, TypeVar

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from prometheus_client import Counter, Gauge, Histogram

from shared import topics
from shared.kafka.decode import MAX_RECORD_BYTES, Incoming, RawRecord, Rejected, decode_event
from shared.kafka.producer import KafkaProducer
from shared.kafka.security import KafkaSecurity
from shared.schemas.envelope import Envelope, EventPayload

log = logging.getLogger(__name__)

DLQ_MESSAGES = Counter(
    "dr_dlq_messages_total", "Records sent to a dead-letter topic", ["topic", "reason"]
)
EVENTS_CONSUMED = Counter(
    "dr_events_consumed_total", "Events applied by consumers", ["topic", "type"]
)
EVENTS_DUPLICATE = Counter(
    "dr_events_duplicate_total", "Events skipped as already processed", ["topic"]
)
HANDLE_SECONDS = Histogram(
    "dr_event_handle_seconds",
    "Time to handle one event",
    ["topic"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)

CONSUMER_LAG = Gauge(
    "dr_consumer_lag",
    "Records behind the partition's end (highwater - position) of an aiokafka consumer loop",
    ["topic", "partition", "group"],
)

HANDLER_ATTEMPTS = 3
INFRA_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    KafkaError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.AdminShutdownError,
    asyncpg.TooManyConnectionsError,
    asyncio.TimeoutError,
)

# A decoded record: its envelope and validated payload.
Decoded = tuple[Envelope, EventPayload]
Prepare = Callable[[list[Decoded]], Awaitable[None]]

H = TypeVar("H")


class RecordPipeline(ABC, Generic[H]):
    """Consumes `topic_names` in consumer group `group` and applies each event with its handler.

    `handlers` maps event type name -> handler; events of other types on the topic are
    acknowledged and skipped (a topic carries many types; not every consumer needs all).
    `dead_letters`: False for a second consumer of a topic in another group that takes only
    some types of it (a lane): records that cannot be decoded are skipped, since the topic's
    main consumer dead-letters them (one DLQ record per bad record, not one per group).
    `process()` is usable on its own (e.g. from a faust agent); `run()` is the aiokafka loop.
    `order_key` and `parallel`: the records of a fetched batch are handled in order per key
    (`order_key(payload)`), up to `parallel` keys at a time; the batch's offset is committed
    when all are done. For handlers of independent things (the replica's points of different
    items) whose work waits on disk or network; handlers must be idempotent, as always.
    """

    def __init__(
        self,
        *,
        bootstrap: str,
        prefix: str,
        group: str,
        topic_names: list[str],
        producer: KafkaProducer,
        handlers: dict[str, H],
        max_age: timedelta | None = timedelta(minutes=10),
        max_records: int = 200,
        security: KafkaSecurity | None = None,
        dead_letters: bool = True,
        order_key: Callable[[EventPayload], str] | None = None,
        parallel: int = 1,
    ) -> None:
        self.bootstrap = bootstrap
        self.security = security or KafkaSecurity.from_env()
        self.prefix = prefix
        self.group = f"{prefix}{group}"
        self.topic_names = topic_names
        self.producer = producer
        self.handlers = handlers
        self.max_age = max_age
        self.max_records = max_records
        self.dead_letters = dead_letters
        self.order_key = order_key
        self.parallel = max(parallel, 1)
        self.alive = False
        self.applied = 0
        self.last_records_at: datetime | None = None  # the last fetch that brought records

    @abstractmethod
    async def _apply(self, incoming: Incoming, handler: H) -> None:
        """Apply one event with its handler (raise `Rejected` to dead-letter it)."""

    def _new_consumer(self) -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            *[topics.physical(t, self.prefix) for t in self.topic_names],
            bootstrap_servers=self.bootstrap,
            group_id=self.group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=2 * 1_048_576,
            session_timeout_ms=10_000,  # a kill -9 consumer is replaced within ~10 s
            heartbeat_interval_ms=3_000,
            **self.security.client_options(),
        )

    async def run(self) -> None:
        consumer = self._new_consumer()
        await consumer.start()
        self.alive = True
        try:
            while True:
                batches = await consumer.getmany(timeout_ms=500, max_records=self.max_records)
                if batches:
                    self.last_records_at = datetime.now(UTC)
                for tp, records in batches.items():
                    for record in records:
                        await self.process(record)
                    await self._commit(consumer, tp, records[-1].offset + 1)
                await self._export_lag(consumer)
        finally:
            self.alive = False
            await consumer.stop()

    async def _export_lag(self, consumer: AIOKafkaConsumer) -> None:
        """`dr_consumer_lag` per assigned partition, from what the last fetch told (no extra
        request: the highwater comes with fetch responses; partitions not fetched yet wait)."""
        for tp in consumer.assignment():
            highwater = consumer.highwater(tp)
            if highwater is None:
                continue
            try:
                position = await consumer.position(tp)
            except KafkaError:  # unassigned by a rebalance meanwhile
                continue
            CONSUMER_LAG.labels(
                topics.logical(tp.topic, self.prefix), str(tp.partition), self.group
            ).set(max(highwater - position, 0))

    async def _commit(self, consumer: AIOKafkaConsumer, tp: TopicPartition, offset: int) -> None:
        delay = 0.2
        while True:
            try:
                await consumer.commit({tp: offset})
                return
            except KafkaError as exc:
                log.warning("offset commit failed; retrying", extra={"error": str(exc)})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5)

    async def process(self, record: RawRecord) -> None:
        """Validate, verify and apply one record, or dead-letter it; never raises for bad
        input. Infrastructure errors are retried here until they clear."""
        await self.process_many([record])

    async def process_many(
        self, records: Sequence[RawRecord], prepare: Prepare | None = None, chunk: int = 8
    ) -> None:
        """`process` of each record, in order. `prepare`, if given, sees the decoded records
        `chunk` at a time before they are handled (an optimisation hook, e.g. to write their
        blocks in parallel), the next chunk's while this one is handled: it must not have
        effects the records' handlers don't tolerate, and its failures are logged and ignored
        (the records are then handled on their own as usual)."""
        decoded: list[Decoded | Rejected] = []
        for record in records:
            try:
                decoded.append(decode_event(record.value, self.max_age))
            except Rejected as rej:
                decoded.append(rej)
        if prepare is None:
            await self._process_range(records, decoded, 0, len(records))
            return

        async def prepared(part: list[Decoded | Rejected]) -> None:
            try:
                await prepare([d for d in part if not isinstance(d, Rejected)])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("prepare step failed; records handled one by one: %r", exc)

        starts = range(0, len(records), max(chunk, 1))
        ahead = asyncio.ensure_future(prepared(decoded[: max(chunk, 1)]))
        try:
            for n, start in enumerate(starts):
                await ahead
                if n + 1 < len(starts):
                    ahead = asyncio.ensure_future(
                        prepared(decoded[starts[n + 1] : starts[n + 1] + chunk])
                    )
                await self._process_range(records, decoded, start, min(start + chunk, len(records)))
        finally:
            if not ahead.done():
                ahead.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ahead

    async def _process_range(
        self,
        records: Sequence[RawRecord],
        decoded: Sequence[Decoded | Rejected],
        start: int,
        end: int,
    ) -> None:
        """Records `start`..`end`: in order, one by one; with `order_key`, in order per key and
        up to `parallel` keys at a time."""
        if self.order_key is None or self.parallel == 1 or end - start < 2:
            for k in range(start, end):
                await self._process_decoded(records[k], decoded[k])
            return
        by_key: dict[str, list[int]] = {}
        for k in range(start, end):
            result = decoded[k]
            key = "" if isinstance(result, Rejected) else self.order_key(result[1])
            by_key.setdefault(key, []).append(k)
        gate = asyncio.Semaphore(self.parallel)

        async def in_order(ks: list[int]) -> None:
            async with gate:
                for k in ks:
                    await self._process_decoded(records[k], decoded[k])

        await asyncio.gather(*(in_order(ks) for ks in by_key.values()))

    async def _process_decoded(self, record: RawRecord, result: Decoded | Rejected) -> None:
        topic = topics.logical(record.topic, self.prefix)
        key = record.key.decode(errors="replace") if record.key else None
        if isinstance(result, Rejected):
            if self.dead_letters:
                await self._dead_letter(record, topic, result)
            return
        envelope, payload = result
        handler = self.handlers.get(envelope.type)
        if handler is None:
            return
        incoming = Incoming(
            envelope, payload, topic, record.partition, record.offset, key, record.value
        )
        attempts = 0
        delay = 0.2
        while True:
            try:
                with HANDLE_SECONDS.labels(topic).time():
                    await self._apply(incoming, handler)
                return
            except Rejected as rej:
                await self._dead_letter(record, topic, rej, envelope)
                return
            except asyncio.CancelledError:
                raise
            except INFRA_ERRORS as exc:
                log.warning(
                    "infrastructure error while handling event; retrying",
                    extra={"event_id": str(envelope.event_id), "error": repr(exc)},
                )
            except Exception as exc:
                attempts += 1
                log.exception(
                    "handler failed",
                    extra={"event_id": str(envelope.event_id), "attempt": attempts},
                )
                if attempts >= HANDLER_ATTEMPTS:
                    failure = Rejected("handler_error", f"{type(exc).__name__}: {exc}")
                    await self._dead_letter(record, topic, failure, envelope)
                    return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10)

    async def _dead_letter(
        self,
        record: RawRecord,
        topic: str,
        rej: Rejected,
        envelope: Envelope | None = None,
    ) -> None:
        headers = [
            ("dlq.reason", rej.reason.encode()),
            ("dlq.detail", rej.detail.encode()[:2000]),
            ("dlq.source.topic", topic.encode()),
            ("dlq.source.partition", str(record.partition).encode()),
            ("dlq.source.offset", str(record.offset).encode()),
            ("dlq.consumer.group", self.group.encode()),
            ("dlq.at", datetime.now(UTC).isoformat().encode()),
        ]
        value = record.value if record.value is not None else b""
        delay = 0.2
        while True:
            try:
                await self.producer.send_and_wait(
                    topics.dlq_of(topic),
                    value[:MAX_RECORD_BYTES],
                    key=record.key.decode(errors="replace") if record.key else None,
                    headers=headers,
                )
                break
            except KafkaError as exc:
                log.warning("DLQ publish failed; retrying", extra={"error": str(exc)})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5)
        DLQ_MESSAGES.labels(topic, rej.reason).inc()
        log.warning(
            "event dead-lettered",
            extra={
                "topic": topic,
                "reason": rej.reason,
                "detail": rej.detail,
                "partition": record.partition,
                "offset": record.offset,
                "event_id": str(envelope.event_id) if envelope else None,
            },
        )
