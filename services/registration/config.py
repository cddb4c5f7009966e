"""Settings of the registration service (environment variables, prefix `DR_REGISTRATION_`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared.settings import ServiceSettings


class RegistrationSettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="DR_REGISTRATION_", extra="ignore", populate_by_name=True
    )

    http_port: int = Field(default=8101, ge=0, le=65535, description="HTTP port.")
    missed_heartbeats: int = Field(
        default=3, ge=1, le=100, description="Missed intervals before Disconnected."
    )
    sweep_interval_seconds: float = Field(
        default=1.0, gt=0, le=60, description="How often silent producers are looked for."
    )
    outage_hold_seconds: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="After a Kafka or PostgreSQL outage of this service, how long it waits for"
        " heartbeats to flow again before it judges silent producers from the outage's end"
        " (as soon as heartbeats arrive, it judges from their first fetch).",
    )
    key_valid_hours: int = Field(
        default=120, ge=1, le=24 * 30, description="Default registration key validity (5 days)."
    )
    default_heartbeat_seconds: float = Field(
        default=10.0, gt=0, le=3600, description="Heartbeat interval when a producer names none."
    )
    edge_ca_cert_file: Path | None = Field(
        default=None,
        description="The edge-issuing CA's certificate (PEM): with its key, edges registering"
        " with a CSR get a Kafka client certificate of their own and ACLs for it. Unset: no"
        " certificates are issued and a CSR is refused.",
    )
    edge_ca_key_file: Path | None = Field(
        default=None, description="The edge-issuing CA's private key (PEM, unencrypted, 0600)."
    )
    edge_cert_valid_hours: float = Field(
        default=720,
        gt=0,
        le=24 * 398,
        description="Validity of an edge's Kafka certificate (30 days; fractions allowed, e.g."
        " 0.0125 = 45 s for tests); an edge renews it, at start and while it runs, when less"
        " than a third is left.",
    )
