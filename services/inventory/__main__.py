"""`python -m services.inventory` runs the inventory service."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from services.inventory.api import router
from services.inventory.config import InventorySettings
from services.inventory.consumer import discovery_consumer, registration_consumer
from shared import topics
from shared.http import create_app
from shared.logging import configure_logging
from shared.runtime import Runtime, serve

MIGRATIONS = Path(__file__).parent / "migrations"


def build_app(settings: InventorySettings) -> FastAPI:
    runtime = Runtime(
        "inventory",
        settings,
        migrations=MIGRATIONS,
        topics=(topics.REGISTRATION_EVENTS, topics.INVENTORY_DISCOVERY, topics.INVENTORY_EVENTS),
    )

    async def on_start(rt: Runtime) -> None:
        rt.spawn("registration-consumer", registration_consumer(rt, settings).run)
        rt.spawn("discovery-consumer", discovery_consumer(rt, settings).run)

    app = create_app(
        runtime,
        title="Inventory service",
        description="Clouds, hosts, VMs and VM networks discovered by the sites' providers.",
        on_start=on_start,
    )
    app.include_router(router)
    return app


def main() -> None:
    settings = InventorySettings()
    configure_logging("inventory", settings.log_level)
    serve(build_app(settings), settings.http_host, settings.http_port)


if __name__ == "__main__":
    main()
