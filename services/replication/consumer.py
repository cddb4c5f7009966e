"""Kafka entrypoints of the replication service.

- The delta pipeline (`replication.deltas.v1`) runs as a faust-streaming agent
  (`at_least_once`, concurrency 1: one coroutine per partition assignment, so offsets are never
  committed past a record still in flight). It takes records in groups; the blocks of a
  group's records are verified and written to the replica store first (one pack append and
  fdatasync per item), then the records are handled in order: consecutive `BlocksShipped` of one
  cycle in one transaction (item, cycle and producer looked up once, batches staged in two
  statements), every other record, and any such run with anything wrong in it, one by one in
  its own transaction; the group's offsets are committed once all of it is handled. Each
  record goes through the shared pipeline: validation, signature and vault check,
  de-duplication by event id in the same PostgreSQL transaction as its effect, DLQ with a
  reason for anything invalid.
- Read models, agent reports and the failover service's requests (`failover_events`) come
  through the shared aiokafka `EventConsumer`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any, cast

import faust
from faust.types import EventT
from mode.utils.aiter import aiter

from services.replication.agent_events import make_agent_event_handlers
from services.replication.config import ReplicationSettings
from services.replication.context import Context
from services.replication.delta_handlers import make_delta_handlers
from services.replication.delta_prepare import make_delta_prepare
from services.replication.failover_events import make_failover_handlers
from services.replication.host_points import export_answers
from services.replication.materialise import make_replica_answers
from services.replication.read_models import make_read_model_handlers
from services.replication.seeding import make_seeding_handlers
from shared import topics
from shared.kafka.consumers import EventConsumer
from shared.kafka.security import KafkaSecurity
from shared.readmodels import registration_handlers, signature_verifier
from shared.runtime import Runtime

log = logging.getLogger(__name__)

DELTA_GROUP = 16  # records handed to the pipeline at once (offsets committed after all)
# Records whose blocks are written together; a smaller chunk than the group overlaps the next
# chunk's writes with this one's transactions (4 measured no different from 16 in the catch-up
# bench on a 2-CPU host, within its noise).
DELTA_PREPARE_CHUNK = 16
DELTA_GROUP_WITHIN = 0.002  # seconds a partial group waits for more (0.01 measured slower)


def delta_pipeline(
    runtime: Runtime, ctx: Context, *, group: str = "replication.deltas", aged: bool = True
) -> EventConsumer:
    """The verified delta pipeline; `aged=False` skips the age check of signed envelopes (cycle
    files imported for an offline initial replication arrive days after they were signed)."""
    s = ctx.settings
    delta_handlers, run_handlers = make_delta_handlers(ctx)
    return EventConsumer(
        bootstrap=s.kafka_bootstrap_servers,
        prefix=s.topic_prefix,
        group=group,
        topic_names=[topics.REPLICATION_DELTAS],
        pool=runtime.pool,
        producer=runtime.producer,
        handlers=delta_handlers,
        run_handlers=run_handlers,
        verifier=signature_verifier(),
        max_age=timedelta(seconds=s.event_max_age_seconds) if aged else None,
    )


async def take_groups(
    stream: faust.StreamT[Any], max_: int, within: float
) -> AsyncIterator[list[EventT[Any]]]:
    """Groups of up to `max_` events, as faust's `Stream.take_events(max_, within)` (0.15.3,
    whose code this follows line for line) yields them, with one difference: while no event is
    buffered it waits for one without a timeout, and only then up to `within` for the group to
    fill. faust's loop wakes every `within` seconds even when idle (~500 wake-ups a second at
    2 ms: about an eighth of the service's GIL time while replicating was spent there); this
    one does not. Events are acknowledged (so their offsets may be committed) only after the
    body handled the group, as in faust."""
    buffer: list[Any] = []
    events: list[EventT[Any]] = []
    started, full, consumed = asyncio.Event(), asyncio.Event(), asyncio.Event()
    consuming: asyncio.Future[None] | None = None
    enable_acks = stream.enable_acks
    impl = cast(Any, stream)  # the private parts take_events uses

    async def add_to_buffer(value: Any) -> Any:
        nonlocal consuming
        try:
            if consuming is not None:
                try:
                    await consuming
                finally:
                    consuming = None
            buffer.append(value)
            event = stream.current_event
            if event is None:
                raise RuntimeError("take buffer found current_event is None")
            events.append(event)
            started.set()
            if len(buffer) >= max_:
                full.set()
                consumed.clear()
                await impl.wait(consumed)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("error adding to the take buffer: %r", exc)
            await impl.crash(exc)
        return value

    stream.enable_acks = False
    stream.add_processor(add_to_buffer)
    impl._enable_passive(aiter(stream.channel))
    try:
        while not stream.should_stop:
            if not buffer:
                await impl.wait_for_stopped(started)
            await impl.wait_for_stopped(full, timeout=within)
            if buffer:
                consuming = asyncio.get_running_loop().create_future()
                try:
                    yield list(events)
                finally:
                    buffer.clear()
                    for event in events:
                        await stream.ack(event)
                    events.clear()
                    if not consuming.done():
                        consuming.set_result(None)
                    started.clear()
                    full.clear()
                    consumed.set()
    finally:
        stream.enable_acks = enable_acks
        impl._processors.remove(add_to_buffer)


def _faust_credentials(settings: ReplicationSettings) -> faust.SSLCredentials | None:
    """The service's Kafka client certificate for faust (None: plaintext)."""
    context = KafkaSecurity.from_settings(settings).ssl_context()
    return None if context is None else faust.SSLCredentials(context)


def delta_app(
    settings: ReplicationSettings, pipeline: EventConsumer, ctx: Context | None = None
) -> faust.App:
    """The faust app whose one agent feeds delta records to the pipeline (in groups of up to
    `DELTA_GROUP` records; with `ctx`, each group's blocks are written to the store first)."""
    prepare = make_delta_prepare(ctx) if ctx is not None else None
    app_id = f"{settings.topic_prefix}replication-deltas"
    # faust keeps a folder for its tables even with the memory store: under the state root,
    # not in whatever directory the process was started from (faust makes only the last level)
    datadir = settings.store_dir.parent / "faust" / app_id
    datadir.parent.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        app_id,
        broker=[f"kafka://{b}" for b in settings.kafka_bootstrap_servers.split(",")],
        broker_credentials=_faust_credentials(settings),
        processing_guarantee="at_least_once",
        web_enabled=False,
        autodiscover=False,
        store="memory://",
        datadir=str(datadir),
        topic_partitions=settings.topic_partitions,
        topic_allow_declare=True,
        consumer_auto_offset_reset="earliest",
        broker_commit_every=100,
        broker_commit_interval=1.0,
        broker_session_timeout=10.0,
        broker_heartbeat_interval=3.0,
        stream_buffer_maxsize=256,
        consumer_max_fetch_size=2 * topics.DELTA_RECORD_BATCH_BYTES,
        # Kafka's CRC over each record batch is redundant here: every delta record is signed
        # (Ed25519 over all of it but block data) and every block is checked against its signed
        # SHA-256 before it is stored; a damaged record is dead-lettered by those checks.
        # (crc32c was ~4 % of the service's CPU while replicating.)
        broker_check_crcs=False,
    )
    topic = app.topic(
        topics.physical(topics.REPLICATION_DELTAS, settings.topic_prefix),
        config=topics.CONFIGS[topics.REPLICATION_DELTAS],  # if faust is the first to declare it
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
    )

    async def apply_deltas(stream: faust.StreamT[Any]) -> AsyncIterator[None]:
        # Groups of records: faust acks (and so commits) a group's offsets only after the
        # body has handled every record of it; the records are handled in order (runs of
        # batches of one cycle in one transaction), after `prepare` wrote the group's blocks.
        async for events in take_groups(stream, DELTA_GROUP, DELTA_GROUP_WITHIN):
            try:
                await pipeline.process_many(
                    [e.message for e in events], prepare, chunk=DELTA_PREPARE_CHUNK
                )
            finally:
                if ctx is not None:
                    ctx.prestored.clear()
            yield None

    app.agent(topic, name="apply-deltas", concurrency=1)(apply_deltas)
    return app


def side_consumer(runtime: Runtime, ctx: Context) -> EventConsumer:
    s = ctx.settings
    seeding = make_seeding_handlers(ctx)
    return EventConsumer(
        bootstrap=s.kafka_bootstrap_servers,
        prefix=s.topic_prefix,
        group="replication.side",
        topic_names=[
            topics.REGISTRATION_EVENTS,
            topics.INVENTORY_EVENTS,
            topics.POLICY_EVENTS,
            topics.AGENT_EVENTS,
            topics.FAILOVER_EVENTS,
        ],
        pool=runtime.pool,
        producer=runtime.producer,
        handlers={
            **registration_handlers(),
            **make_read_model_handlers(),
            **make_agent_event_handlers(
                ctx, {**make_replica_answers(ctx), **seeding[1], **export_answers(ctx)}
            ),
            **seeding[0],
            **make_failover_handlers(ctx),
        },
        verifier=signature_verifier(),
        max_age=timedelta(seconds=s.event_max_age_seconds),
    )
