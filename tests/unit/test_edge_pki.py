"""Edge certificates: the CSR checks, the issued certificate, the per-edge ACLs."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from shared import edge_pki, topics
from shared.kafka_acl import Operation, Pattern, Resource, edge_acls
from tests.support.pki import throwaway_issuer


def test_a_csr_for_the_servers_name_is_certified_as_its_principal() -> None:
    key = edge_pki.new_key()
    csr = edge_pki.check_csr(edge_pki.csr_pem(key, "hv01.example"), "hv01.example")
    issuer = throwaway_issuer()
    principal = edge_pki.principal_of(uuid.uuid4(), 3)
    issued = issuer.issue(csr, principal, timedelta(days=30))
    leaf, ca = x509.load_pem_x509_certificates(issued.pem.encode())
    assert leaf.subject.rfc4514_string() == f"CN={principal}"
    assert ca == issuer.cert
    assert leaf.public_key() == key.public_key()
    leaf.verify_directly_issued_by(issuer.cert)
    left = leaf.not_valid_after_utc - datetime.now(UTC)
    assert timedelta(days=29) < left <= timedelta(days=30)
    assert not edge_pki.needs_renewal(issued.pem, datetime.now(UTC))
    assert edge_pki.needs_renewal(issued.pem, datetime.now(UTC) + timedelta(days=21))


def _csr(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, *attrs: x509.NameAttribute) -> str:
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(list(attrs)))
    return csr.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


@pytest.mark.parametrize(
    "text, says",
    [
        ("garbage", "not a PEM certificate signing request"),
        ("x" * (edge_pki.MAX_CSR_CHARS + 1), "at most"),
        (edge_pki.csr_pem(edge_pki.new_key(), "other-host"), "CN=hv01"),
        (
            _csr(
                edge_pki.new_key(),
                x509.NameAttribute(NameOID.COMMON_NAME, "hv01"),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "x"),
            ),
            "exactly CN=hv01",
        ),
        (edge_pki.csr_pem(ec.generate_private_key(ec.SECP521R1()), "hv01"), "curve"),
        (
            edge_pki.csr_pem(rsa.generate_private_key(65537, 1024), "hv01"),
            "1024 bits refused",
        ),
    ],
)
def test_a_bad_csr_is_refused_with_what_to_fix(text: str, says: str) -> None:
    with pytest.raises(edge_pki.CsrRejected, match=says):
        edge_pki.check_csr(text, "hv01")


def test_an_ed25519_csr_is_refused() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hv01")]))
        .sign(key, None)
        .public_bytes(serialization.Encoding.PEM)
        .decode()
    )
    with pytest.raises(edge_pki.CsrRejected, match="keys refused"):
        edge_pki.check_csr(csr, "hv01")


def test_an_agents_acls_name_only_its_topics_and_its_own_group() -> None:
    pid = str(uuid.uuid4())
    acls = edge_acls("edge-x", "agent", pid, "p.")
    groups = {(a.name, a.pattern) for a in acls if a.resource is Resource.GROUP}
    assert groups == {
        (f"p.agent.{pid}", Pattern.LITERAL),
        (f"p.agent.{pid}.replica", Pattern.LITERAL),
    }
    writes = {a.name for a in acls if a.operation is Operation.WRITE}
    assert writes == {
        topics.physical(t, "p.")
        for t in (
            topics.REGISTRATION_HEARTBEATS,
            topics.AGENT_EVENTS,
            topics.REPLICATION_DELTAS,
            topics.dlq_of(topics.AGENT_COMMANDS),
        )
    }
    assert all(a.principal == "User:edge-x" for a in acls)
    assert not any(a.operation in (Operation.CREATE, Operation.ALL) for a in acls)
    assert all(a.pattern is Pattern.LITERAL for a in acls)


def test_a_provider_reads_nothing() -> None:
    acls = edge_acls("edge-y", "provider", str(uuid.uuid4()), "")
    assert not any(a.operation is Operation.READ for a in acls)
    assert {a.name for a in acls if a.operation is Operation.WRITE} == {
        topics.REGISTRATION_HEARTBEATS,
        topics.INVENTORY_DISCOVERY,
    }
