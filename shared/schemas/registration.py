"""Events of the registration service (`registration.events.v1`, keyed by vault id) and the
heartbeats edge producers publish (`registration.heartbeats.v1`, keyed by producer id)."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import AwareDatetime, Field

from shared import topics
from shared.schemas.envelope import EventPayload
from shared.schemas.registry import event_type
from shared.signing import PUBLIC_KEY_HEX


class Role(StrEnum):
    READER = "reader"
    OPERATOR = "operator"
    ADMIN = "admin"


class ProducerKind(StrEnum):
    PROVIDER = "provider"
    AGENT = "agent"


class ConnectionState(StrEnum):
    CONNECTED = "Connected"
    DISCONNECTED = "Disconnected"


@event_type("VaultCreated", topic=topics.REGISTRATION_EVENTS)
class VaultCreated(EventPayload):
    """A vault (tenant boundary) was created."""

    vault_id: uuid.UUID
    name: str


@event_type("ApiTokenIssued", topic=topics.REGISTRATION_EVENTS)
class ApiTokenIssued(EventPayload):
    """An API token was issued; services keep (hash, role, vault) to authenticate requests."""

    token_id: str
    token_hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    role: Role
    vault_id: uuid.UUID
    name: str
    expires_at: AwareDatetime | None = Field(
        default=None, description="When the token stops authenticating; None: never."
    )


@event_type("ApiTokenRevoked", topic=topics.REGISTRATION_EVENTS)
class ApiTokenRevoked(EventPayload):
    """An API token was revoked; it authenticates nothing from now on."""

    token_id: str


@event_type("RegistrationKeyCreated", topic=topics.REGISTRATION_EVENTS)
class RegistrationKeyCreated(EventPayload):
    """A registration key was generated for the vault (the key itself is never published)."""

    key_id: str
    expires_at: datetime


@event_type("RegistrationKeyRevoked", topic=topics.REGISTRATION_EVENTS)
class RegistrationKeyRevoked(EventPayload):
    """A registration key was revoked before it expired."""

    key_id: str


@event_type("ProducerRegistered", topic=topics.REGISTRATION_EVENTS, version=2)
class ProducerRegistered(EventPayload):
    """A site provider or host agent registered (or was re-registered, `generation` > 1).

    `public_key` is the producer's Ed25519 public key (hex): it verifies the producer's event
    signatures and cannot make one. A re-registration replaces it, so events signed with the
    old private key are rejected from then on. (Version 1, retired, carried an HMAC key.)
    """

    producer_id: uuid.UUID
    kind: ProducerKind
    name: str
    site: str
    generation: int = Field(ge=1)
    public_key: str = Field(pattern=PUBLIC_KEY_HEX)
    heartbeat_interval_seconds: float
    metadata: dict[str, Any] = Field(default_factory=dict)


@event_type("ProducerUnregistered", topic=topics.REGISTRATION_EVENTS)
class ProducerUnregistered(EventPayload):
    """A producer was removed from the vault; its credential stops working."""

    producer_id: uuid.UUID
    kind: ProducerKind
    name: str


@event_type("ProducerRevoked", topic=topics.REGISTRATION_EVENTS)
class ProducerRevoked(EventPayload):
    """An admin revoked a producer (e.g. a stolen host): its Kafka principal's ACLs were
    deleted (the broker refuses it from then on), its public key verifies nothing (its signed
    events go to the DLQ, reason `producer_revoked`) and its credential re-registers nothing.
    The audit record: who revoked it, when (the envelope's time) and why."""

    producer_id: uuid.UUID
    kind: ProducerKind
    name: str
    site: str
    generation: int = Field(ge=1)
    reason: str = Field(min_length=1, max_length=500)
    revoked_by: str = Field(description="The API token id of the admin who revoked it.")
    kafka_principal: str | None = Field(
        default=None, description="The Kafka principal whose ACLs were deleted; None: none."
    )
    acls_deleted: int = Field(default=0, ge=0)


@event_type("ProducerConnectionChanged", topic=topics.REGISTRATION_EVENTS)
class ProducerConnectionChanged(EventPayload):
    """A producer went Connected (heartbeat seen) or Disconnected (missed heartbeats)."""

    producer_id: uuid.UUID
    kind: ProducerKind
    name: str
    site: str
    state: ConnectionState
    previous_state: ConnectionState | None
    last_heartbeat_at: datetime | None
    reason: str


@event_type("Heartbeat", topic=topics.REGISTRATION_HEARTBEATS, signed=True)
class Heartbeat(EventPayload):
    """Signed liveness beacon of a site provider or host agent, every interval."""

    kind: ProducerKind
    sequence: int = Field(ge=0)
    interval_seconds: float = Field(gt=0, le=3600)
    software_version: str = Field(default="", max_length=64)
    status: dict[str, Any] = Field(default_factory=dict)
