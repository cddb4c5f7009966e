"""`python -m services.failover` runs the failover service."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from services.failover import handlers, plans
from services.failover.api import router
from services.failover.config import FailoverSettings
from services.failover.consumer import event_consumer
from services.failover.workflow import Engine, Notifier
from shared import topics
from shared.http import create_app
from shared.logging import configure_logging
from shared.runtime import Runtime, serve

MIGRATIONS = Path(__file__).parent / "migrations"


def build_app(settings: FailoverSettings) -> FastAPI:
    runtime = Runtime(
        "failover",
        settings,
        migrations=MIGRATIONS,
        topics=(
            topics.FAILOVER_EVENTS,
            topics.REPLICATION_EVENTS,
            topics.AGENT_COMMANDS,
            topics.AGENT_EVENTS,
            topics.REGISTRATION_EVENTS,
            topics.INVENTORY_EVENTS,
            topics.POLICY_EVENTS,
        ),
    )
    app: FastAPI

    async def on_start(rt: Runtime) -> None:
        notifier = Notifier()
        engine = Engine(rt.pool, settings, plans.workflows(), notifier)
        ctx = handlers.Context(pool=rt.pool, settings=settings, engine=engine, notifier=notifier)
        app.state.context = ctx
        rt.spawn("event-consumer", event_consumer(ctx, rt.producer).run)
        rt.on_stop(engine.stop)
        await engine.resume_all()

        rt.spawn_every(
            "forced-test-cleanup",
            settings.cleanup_interval_seconds,
            lambda: handlers.force_old_test_cleanups(ctx),
        )

    app = create_app(
        runtime,
        title="Failover service",
        description="Test, planned and unplanned failover, cleanup, commit, reverse "
        "replication, failback and recovery plans, run as durable jobs of tasks. A failover in "
        "progress cannot be cancelled (replication has already been stopped).",
        on_start=on_start,
    )
    app.include_router(router)
    return app


def main() -> None:
    settings = FailoverSettings()
    configure_logging("failover", settings.log_level)
    serve(build_app(settings), settings.http_host, settings.http_port)


if __name__ == "__main__":
    main()
