"""Per-edge Kafka client certificates: the edge's CSR, its checks, and the edge-issuing CA.

Every site provider and host agent is its own Kafka principal. With its registration the edge
sends a certificate signing request (PKCS#10, PEM) for a key pair it made (EC P-256; the
private key stays in its state folder); the registration service checks it and signs a client
certificate with the edge-issuing CA, an intermediate of the platform CA whose key only the
registration service holds. The broker trusts it through the platform CA (the edge presents
its certificate followed by the edge CA's), and maps the certificate's CN to the principal
(`ssl.principal.mapping.rules`). Then the service creates that principal's ACLs
(`shared.kafka_acl.edge_acls`).

- The CSR's subject must be CN=<the server's name> (what it registers as): a CSR made for
  another server is refused. The certificate's subject is set by the issuer:
  CN=edge-<producer id>-g<generation>, so a re-registration (new generation) has a new
  principal and the ACLs of the old one are deleted: the old certificate keeps authenticating
  but may do nothing.
- Accepted keys: EC P-256 or P-384, RSA 2048 to 4096 bits (`CsrRejected` otherwise); a CSR
  whose self-signature does not verify proves no possession of the key and is refused.
- Validity: `valid` (the registration service's setting, 30 days by default), backdated by
  `CLOCK_SKEW` for clocks a little apart. An edge renews its certificate (a new key pair's CSR,
  proven by its own credential) when less than a third of the validity is left: at start, and
  while it runs (`renewal_due`, `retry_delay`: the running edge's schedule).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.files import write_atomic

MAX_CSR_CHARS = 8192
EC_CURVES = ("secp256r1", "secp384r1")
RSA_BITS = (2048, 4096)
CLIENT_CERT_FILE = "kafka.pem"
CLIENT_KEY_FILE = "kafka.key"
CLOCK_SKEW = timedelta(minutes=5)  # certificates are valid from this long before they're issued
RENEW_RETRY_MAX = timedelta(minutes=5)  # longest pause between failed renewals


class CsrRejected(ValueError):
    """A CSR the issuer refuses; the message says what to fix."""


def principal_of(producer_id: uuid.UUID | str, generation: int) -> str:
    """The Kafka principal (certificate CN) of one registration of an edge producer."""
    return f"edge-{producer_id}-g{generation}"


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def csr_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, name: str) -> str:
    """A CSR for `key` with subject CN=`name` (the server's registered name)."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def check_csr(text: str, name: str) -> x509.CertificateSigningRequest:
    """The parsed CSR, if it is one this issuer signs for server `name`; else `CsrRejected`."""
    if len(text) > MAX_CSR_CHARS:
        raise CsrRejected(f"the CSR has {len(text)} characters; at most {MAX_CSR_CHARS}")
    try:
        csr = x509.load_pem_x509_csr(text.encode())
    except ValueError:
        raise CsrRejected(
            "not a PEM certificate signing request (-----BEGIN CERTIFICATE REQUEST-----)"
        ) from None
    try:
        key = csr.public_key()
    except (ValueError, TypeError):
        raise CsrRejected("the CSR's public key cannot be read") from None
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in EC_CURVES:
            raise CsrRejected(f"EC curve {key.curve.name} refused; use one of {EC_CURVES}")
    elif isinstance(key, rsa.RSAPublicKey):
        if not RSA_BITS[0] <= key.key_size <= RSA_BITS[1]:
            raise CsrRejected(
                f"RSA key of {key.key_size} bits refused: {RSA_BITS[0]} to {RSA_BITS[1]} bits"
            )
    else:
        raise CsrRejected(
            f"{type(key).__name__.removeprefix('_')} keys refused: use EC P-256/P-384 or RSA"
        )
    try:
        valid = csr.is_signature_valid
    except (ValueError, TypeError, InvalidSignature):
        valid = False
    if not valid:
        raise CsrRejected("the CSR's signature does not verify with its own public key")
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = cns[0].value if len(cns) == 1 else None
    if cn != name or len(csr.subject) != 1:
        raise CsrRejected(
            f"the CSR's subject must be exactly CN={name} (the server's name); it is "
            f"{csr.subject.rfc4514_string() or 'empty'}"
        )
    return csr


@dataclass(frozen=True)
class IssuedCertificate:
    pem: str  # the edge's certificate followed by the edge CA's (the chain it presents)
    serial: str  # hex
    principal: str
    not_after: datetime


class EdgeIssuer:
    """The edge-issuing CA (certificate and private key), held by the registration service."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.cert = cert
        self.key = key
        self._cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()

    @classmethod
    def from_files(cls, cert_file: Path, key_file: Path) -> EdgeIssuer:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_file}: the edge CA key must be an EC key")
        return cls(cert, key)

    def issue(
        self, csr: x509.CertificateSigningRequest, principal: str, valid: timedelta
    ) -> IssuedCertificate:
        """A client certificate for the CSR's key with subject CN=`principal`."""
        now = datetime.now(UTC)
        not_after = min(now + valid, self.cert.not_valid_after_utc)
        serial = x509.random_serial_number()
        public_key = csr.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, principal)]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(serial)
            .not_valid_before(now - CLOCK_SKEW)  # clocks a little apart
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        pem = cert.public_bytes(serialization.Encoding.PEM).decode() + self._cert_pem
        return IssuedCertificate(pem, f"{serial:x}", principal, not_after)


def certificate_not_after(pem: str) -> datetime:
    """When the first certificate of `pem` expires."""
    return x509.load_pem_x509_certificate(pem.encode()).not_valid_after_utc


def _validity(cert: x509.Certificate) -> timedelta:
    """How long the certificate was issued for: from its issue (its start less the issuer's
    `CLOCK_SKEW`, which this issuer backdates it by) to its end."""
    span = cert.not_valid_after_utc - cert.not_valid_before_utc
    return span - CLOCK_SKEW if span > CLOCK_SKEW else span


def renewal_due(pem: str) -> datetime:
    """When less than a third of the (first) certificate's validity is left."""
    cert = x509.load_pem_x509_certificate(pem.encode())
    return cert.not_valid_after_utc - _validity(cert) / 3


def needs_renewal(pem: str, now: datetime) -> bool:
    """True when less than a third of the certificate's validity is left."""
    return now >= renewal_due(pem)


def retry_delay(failures: int, left: timedelta) -> float:
    """Seconds to wait after the `failures`-th failed renewal in a row, with `left` validity
    left: doubling from 1 s, at most `RENEW_RETRY_MAX`, and at most a quarter of what is left
    (at least 1 s) so that a short certificate is tried a few times before it expires."""
    delay = min(2.0 ** max(failures - 1, 0), RENEW_RETRY_MAX.total_seconds())
    if left > timedelta(0):
        delay = min(delay, max(left.total_seconds() / 4, 1.0))
    return delay


def write_client_files(folder: Path, cert_pem: str, private_key_pem: str) -> tuple[Path, Path]:
    """The edge's certificate chain and private key as files for its TLS context (both
    mode 0600, written atomically); returns (certificate file, key file)."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert, key = folder / CLIENT_CERT_FILE, folder / CLIENT_KEY_FILE
    write_atomic(key, private_key_pem.encode(), mode=0o600)
    write_atomic(cert, cert_pem.encode(), mode=0o600)
    return cert, key
