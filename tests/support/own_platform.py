"""A platform of its own (fresh database, fresh topic prefix) for test modules that put bad
records on shared topics on purpose (DLQ tests), so other modules' readers never see them."""

from __future__ import annotations

from pathlib import Path

from kit.platform import Platform
from kit.stack import Stack, fresh_database, random_prefix


async def own_platform(stack: Stack, label: str, log_dir: Path) -> Platform:
    """Stop it with `stop_all()`."""
    return Platform(
        stack=stack,
        database_url=await fresh_database(stack, label),
        prefix=random_prefix(label),
        log_dir=log_dir,
    )
