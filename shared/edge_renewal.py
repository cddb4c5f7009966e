"""Keeps a running edge's Kafka client certificate current (see `CertificateRenewal`)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

from prometheus_client import Counter, Gauge

from shared import edge_pki
from shared.edge_identity import (
    EdgeSettings,
    Identity,
    RegistrationFailed,
    renew_kafka_certificate,
    save_identity,
)
from shared.kafka.security import KafkaSecurity

log = logging.getLogger(__name__)

KAFKA_CERT_EXPIRY = Gauge(
    "dr_edge_kafka_certificate_expiry_timestamp_seconds",
    "When this edge's Kafka client certificate expires (Unix time)",
)
KAFKA_CERT_RENEWALS = Counter(
    "dr_edge_kafka_certificate_renewals_total",
    "Renewals of the Kafka client certificate by the running edge",
    ["result"],
)


class CertificateRenewal:
    """Keeps a running edge's Kafka certificate current. When less than a third of its
    validity is left (`edge_pki.renewal_due`) it asks for a new one with a new key pair's CSR
    (`POST /v1/self/kafka-certificate`, the edge's credential), writes the certificate files,
    reloads them into the TLS context every Kafka client of the process shares (new
    connections present the new certificate; open ones keep theirs until they close) and then
    saves the identity (a crash before that leaves the previous, still valid, one). A failure
    is logged and retried with backoff (`edge_pki.retry_delay`), never stops the edge, and
    shows on /healthz (`check`) once renewal is due."""

    MAX_WAIT = 600.0  # look at the clock again at least this often (suspend, clock changes)
    # the least time between two renewals, whatever the certificate says (one issued near the
    # edge CA's own end is cut short by it, and would be due again at once)
    MIN_PAUSE = 5.0

    def __init__(
        self,
        settings: EdgeSettings,
        identity: Identity,
        security: KafkaSecurity,
        on_renewed: Callable[[Identity], None] = lambda _: None,
    ) -> None:
        if identity.kafka_certificate is None:
            raise ValueError("no Kafka certificate to renew")
        self.settings = settings
        self.identity = identity
        self.security = security
        self.on_renewed = on_renewed
        self.failures = 0  # in a row
        self.last_error: str | None = None
        KAFKA_CERT_EXPIRY.set(self.not_after.timestamp())

    @property
    def certificate(self) -> str:
        assert self.identity.kafka_certificate is not None  # checked at construction
        return self.identity.kafka_certificate

    @property
    def not_after(self) -> datetime:
        return edge_pki.certificate_not_after(self.certificate)

    async def run(self) -> None:
        while True:
            now = datetime.now(UTC)
            wait = (edge_pki.renewal_due(self.certificate) - now).total_seconds()
            if wait > 0:
                await asyncio.sleep(min(wait, self.MAX_WAIT))
            elif await self.renew_once():
                await asyncio.sleep(self.MIN_PAUSE)
            else:
                left = self.not_after - datetime.now(UTC)
                await asyncio.sleep(edge_pki.retry_delay(self.failures, left))

    async def renew_once(self) -> bool:
        """One attempt; True when the new certificate is in use."""
        started = time.monotonic()
        s = self.settings
        try:
            renewed = await renew_kafka_certificate(s, self.identity)
            if renewed.kafka_certificate is None or renewed.kafka_key is None:
                raise RegistrationFailed("the registration service issued no certificate")
            edge_pki.write_client_files(s.state_dir, renewed.kafka_certificate, renewed.kafka_key)
            self.security.reload_certificate()
            save_identity(s.state_dir, renewed)
        except Exception as exc:  # whatever it is, the edge goes on and tries again
            self.failures += 1
            self.last_error = str(exc)[:300] or type(exc).__name__
            KAFKA_CERT_RENEWALS.labels("error").inc()
            log.warning(
                "Kafka certificate not renewed; will retry",
                extra={
                    "error": self.last_error,
                    "failures": self.failures,
                    "expires": self.not_after.isoformat(),
                },
            )
            return False
        self.identity = renewed
        self.failures, self.last_error = 0, None
        KAFKA_CERT_RENEWALS.labels("ok").inc()
        KAFKA_CERT_EXPIRY.set(self.not_after.timestamp())
        self.on_renewed(renewed)
        log.info(
            "Kafka certificate renewed",
            extra={
                "producer_id": str(renewed.producer_id),
                "expires": self.not_after.isoformat(),
                "seconds": round(time.monotonic() - started, 3),
            },
        )
        return True

    def check(self, now: datetime | None = None) -> str:
        """For /healthz: "ok"; "warning: ..." when renewal is due and failing; "expired: ..."
        (which degrades the edge: it can open no new Kafka connection)."""
        now = now or datetime.now(UTC)
        failing = f"; renewal failing: {self.last_error}" if self.last_error else ""
        left = (self.not_after - now).total_seconds()
        if left <= 0:
            return f"expired: at {self.not_after.isoformat()}{failing}"
        if self.last_error and now >= edge_pki.renewal_due(self.certificate):
            return f"warning: expires in {left:.0f} s ({self.not_after.isoformat()}){failing}"
        return "ok"
