"""DATABASE_URL's TLS parameters: what `shared.db` checks before connecting, and that asyncpg
(the pinned version) builds a verifying context from `sslmode` and `sslrootcert` in the URL."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from asyncpg import connect_utils
from cryptography.hazmat.primitives import serialization

from shared import db
from tests.support.pki import throwaway_issuer

URL = "postgresql://dr:pw@db.example:5432/dr"


@pytest.fixture
def ca_file(tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    path.write_bytes(throwaway_issuer().cert.public_bytes(serialization.Encoding.PEM))
    return path


def _ssl_of(url: str) -> object:
    """The `ssl` asyncpg derives from a URL (its own parser, as `asyncpg.connect` calls it)."""
    _, params = connect_utils._parse_connect_dsn_and_args(
        dsn=url,
        host=None,
        port=None,
        user=None,
        password=None,
        passfile=None,
        database=None,
        ssl=None,
        direct_tls=None,
        server_settings=None,
        target_session_attrs=None,
        krbsrvname=None,
        gsslib=None,
        service=None,
        servicefile=None,
    )
    return params.ssl


def test_a_url_without_tls_parameters_is_accepted() -> None:
    assert db.tls_settings(URL) == (None, None)


def test_verify_full_with_a_ca_file(ca_file: Path) -> None:
    url = f"{URL}?sslmode=verify-full&sslrootcert={ca_file}"
    assert db.tls_settings(url) == ("verify-full", str(ca_file))
    context = _ssl_of(url)
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is True
    assert [c["subject"] for c in context.get_ca_certs()] == [((("commonName", "test-edge-ca"),),)]


def test_verify_ca_checks_the_chain_but_not_the_name(ca_file: Path) -> None:
    context = _ssl_of(f"{URL}?sslmode=verify-ca&sslrootcert={ca_file}")
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is False


def test_disable_means_no_tls() -> None:
    assert _ssl_of(f"{URL}?sslmode=disable") is False


def test_an_unknown_sslmode_is_refused_with_the_known_ones() -> None:
    with pytest.raises(db.DatabaseTlsError, match=r"sslmode='verify' is not one of .*verify-full"):
        db.tls_settings(f"{URL}?sslmode=verify")


def test_a_missing_ca_file_is_refused_before_any_connection(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(
        db.DatabaseTlsError, match=r"sslrootcert=.*nope\.pem.* is not a readable file"
    ):
        db.tls_settings(f"{URL}?sslmode=verify-full&sslrootcert={missing}")


async def test_connect_checks_the_url_first(tmp_path: Path) -> None:
    # db.example is never resolved: the check fails before asyncpg is called
    with pytest.raises(db.DatabaseTlsError, match="is not a readable file"):
        await db.connect(f"{URL}?sslmode=verify-full&sslrootcert={tmp_path / 'x.pem'}")
    with pytest.raises(db.DatabaseTlsError, match="is not a readable file"):
        await db.create_pool(f"{URL}?sslmode=require&sslrootcert={tmp_path}", "s")


def test_another_database_on_the_same_server_keeps_the_tls_parameters(ca_file: Path) -> None:
    url = f"{URL}?sslmode=verify-full&sslrootcert={ca_file}"
    other = db.with_database(url, "dr_platform")
    assert (
        other
        == f"postgresql://dr:pw@db.example:5432/dr_platform?sslmode=verify-full&sslrootcert={ca_file}"
    )
    assert db.database_name(other) == "dr_platform"
    assert db.database_name(URL) == "dr"
