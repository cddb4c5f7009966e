"""How every Kafka client of the platform reaches the broker: mutual TLS or plaintext."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from aiokafka.helpers import create_ssl_context

from shared.settings import CommonSettings


@dataclass(frozen=True)
class KafkaSecurity:
    """How a client reaches the broker: mutual TLS with a client certificate (the broker
    maps the certificate's CN to the principal its ACLs name) or plaintext. Every Kafka
    client of the platform (aiokafka producers, consumers and admin clients, faust apps)
    takes its settings from here.

    `shared()` gives one whose clients share a single TLS context, so that
    `reload_certificate()` (after the certificate files were replaced) makes every new
    connection of every client present the new certificate; open connections keep theirs."""

    protocol: Literal["tls", "plaintext"] = "plaintext"
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    context: ssl.SSLContext | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_settings(cls, s: CommonSettings) -> KafkaSecurity:
        return cls(s.kafka_security, s.kafka_ca_file, s.kafka_cert_file, s.kafka_key_file)

    @classmethod
    def from_env(cls) -> KafkaSecurity:
        """From DR_KAFKA_SECURITY, DR_KAFKA_CA_FILE, DR_KAFKA_CERT_FILE, DR_KAFKA_KEY_FILE."""
        return cls.from_settings(CommonSettings())

    def ssl_context(self) -> ssl.SSLContext | None:
        """None for plaintext; for tls a context that checks the broker's certificate and
        host name against the CA and presents this client's certificate (the shared one, if
        any)."""
        if self.protocol == "plaintext":
            return None
        if self.context is not None:
            return self.context
        missing = [
            name
            for name, path in (
                ("DR_KAFKA_CA_FILE", self.ca_file),
                ("DR_KAFKA_CERT_FILE", self.cert_file),
                ("DR_KAFKA_KEY_FILE", self.key_file),
            )
            if not path
        ]
        if missing:
            raise ValueError(f"DR_KAFKA_SECURITY=tls needs {', '.join(missing)}")
        context: ssl.SSLContext = create_ssl_context(
            cafile=self.ca_file, certfile=self.cert_file, keyfile=self.key_file
        )
        return context

    def shared(self) -> KafkaSecurity:
        """This security with one TLS context for all its clients (itself for plaintext)."""
        if self.protocol == "plaintext" or self.context is not None:
            return self
        return replace(self, context=self.ssl_context())

    def reload_certificate(self) -> None:
        """Load the certificate and key files again into the shared context: the next TLS
        handshake of every client made from this security presents them."""
        if self.context is None:
            raise ValueError("no shared TLS context to reload: use shared() first")
        self.context.load_cert_chain(self.cert_file, self.key_file)

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments for an aiokafka client."""
        context = self.ssl_context()
        if context is None:
            return {}
        return {"security_protocol": "SSL", "ssl_context": context}
