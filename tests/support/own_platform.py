"""A platform of its own (fresh database, fresh topic prefix) for test modules that put bad
records on shared topics on purpose (DLQ tests), so other modules' readers never see them."""

from __future__ import annotations

from pathlib import Path

from kit.platform import Platform
from kit.stack import Stack, fresh_database, random_prefix

# The replication service keeps a block copy in its replica store in the e2e tests of the
# features built on it (point downloads into any allowed folder, offline import, the copy
# fallback, the store's faults). Without one (the default) is tested by
# tests/e2e/test_stateless_replication_e2e.py, which says so per service it starts, and by
# `make demo`.
WITH_BLOCK_COPY = {"DR_REPLICATION_KEEP_BLOCK_COPY": "true"}


async def own_platform(
    stack: Stack, label: str, log_dir: Path, replication_env: dict[str, str] | None = None
) -> Platform:
    """Stop it with `stop_all()`."""
    return Platform(
        stack=stack,
        database_url=await fresh_database(stack, label),
        prefix=random_prefix(label),
        log_dir=log_dir,
        replication_env=replication_env or {},
    )
