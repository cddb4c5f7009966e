"""Where the real Kafka and PostgreSQL of the local stack are (`make up` starts them)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import asyncpg

from kit.procs import REPO, read_stack_env
from shared import db
from shared.kafka.admin import admin_client

__all__ = [
    "REPO",
    "Stack",
    "delete_prefixed_topics",
    "fresh_database",
    "migrated_pool",
    "random_prefix",
    "read_stack_env",
    "stack_command",
    "stack_from_env",
]


@dataclass(frozen=True)
class Stack:
    kafka: str
    database_url: str

    def reachable(self) -> str | None:
        """None when both answer on their ports, else what is missing."""
        for what, host, port in (
            ("Kafka", *self._host_port(f"kafka://{self.kafka.split(',')[0]}")),
            ("PostgreSQL", *self._host_port(self.database_url)),
        ):
            try:
                socket.create_connection((host, port), timeout=2).close()
            except OSError:
                return f"{what} is not reachable at {host}:{port}: run `make up` first"
        return None

    @staticmethod
    def _host_port(url: str) -> tuple[str, int]:
        parsed = urlparse(url)
        return parsed.hostname or "127.0.0.1", parsed.port or 0

    def database(self, name: str) -> str:
        return db.with_database(self.database_url, name)


def stack_from_env() -> Stack:
    file_env = read_stack_env()
    return Stack(
        kafka=os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
        or file_env.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:19092"),
        database_url=os.environ.get("DATABASE_URL")
        or file_env.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:15432/dr"),
    )


async def fresh_database(stack: Stack, label: str = "t") -> str:
    """Create an empty database with a random name; returns its URL."""
    name = f"{label}_{secrets.token_hex(5)}"
    conn = await db.connect(stack.database_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return stack.database(name)


def random_prefix(label: str = "t") -> str:
    return f"{label}{secrets.token_hex(4)}."


async def stack_command(command: str) -> None:
    """Run `deploy/local/stack.sh COMMAND` (kafka-restart, pg-restart, ...) for fault tests.
    A broker holding many partitions can take minutes to reload them on a slow machine, so
    the bound is generous (the script's own start timeout comes first)."""
    proc = await asyncio.to_thread(
        subprocess.run,
        ["bash", str(REPO / "deploy/local/stack.sh"), command],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@contextlib.asynccontextmanager
async def migrated_pool(
    database_url: str, label: str, migrations: Path
) -> AsyncIterator[asyncpg.Pool]:
    """A pool on a fresh schema `<label>_it_<random>` with a service's migrations applied."""
    schema = f"{label}_it_{secrets.token_hex(3)}"
    pool = await db.create_pool(database_url, schema)
    await db.migrate(pool, schema, migrations)
    try:
        yield pool
    finally:
        await pool.close()


async def delete_prefixed_topics(bootstrap: str, prefix: str) -> int:
    """Delete every topic whose name starts with `prefix` (a test platform's own topics, and
    faust's internal ones under it): a broker holding fewer partitions restarts faster.
    Best effort: returns how many were asked to go, 0 when the broker does not answer."""
    from aiokafka.errors import KafkaError

    admin = admin_client(bootstrap, request_timeout_ms=15000)
    try:
        await admin.start()
        names = [t for t in await admin.list_topics() if t.startswith(prefix)]
        if names:
            await admin.delete_topics(names, timeout_ms=15000)
        return len(names)
    except (KafkaError, OSError):
        return 0
    finally:
        await admin.close()
