"""`python -m services.replication` runs the replication service."""

from __future__ import annotations

from pathlib import Path

from fastapi import Depends, FastAPI

from services.replication.api import router
from services.replication.config import ReplicationSettings
from services.replication.consumer import delta_app, delta_pipeline, side_consumer
from services.replication.context import Context
from services.replication.failover_worker import failover_worker
from services.replication.feed import FeedWriter
from services.replication.health import evaluate_health
from services.replication.host_points import prune_host_requests
from services.replication.offline import import_pipeline
from services.replication.pruning import apply_retention
from services.replication.resync import start_due_resyncs
from services.replication.standby import OneActiveInstance
from shared import topics
from shared.http import create_app
from shared.kafka.ranges import RangeReader
from shared.logging import configure_logging
from shared.runtime import Runtime, serve

MIGRATIONS = Path(__file__).parent / "migrations"


def build_app(settings: ReplicationSettings) -> FastAPI:
    runtime = Runtime(
        "replication",
        settings,
        migrations=MIGRATIONS,
        topics=(
            topics.REPLICATION_DELTAS,
            topics.REPLICATION_EVENTS,
            topics.AGENT_COMMANDS,
            topics.AGENT_EVENTS,
            topics.REGISTRATION_EVENTS,
            topics.INVENTORY_EVENTS,
            topics.POLICY_EVENTS,
            topics.FAILOVER_EVENTS,
        ),
        relay_outbox=False,  # from the active instance only
    )
    app: FastAPI
    ctx: Context | None = None

    async def start_pipeline() -> None:
        """The delta pipeline and the side consumer (consumer groups: instances share the
        partitions), the failover requests they record, and the API's context."""
        nonlocal ctx
        rt = runtime
        feed = FeedWriter(settings)
        await feed.start()
        rt.on_stop(feed.stop)
        delta_reader = RangeReader(settings.kafka_bootstrap_servers, security=feed.security)
        rt.on_stop(delta_reader.close)
        ctx = Context(
            pool=rt.pool,
            settings=settings,
            broker=rt.kafka,
            feed=feed,
            delta_reader=delta_reader,
        )
        ctx.delta_partitions = await rt.producer.partition_count(topics.REPLICATION_DELTAS)
        app.state.context = ctx
        app.state.import_pipeline = import_pipeline(rt, ctx)
        pipeline = delta_pipeline(rt, ctx)
        faust_app = delta_app(settings, pipeline, ctx)
        await faust_app.start()
        rt.on_stop(faust_app.stop)
        rt.add_check("faust_delta_agent", lambda: not faust_app.should_stop)
        rt.spawn("side-consumer", side_consumer(rt, ctx).run)
        rt.spawn("failover-requests", lambda: failover_worker(ctx))

    async def start_coordination() -> None:
        """What one instance of the deployment does: the outbox relay (one relay keeps each
        key's events in order), health and RPO, due resyncs, retention."""
        assert ctx is not None
        rt, c = runtime, ctx
        rt.start_outbox_relay()
        every = settings.health_interval_seconds
        rt.spawn_every("health", every, lambda: evaluate_health(c))
        rt.spawn_every("resync", every, lambda: start_due_resyncs(c))
        rt.spawn_every(
            "retention",
            settings.retention_interval_seconds,
            lambda: apply_retention(c),
        )
        rt.spawn_every("prune-host-requests", 3600, lambda: prune_host_requests(rt.pool))

    async def activate() -> None:
        """The active instance's work, with a block copy: everything (one active instance per
        deployment, the one with the deployment's replica store: `standby.py`)."""
        await start_pipeline()
        await start_coordination()

    # Without a block copy the service keeps nothing of its own: every instance shares the
    # delta partitions, and the lock only picks the one that coordinates.
    shared_pipeline = not settings.keep_block_copy
    one_active = OneActiveInstance(
        runtime,
        settings,
        start_coordination if shared_pipeline else activate,
        store_bound=not shared_pipeline,
    )

    async def on_start(rt: Runtime) -> None:
        if shared_pipeline:
            await start_pipeline()
        await one_active.start()

    app = create_app(
        runtime,
        title="Replication service",
        description="Protected items, the change-block delta pipeline, the replica store, "
        "verifiable recovery points, retention, resync, RPO and health.",
        on_start=on_start,
    )
    app.include_router(
        router, dependencies=[] if shared_pipeline else [Depends(one_active.require_active)]
    )
    return app


def main() -> None:
    settings = ReplicationSettings()
    configure_logging("replication", settings.log_level)
    serve(build_app(settings), settings.http_host, settings.http_port)


if __name__ == "__main__":
    main()
