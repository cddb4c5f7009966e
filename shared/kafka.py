"""Kafka producer and consumer used by every service.

`KafkaProducer` wraps aiokafka's producer (acks=all, idempotent) and applies the topic prefix.
`EventConsumer` is the one way a service consumes events: it parses and validates each record
(envelope, event type, payload, signature, vault), de-duplicates by event id in the same
PostgreSQL transaction as the handler's effect, sends anything invalid to `<topic>.dlq` with a
reason header, a metric and a log line, and commits the Kafka offset only after the effect (or
the dead-lettering) is durable. Infrastructure errors (database or broker down) are retried
with backoff without skipping the record; a handler that keeps failing on one record dead-letters
it after a few tries so one bad record never stalls its partition.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, Literal, Protocol, TypeVar

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from aiokafka.helpers import create_ssl_context
from prometheus_client import Counter, Gauge, Histogram
from pydantic import ValidationError
from pydantic_core import from_json

from shared import topics
from shared.schemas.envelope import Envelope, EventPayload
from shared.schemas.registry import payload_model
from shared.settings import CommonSettings

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
RUNS = Counter(
    "dr_consumer_runs_total",
    "Runs of records tried in one transaction: applied, or handled one by one instead",
    ["topic", "result"],
)

CONSUMER_LAG = Gauge(
    "dr_consumer_lag",
    "Records behind the partition's end (highwater - position) of an aiokafka consumer loop",
    ["topic", "partition", "group"],
)

MAX_RECORD_BYTES = 1_000_000
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


class RunFallback(Exception):
    """Raised by a `RunHandler`: handle these records one by one (nothing of the run is kept)."""


# Lookups memoised for one pass over a few records: the transaction of a run (see
# `EventConsumer`) or a delta `prepare` step; e.g. the producer a signature is checked against.
# None elsewhere (set it with a token and reset it: a memo must not outlive its pass).
RUN_MEMO: ContextVar[dict[Any, Any] | None] = ContextVar("dr_run_memo", default=None)


class Rejected(Exception):
    """A record that must not be applied: it goes to the DLQ with `reason` (a short code) and
    `detail` (what is wrong, for a human)."""

    def __init__(self, reason: str, detail: str = "", *, keep_effects: bool = False) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        # True: the handler's writes so far are committed (e.g. "item needs a resync"), and
        # the record still goes to the DLQ with the reason.
        self.keep_effects = keep_effects


@dataclass(frozen=True)
class KafkaSecurity:
    """How a client reaches the broker: mutual TLS with a client certificate (the broker
    maps the certificate's CN to the principal its ACLs name) or plaintext. Every Kafka
    client of the platform (aiokafka producers, consumers and admin clients, faust apps)
    takes its settings from here."""

    protocol: Literal["tls", "plaintext"] = "plaintext"
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""

    @classmethod
    def from_settings(cls, s: CommonSettings) -> KafkaSecurity:
        return cls(s.kafka_security, s.kafka_ca_file, s.kafka_cert_file, s.kafka_key_file)

    @classmethod
    def from_env(cls) -> KafkaSecurity:
        """From DR_KAFKA_SECURITY, DR_KAFKA_CA_FILE, DR_KAFKA_CERT_FILE, DR_KAFKA_KEY_FILE."""
        return cls.from_settings(CommonSettings())

    def ssl_context(self) -> ssl.SSLContext | None:
        """None for plaintext; for tls a context that checks the broker's certificate and
        host name against the CA and presents this client's certificate."""
        if self.protocol == "plaintext":
            return None
        missing = [
            name
            for name, path in (
                ("DR_KAFKA_CA_FILE", self.ca_file),
                ("DR_KAFKA_CERT_FILE", self.cert_file),
                ("DR_KAFKA_KEY_FILE", self.key_file),
            )
            if not path
        ]
        if missing:
            raise ValueError(f"DR_KAFKA_SECURITY=tls needs {', '.join(missing)}")
        context: ssl.SSLContext = create_ssl_context(
            cafile=self.ca_file, certfile=self.cert_file, keyfile=self.key_file
        )
        return context

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments for an aiokafka client."""
        context = self.ssl_context()
        if context is None:
            return {}
        return {"security_protocol": "SSL", "ssl_context": context}


def admin_client(
    bootstrap: str, security: KafkaSecurity | None = None, **options: Any
) -> AIOKafkaAdminClient:
    """An aiokafka admin client with `security` (default: from the environment)."""
    return AIOKafkaAdminClient(
        bootstrap_servers=bootstrap,
        **(security or KafkaSecurity.from_env()).client_options(),
        **options,
    )


class KafkaProducer:
    def __init__(
        self,
        bootstrap: str,
        prefix: str,
        client_id: str,
        *,
        linger_ms: int = 5,
        max_batch_bytes: int = 16_384,
        security: KafkaSecurity | None = None,
    ) -> None:
        """`linger_ms`: how long a record waits for others to share its batch. aiokafka keeps
        one open batch per partition and a record that does not fit waits for it to go, so
        a producer of ~700 KB records (an agent's block batches) gains nothing from lingering
        and pays it on every record: edges use 0. `max_batch_bytes`: the most one record batch
        holds; aiokafka has one produce request in flight per broker, so records queued
        meanwhile go together in the next (an agent uses `topics.DELTA_RECORD_BATCH_BYTES`;
        the topic's `max.message.bytes` must allow it). `security`: default from the
        environment (`KafkaSecurity.from_env`)."""
        self.prefix = prefix
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            client_id=client_id,
            acks="all",
            enable_idempotence=True,
            linger_ms=linger_ms,
            max_batch_size=max_batch_bytes,
            max_request_size=max(1_048_576, 2 * max_batch_bytes),
            request_timeout_ms=30_000,
            **(security or KafkaSecurity.from_env()).client_options(),
        )
        self.started = False

    async def start(self) -> None:
        await self._producer.start()
        self.started = True

    async def stop(self) -> None:
        self.started = False
        await self._producer.stop()

    async def partition_count(self, topic: str) -> int:
        """Partitions of the logical `topic` (from the broker's metadata)."""
        return len(await self._producer.partitions_for(topics.physical(topic, self.prefix)))

    async def unreachable(self, timeout: float = 2.0) -> str | None:
        """None when a broker answers a metadata request within `timeout` seconds, else why
        not (a started producer says nothing of a broker that stopped answering since)."""
        try:
            await asyncio.wait_for(self._producer.client.fetch_all_metadata(), timeout)
        except TimeoutError:
            return f"no broker answered a metadata request within {timeout:g}s"
        except (KafkaError, OSError) as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    async def send(
        self,
        topic: str,
        value: bytes,
        *,
        key: str | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> asyncio.Future[Any]:
        """Queue a record on the logical `topic`; await the returned future for the ack."""
        future: asyncio.Future[Any] = await self._producer.send(
            topics.physical(topic, self.prefix),
            value,
            key=key.encode() if key is not None else None,
            headers=headers,
        )
        return future

    async def send_and_wait(
        self,
        topic: str,
        value: bytes,
        *,
        key: str | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        await (await self.send(topic, value, key=key, headers=headers))

    async def publish(self, envelope: Envelope, *, key: str, topic: str) -> None:
        await self.send_and_wait(topic, envelope.to_bytes(), key=key)


async def ensure_topics(
    bootstrap: str,
    prefix: str,
    names: Iterable[str],
    *,
    partitions: int,
    security: KafkaSecurity | None = None,
) -> None:
    """Create each logical topic and its DLQ twin if missing, with its `topics.CONFIGS`, and
    set those configs on the ones that exist (idempotent). A topic the client's principal
    may not describe looks missing and its creation is refused: the broker's answer is not
    an error here (the topic is someone else's to create)."""
    admin = admin_client(bootstrap, security)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted: list[NewTopic] = []
        configured: list[ConfigResource] = []
        for name in names:
            for t in (name, topics.dlq_of(name)):
                physical = topics.physical(t, prefix)
                configs = topics.CONFIGS.get(t, {})
                if physical not in existing:
                    parts = partitions if not t.endswith(".dlq") else 1
                    wanted.append(
                        NewTopic(
                            physical,
                            num_partitions=parts,
                            replication_factor=1,
                            topic_configs=configs,
                        )
                    )
                elif configs:
                    configured.append(ConfigResource(ConfigResourceType.TOPIC, physical, configs))
        if configured:
            await admin.alter_configs(configured)
        if wanted:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(wanted)
    finally:
        await admin.close()


@dataclass(frozen=True)
class Incoming:
    """A validated event handed to a handler."""

    envelope: Envelope
    payload: EventPayload
    topic: str
    partition: int
    offset: int
    key: str | None


Handler = Callable[[asyncpg.Connection, Incoming], Awaitable[None]]
# A handler of a run of consecutive records of one type and key, in one transaction: its
# effects must be exactly those of the type's `Handler` applied to each record in order. It
# raises (`RunFallback` or anything else) to have the run handled record by record instead.
RunHandler = Callable[[asyncpg.Connection, list[Incoming]], Awaitable[None]]
Prepare = Callable[[list[tuple[Envelope, Any]]], Awaitable[None]]
Verifier = Callable[[asyncpg.Connection, Envelope, bool], Awaitable[None]]


def decode_event(value: bytes | None, max_age: timedelta | None = None) -> tuple[Envelope, Any]:
    """Parse a record value into (envelope, payload); raise `Rejected` with the reason."""
    if value is None:
        raise Rejected("empty_record", "record has no value")
    if len(value) > MAX_RECORD_BYTES:
        raise Rejected("oversize_record", f"{len(value)} bytes > {MAX_RECORD_BYTES}")
    try:
        # pydantic-core's parser (jiter): ~7x the stdlib's speed on records carrying base64
        # block data, the same JSON accepted (ValueError on bad JSON or UTF-8)
        raw = from_json(value)
    except ValueError as exc:
        raise Rejected("malformed_json", str(exc)) from None
    try:
        envelope = Envelope.model_validate(raw)
    except ValidationError as exc:
        raise Rejected("invalid_envelope", _errors(exc)) from None
    et = payload_model(envelope.type, envelope.schema_version)
    if et is None:
        raise Rejected(
            "unknown_event_type", f"{envelope.type} v{envelope.schema_version} is not a known event"
        )
    try:
        payload = et.model.model_validate(envelope.payload)
    except ValidationError as exc:
        raise Rejected("invalid_payload", _errors(exc)) from None
    if max_age is not None and et.signed:
        age = datetime.now(UTC) - envelope.occurred_at
        if age > max_age:
            raise Rejected("stale_event", f"occurred {age.total_seconds():.0f}s ago (replay?)")
        if age < -timedelta(minutes=2):
            raise Rejected("future_event", "occurred_at is in the future")
    return envelope, payload


def _errors(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


class RawRecord(Protocol):
    """What the pipeline needs of a record (aiokafka's ConsumerRecord, faust's Message)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...


H = TypeVar("H")


class _RecordPipeline(Generic[H]):
    """Consumes `topic_names` in consumer group `group` and applies each event with its handler.

    `handlers` maps event type name -> handler; events of other types on the topic are
    acknowledged and skipped (a topic carries many types; not every consumer needs all).
    `process()` is usable on its own (e.g. from a faust agent); `run()` is the aiokafka loop.
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
        self.alive = False
        self.applied = 0
        self.last_records_at: datetime | None = None  # the last fetch that brought records

    async def _apply(self, incoming: Incoming, handler: H) -> None:
        raise NotImplementedError

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
        decoded: list[tuple[Envelope, Any] | Rejected] = []
        for record in records:
            try:
                decoded.append(decode_event(record.value, self.max_age))
            except Rejected as rej:
                decoded.append(rej)
        if prepare is None:
            await self._process_range(records, decoded, 0, len(records))
            return

        async def prepared(part: list[tuple[Envelope, Any] | Rejected]) -> None:
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
        decoded: Sequence[tuple[Envelope, Any] | Rejected],
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
                or not await self._process_run(records[i:j], decoded[i:j], handler)
            ):
                for k in range(i, j):
                    await self._process_decoded(records[k], decoded[k])
            i = j

    def _run_handler(self, result: tuple[Envelope, Any] | Rejected) -> Any:
        return None

    async def _process_run(
        self, records: Sequence[RawRecord], decoded: Sequence[Any], handler: Any
    ) -> bool:
        return False

    async def _process_decoded(
        self, record: RawRecord, result: tuple[Envelope, Any] | Rejected
    ) -> None:
        topic = topics.logical(record.topic, self.prefix)
        key = record.key.decode(errors="replace") if record.key else None
        if isinstance(result, Rejected):
            await self._dead_letter(record, topic, result)
            return
        envelope, payload = result
        handler = self.handlers.get(envelope.type)
        if handler is None:
            return
        incoming = Incoming(envelope, payload, topic, record.partition, record.offset, key)
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


class EventConsumer(_RecordPipeline[Handler]):
    """The services' consumer: each event is applied in one PostgreSQL transaction together
    with its de-duplication row (`processed_events`), so the effect is exactly-once even
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

    def _run_handler(self, result: tuple[Envelope, Any] | Rejected) -> Any:
        if isinstance(result, Rejected) or result[0].type not in self.handlers:
            return None
        return self.run_handlers.get(result[0].type)

    async def _process_run(
        self, records: Sequence[RawRecord], decoded: Sequence[Any], handler: Any
    ) -> bool:
        """A run of records of one type and key in one transaction: de-duplication rows,
        verification and the run handler's effects, all or nothing. False (nothing kept) if
        anything in it is not plain sailing: the caller then handles the records one by one,
        which is where rejections, dead letters and retries happen."""
        topic = topics.logical(records[0].topic, self.prefix)
        incomings: list[Incoming] = []
        seen: set[Any] = set()
        for record, (envelope, payload) in zip(records, decoded, strict=True):
            if envelope.event_id in seen:  # a re-sent record within the run: one is enough
                continue
            seen.add(envelope.event_id)
            key = record.key.decode(errors="replace") if record.key else None
            incomings.append(
                Incoming(envelope, payload, topic, record.partition, record.offset, key)
            )
        started = time.perf_counter()
        token = RUN_MEMO.set({})
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                fresh = {
                    row[0]
                    for row in await conn.fetch(
                        "INSERT INTO processed_events (consumer, event_id)"
                        " SELECT $1, unnest($2::uuid[]) ON CONFLICT DO NOTHING"
                        " RETURNING event_id",
                        self.group,
                        [inc.envelope.event_id for inc in incomings],
                    )
                }
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
            fresh = await conn.fetchval(
                "INSERT INTO processed_events (consumer, event_id) VALUES ($1, $2)"
                " ON CONFLICT DO NOTHING RETURNING true",
                self.group,
                env.event_id,
            )
            if not fresh:
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


class PlainEventConsumer(_RecordPipeline[PlainHandler]):
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


class RangeUnavailable(Exception):
    """Records of an offset range are no longer (or not yet) readable."""


async def read_range(
    bootstrap: str,
    topic: str,
    partition: int,
    first: int,
    last: int,
    *,
    timeout: float = 60.0,
    security: KafkaSecurity | None = None,
) -> AsyncIterator[list[RawRecord]]:
    """Records `first`..`last` (inclusive) of one partition of `topic` (physical name), as
    fetched (a few MiB at a time, so a large range is never all in memory), read without a
    consumer group. RangeUnavailable when the first is gone (retention) or the range is not
    all read within `timeout` seconds of no progress. `security`: default from the
    environment."""
    tp = TopicPartition(topic, partition)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        **(security or KafkaSecurity.from_env()).client_options(),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=2 * 1_048_576,
    )
    await consumer.start()
    try:
        consumer.assign([tp])
        consumer.seek(tp, first)
        expected = first
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            batch = await consumer.getmany(tp, timeout_ms=500)
            records: list[RawRecord] = []
            for record in batch.get(tp, []):
                if expected == first and record.offset != first:
                    raise RangeUnavailable(
                        f"{topic}[{partition}] offset {first} is gone (first readable "
                        f"{record.offset})"
                    )
                if record.offset > last:
                    break
                records.append(record)
                expected = record.offset + 1
            if records:
                yield records
                deadline = time.monotonic() + timeout
            if expected > last:
                return
        raise RangeUnavailable(f"{topic}[{partition}] {first}..{last} not read in {timeout:.0f} s")
    finally:
        await consumer.stop()
