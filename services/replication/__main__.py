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
from services.replication.offline import import_pipeline
from services.replication.pruning import apply_retention
from services.replication.resync import start_due_resyncs
from services.replication.standby import OneActiveInstance
from shared import topics
from shared.http import create_app
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

    async def activate() -> None:
        """The active instance's work (one active instance per deployment: `standby.py`)."""
        rt = runtime
        rt.start_outbox_relay()
        feed = FeedWriter(settings)
        await feed.start()
        rt.on_stop(feed.stop)
        ctx = Context(pool=rt.pool, settings=settings, broker=rt.kafka, feed=feed)
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
        every = settings.health_interval_seconds
        rt.spawn_every("health", every, lambda: evaluate_health(ctx))
        rt.spawn_every("resync", every, lambda: start_due_resyncs(ctx))
        rt.spawn_every(
            "retention",
            settings.retention_interval_seconds,
            lambda: apply_retention(ctx),
        )

    one_active = OneActiveInstance(runtime, settings, activate)

    async def on_start(rt: Runtime) -> None:
        await one_active.start()

    app = create_app(
        runtime,
        title="Replication service",
        description="Protected items, the change-block delta pipeline, the replica store, "
        "verifiable recovery points, retention, resync, RPO and health.",
        on_start=on_start,
    )
    app.include_router(router, dependencies=[Depends(one_active.require_active)])
    return app


def main() -> None:
    settings = ReplicationSettings()
    configure_logging("replication", settings.log_level)
    serve(build_app(settings), settings.http_host, settings.http_port)


if __name__ == "__main__":
    main()
