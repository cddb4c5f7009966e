"""PostgreSQL over TLS on the real stack: with TLS required (`PG_TLS=require`, applied to the
running cluster by `stack.sh pg-start`, which reloads it), a service and the pool helper connect
with sslmode=verify-full, the platform CA and the generated password; a plain connection, or
one without the password, is refused; a connection that trusts another CA fails with an error
saying so. The module puts the cluster back in the mode
it found it in."""

from __future__ import annotations

import asyncio
import os
import secrets
import stat
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest
from cryptography.hazmat.primitives import serialization

from kit import procs as processes
from kit.platform import Platform
from kit.poll import eventually
from kit.procs import REPO
from kit.stack import Stack
from shared import db
from tests.support.own_platform import own_platform
from tests.support.pki import throwaway_issuer

pytestmark = pytest.mark.e2e

STATE_DIR = Path(os.environ.get("DR_STATE_DIR", REPO / ".state"))
PLATFORM_CA = STATE_DIR / "pki" / "ca.pem"


def _plain(url: str) -> str:
    """`url` without its query (no sslmode, no sslrootcert)."""
    return urlunsplit(urlsplit(url)._replace(query=""))


def _with_ca(url: str, ca: Path) -> str:
    return f"{_plain(url)}?sslmode=verify-full&sslrootcert={ca}"


def _with_password(url: str, password: str | None) -> str:
    """`url` as user postgres with `password` (None: without one)."""
    parts = urlsplit(url)
    secret = f":{password}" if password is not None else ""
    return urlunsplit(parts._replace(netloc=f"postgres{secret}@{parts.hostname}:{parts.port}"))


def _pg_mode(mode: str) -> None:
    """`stack.sh pg-start` with PG_TLS=mode: rewrites pg_hba and reloads the running cluster."""
    env = {**os.environ, "PG_TLS": mode}
    proc = subprocess.run(
        ["bash", str(REPO / "deploy/local/stack.sh"), "pg-start"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


async def _plain_refused(url: str) -> bool:
    try:
        conn = await asyncpg.connect(_plain(url), ssl=False, timeout=10)
    except asyncpg.InvalidAuthorizationSpecificationError as exc:
        assert "no encryption" in str(exc), exc
        return True
    await conn.close()
    return False


async def _plain_accepted(url: str) -> bool:
    return not await _plain_refused(url)


@pytest.fixture(scope="module")
async def tls_required(stack: Stack, database_url: str) -> AsyncIterator[str]:
    """The session database's URL with verify-full and the platform CA, the cluster requiring
    TLS meanwhile."""
    if not PLATFORM_CA.is_file():
        pytest.fail(f"{PLATFORM_CA} missing: the stack makes it at `make up`", pytrace=False)
    was = "require" if "sslmode=verify-full" in stack.database_url else "allow"
    await asyncio.to_thread(_pg_mode, "require")
    try:
        password_file = STATE_DIR / "postgres.password"
        assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
        password = password_file.read_text().strip()
        assert len(password) == 48, "a generated password: 24 random bytes in hex"
        yield _with_ca(_with_password(database_url, password), PLATFORM_CA)
    finally:
        await asyncio.to_thread(_pg_mode, was)
        if was == "allow":
            await eventually(lambda: _plain_accepted(database_url), what="plain accepted again")


async def test_a_plain_connection_is_refused_when_tls_is_required(tls_required: str) -> None:
    # the reload is asynchronous: the postmaster rereads pg_hba a moment after the signal
    assert await eventually(lambda: _plain_refused(tls_required), what="plain refused")
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match="no encryption"):
        await asyncpg.connect(_plain(tls_required) + "?sslmode=disable", timeout=10)


async def test_tls_without_the_password_is_refused(tls_required: str) -> None:
    await eventually(lambda: _plain_refused(tls_required), what="plain refused")
    for password in (None, "not-the-password"):
        with pytest.raises(asyncpg.InvalidPasswordError, match="password authentication failed"):
            await db.connect(_with_password(tls_required, password), timeout=10)


async def test_the_pool_helper_connects_with_verify_full(tls_required: str) -> None:
    await eventually(lambda: _plain_refused(tls_required), what="plain refused")
    schema = f"tls_{secrets.token_hex(3)}"
    pool = await db.create_pool(tls_required, schema, min_size=2, max_size=2)
    try:
        applied = await db.migrate(pool, schema)
        assert applied, "the shared migrations ran over TLS"
        rows = await pool.fetch(
            "SELECT s.ssl, s.version FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)"
            " WHERE a.application_name = $1",
            schema,
        )
        assert len(rows) == 2, rows
        assert all(r["ssl"] and r["version"].startswith("TLSv1.") for r in rows), rows
    finally:
        await pool.close()


async def test_another_ca_is_refused_with_a_clear_error(tls_required: str, tmp_path: Path) -> None:
    other_ca = tmp_path / "other-ca.pem"
    other_ca.write_bytes(throwaway_issuer().cert.public_bytes(serialization.Encoding.PEM))
    url = _with_ca(tls_required, other_ca)
    with pytest.raises(db.DatabaseTlsError, match="certificate is not trusted") as caught:
        await db.connect(url, timeout=10)
    assert str(other_ca) in str(caught.value)
    assert "certificate verify failed" in str(caught.value.__cause__)
    with pytest.raises(db.DatabaseTlsError, match="certificate is not trusted"):
        await db.create_pool(url, "tls_other")


@pytest.fixture(scope="module")
async def tls_platform(
    stack: Stack, tls_required: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Platform]:
    """A platform on a fresh database made over TLS, its URL with verify-full and the password."""
    over_tls = Stack(kafka=stack.kafka, database_url=tls_required)
    plat = await own_platform(over_tls, "pgtls", tmp_path_factory.mktemp("pgtls-platform"))
    assert "sslmode=verify-full" in plat.database_url and urlsplit(plat.database_url).password
    try:
        yield plat
    finally:
        await plat.close()


async def test_a_service_runs_on_postgres_over_verify_full(tls_platform: Platform) -> None:
    await eventually(lambda: _plain_refused(tls_platform.database_url), what="plain refused")
    tls_platform.start("registration")
    async with httpx.AsyncClient(timeout=15) as http:
        health = (await http.get(f"{tls_platform.url('registration')}/healthz")).json()
        assert health["checks"]["postgres"] == "ok", health
        vault = await tls_platform.new_vault(http, "tls")
        got = await http.get(
            f"{tls_platform.url('registration')}/v1/vaults/{vault['vault_id']}",
            headers=tls_platform.admin(),
        )
        assert got.status_code == 200 and got.json()["name"] == vault["name"], got.text
    conn = await db.connect(tls_platform.database_url, timeout=10)
    try:
        rows = await conn.fetch(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)"
            " WHERE a.application_name = 'registration' AND a.datname = current_database()"
        )
    finally:
        await conn.close()
    assert rows and all(r["ssl"] for r in rows), rows


async def test_a_service_given_another_ca_stops_at_once_saying_so(
    tls_platform: Platform, tmp_path: Path
) -> None:
    other_ca = tmp_path / "other-ca.pem"
    other_ca.write_bytes(throwaway_issuer().cert.public_bytes(serialization.Encoding.PEM))
    proc = processes.service(
        "policy",
        {**tls_platform.env, "DATABASE_URL": _with_ca(tls_platform.database_url, other_ca)},
        tmp_path,
    )
    # not retried like a database still starting: the process ends, naming the CA file
    with pytest.raises(RuntimeError, match="exited with") as caught:
        await asyncio.to_thread(proc.start)
    assert "its certificate is not trusted" in str(caught.value), str(caught.value)
    assert str(other_ca) in proc.log_path.read_text()
    assert "retrying" not in proc.log_path.read_text()
