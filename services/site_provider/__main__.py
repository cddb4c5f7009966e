"""`python -m services.site_provider` runs a site provider (one VMM server)."""

from __future__ import annotations

import socket

from fastapi import FastAPI

from services.site_provider.config import ProviderSettings
from shared.edge import EdgeRuntime
from shared.http import create_app
from shared.logging import configure_logging
from shared.runtime import serve
from shared.schemas.registration import ProducerKind


def build_app(settings: ProviderSettings) -> FastAPI:
    runtime = EdgeRuntime("site-provider", settings, ProducerKind.PROVIDER)
    return create_app(
        runtime,
        title="Site provider",
        description="Edge process of one VMM server: registration, heartbeats, discovery.",
    )


def main() -> None:
    settings = ProviderSettings()
    if not settings.name:
        settings.name = socket.getfqdn()
    configure_logging("site-provider", settings.log_level)
    serve(build_app(settings), settings.http_host, settings.http_port)


if __name__ == "__main__":
    main()
