"""Settings shared by every service, read from environment variables.

Every field has a documented default; a service subclasses `ServiceSettings` with its own
prefix (e.g. `DR_REGISTRATION_`) for its own fields. Common fields use the `DR_` prefix so one
environment drives the whole platform. Nothing connects at import time.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

MIN_ADMIN_TOKEN_CHARS = 32


class CommonSettings(BaseSettings):
    """Settings every process of the platform reads (prefix `DR_`, or the bare names below)."""

    # Common fields name their variable explicitly, so a service's own prefix (e.g.
    # `DR_REGISTRATION_`) applies only to the service's own fields.
    model_config = SettingsConfigDict(env_prefix="DR_", extra="ignore", populate_by_name=True)

    kafka_bootstrap_servers: str = Field(
        default="127.0.0.1:19092",
        validation_alias="KAFKA_BOOTSTRAP_SERVERS",
        description="Kafka bootstrap servers (comma separated).",
    )
    kafka_security: Literal["tls", "plaintext"] = Field(
        default="tls",
        validation_alias="DR_KAFKA_SECURITY",
        description="tls: mutual TLS to Kafka with the certificate below (the broker's ACLs"
        " decide what its principal, the certificate's CN, may do); plaintext: no TLS and no"
        " authentication (a broker without security only).",
    )
    kafka_ca_file: str = Field(
        default="",
        validation_alias="DR_KAFKA_CA_FILE",
        description="PEM file of the CA that signed the broker's certificate (tls).",
    )
    kafka_cert_file: str = Field(
        default="",
        validation_alias="DR_KAFKA_CERT_FILE",
        description="PEM file of this process's Kafka client certificate (tls; its CN is the"
        " principal).",
    )
    kafka_key_file: str = Field(
        default="",
        validation_alias="DR_KAFKA_KEY_FILE",
        description="PEM file of the private key of DR_KAFKA_CERT_FILE (tls; unencrypted, keep it"
        " mode 0600).",
    )
    database_url: str = Field(
        default="postgresql://postgres@127.0.0.1:15432/dr",
        validation_alias="DATABASE_URL",
        description="PostgreSQL URL; each service uses its own schema in this database. TLS with"
        " libpq's parameters: `?sslmode=verify-full&sslrootcert=<CA PEM file>` checks the"
        " server's certificate and name (a missing CA file or an untrusted certificate is"
        " refused with an error naming the CA file); without `sslmode` TLS is used when the"
        " server offers it, unverified.",
    )
    topic_prefix: str = Field(
        validation_alias="DR_TOPIC_PREFIX",
        default="",
        description="Prefix for every Kafka topic and consumer group (isolates test runs).",
    )
    topic_partitions: int = Field(
        validation_alias="DR_TOPIC_PARTITIONS",
        default=4,
        ge=1,
        le=256,
        description="Partitions of each topic a service creates.",
    )
    log_level: str = Field(
        validation_alias="DR_LOG_LEVEL",
        default="INFO",
        description="Log level (JSON logs on stderr).",
    )
    admin_token: SecretStr | None = Field(
        validation_alias="DR_ADMIN_TOKEN",
        default=None,
        description="Bootstrap admin token (global admin over every vault). Required by every "
        f"platform service, at least {MIN_ADMIN_TOKEN_CHARS} characters (e.g. "
        "`openssl rand -base64 32`); edges never get it.",
    )
    metrics_token: SecretStr | None = Field(
        validation_alias="DR_METRICS_TOKEN",
        default=None,
        description="Bearer token that /metrics asks for (`Authorization: Bearer <token>`,"
        " compared in constant time; 401 without it), e.g. `openssl rand -base64 32`. Empty:"
        " /metrics is open, for an internal network only. An edge (host agent, site provider)"
        " gets a token of its own, never the platform services' one.",
    )
    max_body_bytes: int = Field(
        validation_alias="DR_MAX_BODY_BYTES",
        default=1_048_576,
        ge=1024,
        description="Largest accepted HTTP request body (413 above).",
    )
    outbox_poll_ms: int = Field(
        validation_alias="DR_OUTBOX_POLL_MS",
        default=100,
        ge=10,
        description="Outbox relay poll interval when idle.",
    )
    event_max_age_seconds: int = Field(
        validation_alias="DR_EVENT_MAX_AGE_SECONDS",
        default=600,
        ge=1,
        description="Signed edge events older than this are rejected (replay).",
    )


class ServiceSettings(CommonSettings):
    """Base for a service: its HTTP address and database schema."""

    processed_events_retention_hours: float = Field(
        validation_alias="DR_PROCESSED_EVENTS_RETENTION_HOURS",
        default=168,
        gt=0,
        description="How long a consumed event's de-duplication row and a published outbox row "
        "are kept (7 days, Kafka's default retention: a redelivery is never older).",
    )

    http_host: str = Field(default="127.0.0.1", description="HTTP listen address.")
    http_port: int = Field(default=8000, ge=0, le=65535)
    db_schema: str = Field(
        default="",
        pattern=r"^[a-z_][a-z0-9_]*$|^$",
        description="PostgreSQL schema; empty: the service name.",
    )

    def admin_token_problem(self) -> str | None:
        """Why this service must not start with its admin token (None: it may)."""
        token = self.admin_token.get_secret_value() if self.admin_token else ""
        if not token:
            return "DR_ADMIN_TOKEN is not set: generate one (e.g. `openssl rand -base64 32`)"
        if len(token) < MIN_ADMIN_TOKEN_CHARS or len(set(token)) < 8:
            return (
                f"DR_ADMIN_TOKEN is too weak: use a random value of at least "
                f"{MIN_ADMIN_TOKEN_CHARS} characters (e.g. `openssl rand -base64 32`)"
            )
        return None
