"""The registration service's edge certificates: signs an edge's CSR with the edge-issuing CA
and keeps the Kafka ACLs of its principal (`shared.edge_pki`, `shared.kafka_acl`)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta

from cryptography import x509

from services.registration.config import RegistrationSettings
from services.registration.domain import RegistrationError
from shared.edge_pki import EdgeIssuer, IssuedCertificate
from shared.kafka.security import KafkaSecurity
from shared.kafka_acl import (
    create_acls,
    delete_acls,
    delete_exact_acls,
    edge_acls,
    retired_edge_acls,
)

log = logging.getLogger(__name__)


class KafkaRefused(RegistrationError):
    status = 503


@dataclass
class EdgeCertificates:
    issuer: EdgeIssuer
    valid: timedelta
    bootstrap: str
    prefix: str
    security: KafkaSecurity

    @classmethod
    def from_settings(cls, s: RegistrationSettings) -> EdgeCertificates | None:
        """None when no edge CA is configured or Kafka runs without TLS (no certificates
        issued, no ACLs kept)."""
        if s.edge_ca_cert_file is None or s.edge_ca_key_file is None:
            return None
        if s.kafka_security != "tls":
            return None
        return cls(
            EdgeIssuer.from_files(s.edge_ca_cert_file, s.edge_ca_key_file),
            timedelta(hours=s.edge_cert_valid_hours),
            s.kafka_bootstrap_servers,
            s.topic_prefix,
            KafkaSecurity.from_settings(s),
        )

    async def grant(
        self, csr: x509.CertificateSigningRequest, principal: str, kind: str, producer_id: str
    ) -> IssuedCertificate:
        """Create the principal's ACLs, then sign its certificate."""
        acls = edge_acls(principal, kind, producer_id, self.prefix)
        try:
            await create_acls(self.bootstrap, acls, self.security)
        except Exception as exc:
            raise KafkaRefused(
                f"Kafka did not take the ACLs of {principal} ({exc}): nothing was registered;"
                " try again in a moment"
            ) from None
        return self.issuer.issue(csr, principal, self.valid)

    async def remove(self, principal: str) -> int:
        """Delete every ACL of `principal`; how many there were."""
        try:
            deleted = await delete_acls(self.bootstrap, principal, self.security)
        except Exception as exc:
            raise KafkaRefused(
                f"Kafka did not delete the ACLs of {principal} ({exc}): nothing was changed;"
                " try again in a moment"
            ) from None
        log.info("edge ACLs deleted", extra={"principal": principal, "acls": deleted})
        return deleted

    async def refresh(self, edges: Iterable[tuple[str, str, str]]) -> int:
        """Bring registered edges' ACLs ((principal, kind, producer id) each) to what this
        version grants their kind: create the missing ones, then delete those earlier versions
        gave and this one does not (in that order, so an edge never lacks a right it keeps),
        one request each for all of them. Returns how many were deleted."""
        edges = list(edges)
        if not edges:
            return 0
        wanted = [acl for p, kind, pid in edges for acl in edge_acls(p, kind, pid, self.prefix)]
        await create_acls(self.bootstrap, wanted, self.security)
        retired = [acl for p, kind, _ in edges for acl in retired_edge_acls(p, kind, self.prefix)]
        return await delete_exact_acls(self.bootstrap, retired, self.security)
