"""The e2e platform: services started as real processes, once per session, over the real
Kafka and PostgreSQL; tests start the services they need with `platform.start(name)`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from kit.platform import Platform
from kit.procs import stop_all
from kit.stack import Stack


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


@pytest.fixture(autouse=True)
def _stop_the_tests_edges(platform: Platform) -> Iterator[None]:
    """Host agents and site providers a test starts on the session platform stop with the
    test: left running (workloads, cycles, heartbeats) they would load the 2-core machine more
    with every test and slow the rest of the session down."""
    before = len(platform.edges)
    yield
    stop_all(platform.edges[before:])
    del platform.edges[before:]


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=15) as client:
        yield client
