"""`python -m services.host_agent` runs a host agent."""

from __future__ import annotations

import socket

from fastapi import FastAPI

from services.host_agent.api import add_routes
from services.host_agent.config import AgentSettings
from services.host_agent.runtime import AgentRuntime
from shared.http import create_app
from shared.logging import configure_logging
from shared.runtime import serve


def build_app(settings: AgentSettings) -> FastAPI:
    app = create_app(
        AgentRuntime(settings),
        title="Host agent",
        description="Edge process of one Hyper-V host: registration, heartbeats, replication.",
    )
    add_routes(app)
    return app


def main() -> None:
    settings = AgentSettings()
    if not settings.name:
        settings.name = socket.getfqdn()
    configure_logging("host-agent", settings.log_level)
    serve(build_app(settings), settings.http_host, settings.http_port)


if __name__ == "__main__":
    main()
