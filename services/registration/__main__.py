"""`python -m services.registration` runs the registration service."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from services.registration import handlers
from services.registration.api import router
from services.registration.config import RegistrationSettings
from services.registration.consumer import heartbeat_consumer
from services.registration.domain import MissedHeartbeatClock
from services.registration.edge_certs import EdgeCertificates
from shared import topics
from shared.http import create_app
from shared.logging import configure_logging
from shared.runtime import Runtime, serve

MIGRATIONS = Path(__file__).parent / "migrations"


def build_app(settings: RegistrationSettings) -> FastAPI:
    runtime = Runtime(
        "registration",
        settings,
        migrations=MIGRATIONS,
        topics=(topics.REGISTRATION_EVENTS, topics.REGISTRATION_HEARTBEATS),
    )

    async def on_start(rt: Runtime) -> None:
        certificates: EdgeCertificates | None = app.state.edge_certificates
        if certificates is not None:
            edges = certificates

            async def refresh_edge_acls() -> None:
                await handlers.refresh_edge_acls(rt.pool, edges)

            rt.spawn("edge-acls", refresh_edge_acls, once=True)
        heartbeats = heartbeat_consumer(rt, settings)
        rt.spawn("heartbeat-consumer", heartbeats.run)
        clock = MissedHeartbeatClock(hold_seconds=settings.outage_hold_seconds)
        rt.spawn_every(
            "disconnect-sweeper",
            settings.sweep_interval_seconds,
            lambda: handlers.sweep_disconnected(
                rt.pool,
                settings.missed_heartbeats,
                rt.kafka,
                clock,
                lambda: heartbeats.last_records_at,
                rt.database,
            ),
        )

    app = create_app(
        runtime,
        title="Registration service",
        description="Vaults, API tokens, registration keys, site providers, host agents and "
        "their connection state.",
        on_start=on_start,
    )
    app.state.edge_certificates = EdgeCertificates.from_settings(settings)
    app.include_router(router)
    return app


def main() -> None:
    settings = RegistrationSettings()
    configure_logging("registration", settings.log_level)
    serve(build_app(settings), settings.http_host, settings.http_port)


if __name__ == "__main__":
    main()
