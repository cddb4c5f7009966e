"""deploy/make-pki.sh makes PostgreSQL's server certificate (also in a folder made before it)."""

from __future__ import annotations

import ipaddress
import stat
import subprocess
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

REPO = Path(__file__).resolve().parents[2]


def make_pki(folder: Path) -> None:
    subprocess.run(
        ["bash", str(REPO / "deploy/make-pki.sh"), str(folder), "admin"],
        check=True,
        capture_output=True,
        timeout=120,
    )


def test_postgres_gets_a_server_certificate_of_the_platform_ca(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    make_pki(pki)
    cert = x509.load_pem_x509_certificate((pki / "postgres.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost", "postgres"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert stat.S_IMODE((pki / "postgres.key").stat().st_mode) == 0o600

    # a folder made before PostgreSQL had a certificate gets one, the rest kept
    broker = (pki / "broker.pem").read_bytes()
    (pki / "postgres.pem").unlink()
    (pki / "postgres.key").unlink()
    make_pki(pki)
    again = x509.load_pem_x509_certificate((pki / "postgres.pem").read_bytes())
    again.verify_directly_issued_by(ca)
    assert again.serial_number != cert.serial_number
    assert (pki / "broker.pem").read_bytes() == broker
    assert stat.S_IMODE((pki / "postgres.key").stat().st_mode) == 0o600
