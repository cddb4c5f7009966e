"""`python -m services.site_provider` runs a site provider (one VMM server)."""

from __future__ import annotations

import logging
import socket
import sys

from fastapi import FastAPI

from services.site_provider.config import ProviderSettings
from services.site_provider.discovery import Discovery
from services.site_provider.sitefile import SiteFileError
from shared import topics
from shared.edge import EdgeRuntime
from shared.http import create_app
from shared.logging import configure_logging
from shared.runtime import serve
from shared.schemas.registration import ProducerKind

log = logging.getLogger(__name__)


def build_app(settings: ProviderSettings, discovery: Discovery) -> FastAPI:
    runtime = EdgeRuntime(
        "site-provider",
        settings,
        ProducerKind.PROVIDER,
        status=discovery.status,
        topics_used=(topics.REGISTRATION_HEARTBEATS, topics.INVENTORY_DISCOVERY),
    )

    async def on_start(rt: EdgeRuntime) -> None:
        publisher = rt.publisher
        assert publisher is not None
        rt.spawn("discovery", lambda: discovery.run(publisher))

    return create_app(
        runtime,
        title="Site provider",
        description="Edge process of one VMM server: registration, heartbeats, discovery.",
        on_start=on_start,
    )


def main() -> None:
    settings = ProviderSettings()
    if not settings.name:
        settings.name = socket.getfqdn()
    configure_logging("site-provider", settings.log_level)
    discovery = Discovery(settings)
    try:
        discovery.discover()  # refuse to start on an unusable site description
    except SiteFileError as exc:
        log.error("site description unusable", extra={"error": str(exc)})
        sys.exit(2)
    serve(build_app(settings, discovery), settings.http_host, settings.http_port)


if __name__ == "__main__":
    main()
