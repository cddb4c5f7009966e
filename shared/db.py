"""PostgreSQL access: one asyncpg pool per service, bound to the service's own schema, and a
migration runner that applies `migrations/NNN_name.sql` files once each, in order, under an
advisory lock (so two instances starting together don't race).

Every connection of the platform and its tools is made by `connect` (the pool's too). TLS is
said in DATABASE_URL with libpq's parameters, which asyncpg reads itself: `sslmode`
(disable, allow, prefer (asyncpg's default), require, verify-ca, verify-full) and
`sslrootcert` (the PEM file of the CA that signed the server's certificate), e.g.
`postgresql://dr:pw@db:5432/dr?sslmode=verify-full&sslrootcert=/etc/dr/pki/ca.pem`.
`connect` adds a check of those before connecting and an error naming the server and the CA
file when the server's certificate is not trusted."""

from __future__ import annotations

import hashlib
import json
import logging
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import asyncpg

log = logging.getLogger(__name__)

SHARED_MIGRATIONS = Path(__file__).parent / "migrations"


SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


class DatabaseTlsError(ConnectionError):
    """DATABASE_URL's TLS settings are wrong, or the server's certificate is not trusted."""


def tls_settings(database_url: str) -> tuple[str | None, str | None]:
    """(sslmode, sslrootcert) of a DATABASE_URL (None when absent), checked: a known mode, and
    a CA file that exists when one is named. Raises DatabaseTlsError saying what to fix."""
    query = parse_qs(urlsplit(database_url).query)
    mode = query.get("sslmode", [None])[-1]
    root = query.get("sslrootcert", [None])[-1]
    if mode is not None and mode not in SSL_MODES:
        raise DatabaseTlsError(
            f"DATABASE_URL: sslmode={mode!r} is not one of {', '.join(SSL_MODES)}"
        )
    if root is not None and not Path(root).is_file():
        raise DatabaseTlsError(
            f"DATABASE_URL: sslrootcert={root!r} is not a readable file (the PEM file of the CA"
            " that signed the PostgreSQL server's certificate)"
        )
    return mode, root


def database_name(database_url: str) -> str:
    """The database a URL names (its path; the query, e.g. `sslrootcert=/a/b.pem`, aside)."""
    return urlsplit(database_url).path.lstrip("/")


def with_database(database_url: str, name: str) -> str:
    """The same URL (server, user, TLS parameters) naming database `name`."""
    return urlunsplit(urlsplit(database_url)._replace(path=f"/{name}"))


async def connect(database_url: str, **kwargs: Any) -> asyncpg.Connection:
    """A connection to DATABASE_URL, honouring its sslmode and sslrootcert (see the module)."""
    _, root = tls_settings(database_url)
    try:
        return await asyncpg.connect(database_url, **kwargs)
    except ssl.SSLCertVerificationError as exc:
        where = urlsplit(database_url)
        raise DatabaseTlsError(
            f"PostgreSQL at {where.hostname}:{where.port or 5432}: its certificate is not trusted"
            f" with sslrootcert={root} ({exc.verify_message}); name the CA that signed the"
            " server's certificate, and a host name its certificate carries"
        ) from exc


async def _init_connection(conn: asyncpg.Connection) -> None:
    for typ in ("json", "jsonb"):
        await conn.set_type_codec(
            typ, encoder=json.dumps, decoder=json.loads, schema="pg_catalog", format="text"
        )


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool `reset`: nothing beyond asyncpg's own (an open transaction rolled back, listeners
    dropped). Our connections carry no session state (no SET, LISTEN or cursors; the one
    session lock, the migration lock, is unlocked explicitly), so the default reset query
    (`RESET ALL; UNLISTEN *; ...`) would only add a round trip to every release."""


async def create_pool(
    database_url: str, schema: str, *, min_size: int = 1, max_size: int = 10
) -> asyncpg.Pool:
    """A pool whose connections see `schema` first (and `public` for extensions)."""
    await ensure_schema(database_url, schema)
    pool = await asyncpg.create_pool(
        database_url,
        connect=connect,
        min_size=min_size,
        max_size=max_size,
        init=_init_connection,
        reset=_keep_session,
        server_settings={"search_path": f"{schema},public", "application_name": schema},
    )
    assert pool is not None
    return pool


async def ensure_schema(database_url: str, schema: str) -> None:
    conn = await connect(database_url)
    try:
        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
    finally:
        await conn.close()


def _migration_files(*folders: Path) -> list[tuple[str, Path]]:
    files: list[tuple[str, Path]] = []
    for folder in folders:
        if folder.is_dir():
            files.extend((f"{folder.parent.name}/{p.name}", p) for p in folder.glob("*.sql"))
    return sorted(files, key=lambda item: (not item[0].startswith("shared/"), item[0]))


async def migrate(pool: asyncpg.Pool, schema: str, *folders: Path) -> list[str]:
    """Apply the shared migrations, then each folder's, that this schema hasn't seen yet."""
    applied: list[str] = []
    lock_id = int.from_bytes(hashlib.sha256(schema.encode()).digest()[:8], "big", signed=True)
    async with pool.acquire() as conn:
        await conn.execute("SELECT pg_advisory_lock($1)", lock_id)
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
            for name, path in _migration_files(SHARED_MIGRATIONS, *folders):
                if name in done:
                    continue
                async with conn.transaction():
                    await conn.execute(path.read_text())
                    await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", name)
                applied.append(name)
                log.info("migration applied", extra={"migration": name, "schema": schema})
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", lock_id)
    return applied


Record = asyncpg.Record


def row_dict(record: asyncpg.Record | None) -> dict[str, Any] | None:
    return dict(record) if record is not None else None
