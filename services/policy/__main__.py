"""`python -m services.policy` runs the policy service."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from services.policy.api import router
from services.policy.config import PolicySettings
from services.policy.consumer import CONSUMED_TOPICS, read_model_consumer
from services.policy.handlers import publish_all_verdicts
from shared import topics
from shared.http import create_app
from shared.logging import configure_logging
from shared.runtime import Runtime, serve

MIGRATIONS = Path(__file__).parent / "migrations"


def build_app(settings: PolicySettings) -> FastAPI:
    runtime = Runtime(
        "policy",
        settings,
        migrations=MIGRATIONS,
        topics=(topics.POLICY_EVENTS, *CONSUMED_TOPICS),
    )

    async def on_start(rt: Runtime) -> None:
        await publish_all_verdicts(rt.pool)
        rt.spawn("read-model-consumer", read_model_consumer(rt, settings).run)

    app = create_app(
        runtime,
        title="Policy service",
        description="Replication policies, cloud pairings, network mappings and the "
        "enable-replication prerequisite checks.",
        on_start=on_start,
    )
    app.include_router(router)
    return app


def main() -> None:
    settings = PolicySettings()
    configure_logging("policy", settings.log_level)
    serve(build_app(settings), settings.http_host, settings.http_port)


if __name__ == "__main__":
    main()
