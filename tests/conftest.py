"""Fixtures shared by every test layer.

Unit tests need nothing. Integration and e2e tests need the real Kafka and PostgreSQL of the
local stack (`make up`, or `make test` which starts it); each session gets a fresh database and
a fresh topic prefix, so runs never see each other's data.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from kit.stack import Stack, fresh_database, random_prefix, stack_from_env


@pytest.fixture(scope="session")
def stack() -> Stack:
    s = stack_from_env()
    problem = s.reachable()
    if problem:
        pytest.fail(problem, pytrace=False)
    return s


@pytest.fixture(scope="session")
async def database_url(stack: Stack) -> AsyncIterator[str]:
    yield await fresh_database(stack, "it")


@pytest.fixture(scope="session")
def topic_prefix() -> str:
    return random_prefix("it")
