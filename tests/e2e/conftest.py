"""The e2e platform: services started as real processes, once per session, over the real
Kafka and PostgreSQL; tests start the services they need with `platform.start(name)`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.platform import Platform
from tests.support.stack import Stack


@pytest.fixture(scope="session")
def platform(
    stack: Stack, database_url: str, topic_prefix: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Platform]:
    log_dir: Path = tmp_path_factory.mktemp("platform")
    plat = Platform(stack=stack, database_url=database_url, prefix=topic_prefix, log_dir=log_dir)
    try:
        yield plat
    finally:
        plat.stop_all()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=15) as client:
        yield client
