"""`python -m services.host_agent` runs a host agent."""

from __future__ import annotations

import socket
from typing import Any

from fastapi import FastAPI

from services.host_agent.config import AgentSettings
from shared.edge import EdgeRuntime
from shared.http import create_app
from shared.logging import configure_logging
from shared.runtime import serve
from shared.schemas.registration import ProducerKind


def build_app(settings: AgentSettings) -> FastAPI:
    def metadata() -> dict[str, Any]:
        return {
            "host_os_version": settings.host_os_version,
            "storage_dir": str(settings.storage_dir),
        }

    runtime = EdgeRuntime("host-agent", settings, ProducerKind.AGENT, metadata=metadata)
    return create_app(
        runtime,
        title="Host agent",
        description="Edge process of one Hyper-V host: registration, heartbeats, replication.",
    )


def main() -> None:
    settings = AgentSettings()
    if not settings.name:
        settings.name = socket.getfqdn()
    configure_logging("host-agent", settings.log_level)
    serve(build_app(settings), settings.http_host, settings.http_port)


if __name__ == "__main__":
    main()
