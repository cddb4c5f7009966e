"""The least a process runtime gives the shared HTTP edge (`shared.http.create_app`), for unit
tests of the edge itself: settings, and a start, stop and health that touch nothing."""

from __future__ import annotations

from typing import Any

from shared.settings import CommonSettings, ServiceSettings


class StubRuntime:
    def __init__(self, settings: CommonSettings | None = None) -> None:
        self.settings = settings or ServiceSettings()

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def health(self) -> dict[str, Any]:
        return {"status": "ok"}
