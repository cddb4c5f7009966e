"""What TLS to PostgreSQL costs, on the stack's server: opening a connection, a `SELECT 1`
round trip and fetching a 1 MiB value, each without TLS (`sslmode=disable`) and with it
(`sslmode=verify-full` and the stack's CA, `.state/pki/ca.pem`), medians over many rounds, one
connection per mode (the services keep pooled connections, so the round trips are what a
request pays; the connect cost is paid once per pooled connection).

Lines: `bench postgres_<mode>_<what> <value> <unit>`. Without TLS the server must take plain
connections (`PG_TLS=allow`, the default); with `PG_TLS=require` only the TLS lines are printed.
Run: `deploy/local/stack.sh exec .venv/bin/python -m bench.bench_postgres_tls`.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg

from bench.harness import emit
from kit.procs import REPO
from kit.stack import stack_from_env
from shared import db

CONNECTS = 40
ROUND_TRIPS = 2000
BIG_FETCHES = 100


async def median_s(rounds: int, step: Callable[[], Awaitable[object]]) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        await step()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


async def measure(mode: str, url: str) -> None:
    async def connect_close() -> None:
        await (await db.connect(url)).close()

    emit(f"postgres_{mode}_connect_ms", await median_s(CONNECTS, connect_close) * 1e3, "ms")
    conn = await db.connect(url)
    try:
        one = await median_s(ROUND_TRIPS, lambda: conn.fetchval("SELECT 1"))
        emit(f"postgres_{mode}_select1_us", one * 1e6, "us")
        big = await median_s(BIG_FETCHES, lambda: conn.fetchval("SELECT repeat('x', 1048576)"))
        emit(f"postgres_{mode}_fetch_1mib_ms", big * 1e3, "ms")
    finally:
        await conn.close()


async def main() -> None:
    base = stack_from_env().database_url.split("?", 1)[0]
    ca = Path(os.environ.get("DR_STATE_DIR", REPO / ".state")) / "pki" / "ca.pem"
    try:
        await measure("plain", f"{base}?sslmode=disable")
    except asyncpg.InvalidAuthorizationSpecificationError as exc:
        print(
            f"# postgres_plain skipped: the server refuses plain connections: {exc}",
            file=sys.stderr,
        )
    await measure("tls", f"{base}?sslmode=verify-full&sslrootcert={ca}")


if __name__ == "__main__":
    asyncio.run(main())
