"""A running edge's certificate renewal: when it is due (a third of the validity left, the
issuer's backdating not counted), how long it waits after failures, what /healthz says when it
fails, and that reloading the shared TLS context makes the next handshake present the new
certificate."""

from __future__ import annotations

import asyncio
import ssl
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from shared import edge_pki, signing
from shared.edge import EdgeRuntime
from shared.edge_identity import EdgeSettings, Identity, load_identity
from shared.edge_renewal import CertificateRenewal
from shared.kafka.security import KafkaSecurity
from shared.schemas.registration import ProducerKind
from tests.support.pki import throwaway_issuer


@pytest.fixture(scope="module")
def issuer() -> edge_pki.EdgeIssuer:
    return throwaway_issuer()


def _issue(issuer: edge_pki.EdgeIssuer, valid: timedelta) -> tuple[str, str]:
    """(certificate chain PEM, key PEM) of a new edge client certificate."""
    key = edge_pki.new_key()
    csr = edge_pki.check_csr(edge_pki.csr_pem(key, "hv.example"), "hv.example")
    issued = issuer.issue(csr, edge_pki.principal_of(uuid.uuid4(), 1), valid)
    return issued.pem, edge_pki.key_pem(key)


@pytest.mark.parametrize("valid", [timedelta(seconds=45), timedelta(hours=1), timedelta(days=30)])
def test_renewal_is_due_when_a_third_of_the_validity_is_left(
    issuer: edge_pki.EdgeIssuer, valid: timedelta
) -> None:
    """The issuer backdates by CLOCK_SKEW; that does not count as validity, or a 45 s
    certificate (valid 5 min 45 s on paper) would be due the moment it is issued."""
    issued_at = datetime.now(UTC)
    pem, _ = _issue(issuer, valid)
    due = edge_pki.renewal_due(pem)
    expected = issued_at + valid * 2 / 3
    assert abs((due - expected).total_seconds()) < 2
    assert not edge_pki.needs_renewal(pem, due - timedelta(seconds=1))
    assert edge_pki.needs_renewal(pem, due + timedelta(seconds=1))


def test_retry_delay_doubles_to_a_cap_and_stays_under_a_quarter_of_what_is_left() -> None:
    far = timedelta(days=5)
    assert [edge_pki.retry_delay(n, far) for n in (1, 2, 3, 4)] == [1, 2, 4, 8]
    assert edge_pki.retry_delay(30, far) == edge_pki.RENEW_RETRY_MAX.total_seconds()
    assert edge_pki.retry_delay(6, timedelta(seconds=20)) == 5  # a quarter of 20 s
    assert edge_pki.retry_delay(6, timedelta(seconds=2)) == 1  # never below 1 s
    # expired: renewal still works (it is HTTP, by credential); back off to the cap
    assert edge_pki.retry_delay(30, -far) == edge_pki.RENEW_RETRY_MAX.total_seconds()


def _identity(cert: str, key: str) -> Identity:
    return Identity(
        producer_id=uuid.uuid4(),
        vault_id=uuid.uuid4(),
        kind=ProducerKind.AGENT,
        name="hv.example",
        site="primary",
        generation=1,
        credential="drc_test",
        private_key=signing.private_key_hex(signing.new_private_key()),
        kafka_key=key,
        kafka_certificate=cert,
    )


def _settings(state: Path, ca: Path) -> EdgeSettings:
    return EdgeSettings(
        registration_url="http://127.0.0.1:9",  # nothing listens: every renewal fails
        name="hv.example",
        state_dir=state,
        kafka_security="tls",
        kafka_ca_file=str(ca),
    )


async def test_a_failed_renewal_is_retried_and_shown_never_raised(
    issuer: edge_pki.EdgeIssuer, tmp_path: Path
) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(issuer.cert.public_bytes(serialization.Encoding.PEM))
    settings = _settings(tmp_path / "state", ca)
    cert, key = _issue(issuer, timedelta(seconds=45))
    identity = _identity(cert, key)
    security = KafkaSecurity(
        "tls", str(ca), *map(str, edge_pki.write_client_files(settings.state_dir, cert, key))
    ).shared()
    renewal = CertificateRenewal(settings, identity, security)
    assert renewal.check() == "ok"

    assert not await renewal.renew_once()
    assert not await renewal.renew_once()
    assert renewal.failures == 2 and renewal.last_error
    assert renewal.identity is identity  # still the one in use
    assert load_identity(settings.state_dir) is None  # nothing half-saved

    due = edge_pki.renewal_due(cert)
    assert renewal.check(due - timedelta(seconds=1)) == "ok"
    warning = renewal.check(due + timedelta(seconds=1))
    assert warning.startswith("warning: expires in ") and "renewal failing" in warning
    expired = renewal.check(renewal.not_after + timedelta(seconds=1))
    assert expired.startswith("expired: at ") and "renewal failing" in expired

    runtime = EdgeRuntime("host-agent", settings, ProducerKind.AGENT)
    runtime.renewal = renewal
    report = await runtime.health()
    assert report["checks"]["kafka_certificate"] == renewal.check()


def _signed(
    issuer: edge_pki.EdgeIssuer,
    cn: str,
    start: datetime,
    end: datetime,
    dns: str | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, str]:
    """A new key and a certificate for it (PEM) signed by `issuer`, valid `start` to `end`."""
    key = edge_pki.new_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
    )
    if dns is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False
        )
    cert = builder.sign(issuer.key, hashes.SHA256())
    return key, cert.public_bytes(serialization.Encoding.PEM).decode()


async def test_the_loop_retries_a_due_renewal_with_backoff_and_keeps_going(
    issuer: edge_pki.EdgeIssuer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A certificate with 10 s left of 70 s is due; every attempt fails (nothing listens):
    the loop waits 1 s, 2 s, then a quarter of what is left, and raises nothing."""
    now = datetime.now(UTC)
    key, pem = _signed(
        issuer, "edge-x-g1", now - timedelta(seconds=60), now + timedelta(seconds=10)
    )
    assert edge_pki.needs_renewal(pem, now)
    settings = _settings(tmp_path / "state", tmp_path / "ca.pem")
    renewal = CertificateRenewal(
        settings, _identity(pem, edge_pki.key_pem(key)), KafkaSecurity("tls", context=None)
    )
    delays: list[float] = []

    async def sleep(seconds: float) -> None:
        delays.append(seconds)
        if len(delays) == 3:
            raise asyncio.CancelledError

    monkeypatch.setattr("shared.edge_renewal.asyncio.sleep", sleep)
    with pytest.raises(asyncio.CancelledError):
        await renewal.run()
    assert delays[:2] == [1, 2]
    assert 2 < delays[2] <= 2.5  # a quarter of the ~10 s left, not 4 s
    assert renewal.failures == 3 and renewal.last_error


def _handshake(client: ssl.SSLContext, server: ssl.SSLContext) -> x509.Certificate:
    """An in-memory TLS handshake; the certificate the server saw from the client."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_hostname="localhost")
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(20):
        for name, conn in (("c", c), ("s", s)):
            if not done[name]:
                try:
                    conn.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            break
    der = s.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_reloading_the_shared_context_changes_what_the_next_handshake_presents(
    issuer: edge_pki.EdgeIssuer, tmp_path: Path
) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(issuer.cert.public_bytes(serialization.Encoding.PEM))
    now = datetime.now(UTC)
    server_key, server_pem = _signed(
        issuer, "localhost", now - timedelta(minutes=1), now + timedelta(days=1), dns="localhost"
    )
    (tmp_path / "server.pem").write_text(server_pem)
    (tmp_path / "server.key").write_text(edge_pki.key_pem(server_key))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tmp_path / "server.pem", tmp_path / "server.key")
    server.load_verify_locations(ca)
    server.verify_mode = ssl.CERT_REQUIRED

    first, first_key = _issue(issuer, timedelta(hours=1))
    files = edge_pki.write_client_files(tmp_path / "edge", first, first_key)
    security = KafkaSecurity("tls", str(ca), str(files[0]), str(files[1])).shared()
    context = security.ssl_context()
    assert context is not None and security.ssl_context() is context  # one, shared
    serial = x509.load_pem_x509_certificate(first.encode()).serial_number
    assert _handshake(context, server).serial_number == serial

    second, second_key = _issue(issuer, timedelta(hours=1))
    edge_pki.write_client_files(tmp_path / "edge", second, second_key)
    assert _handshake(context, server).serial_number == serial  # files alone change nothing
    security.reload_certificate()
    renewed = x509.load_pem_x509_certificate(second.encode()).serial_number
    assert _handshake(security.client_options()["ssl_context"], server).serial_number == renewed
