"""The event envelope: id (de-duplication), type, schema version, occurred-at, vault, producer,
payload and, for edge-produced events, an Ed25519 signature made with the producer's private key
(see shared/signing.py)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator
from pydantic_core import to_jsonable_python

from shared import signing
from shared.schemas.base import EventPayload
from shared.schemas.registry import payload_model, type_name_of

__all__ = ["Envelope", "EventPayload", "new_envelope"]


class Envelope(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    event_id: uuid.UUID = Field(description="Unique id; consumers de-duplicate on it.")
    type: str = Field(min_length=1, max_length=100, pattern=r"^[A-Z][A-Za-z0-9]+$")
    schema_version: int = Field(default=1, ge=1, le=1000)
    occurred_at: AwareDatetime
    vault_id: uuid.UUID
    producer_id: str = Field(
        min_length=1, max_length=200, description="`service:<name>` or a producer's id."
    )
    payload: dict[str, Any]
    signature: str | None = Field(
        default=None,
        pattern=signing.SIGNATURE_HEX,
        description="Ed25519 signature (hex) of the producer; edge events only.",
    )

    @field_validator("signature", mode="before")
    @classmethod
    def _not_hmac(cls, value: Any) -> Any:
        if isinstance(value, str) and len(value) == 64:
            raise ValueError(
                "a 64-digit signature is the retired HMAC scheme, no longer accepted: sign"
                " with the producer's Ed25519 private key (128 hex digits)"
            )
        return value

    def signed_fields(self) -> dict[str, Any]:
        """What the signature covers: every field but `signature`, with the payload reduced
        to its event type's signed view if the type registers one (see `event_type`)."""
        et = payload_model(self.type, self.schema_version)
        if et is None or et.signed_view is None:
            return self.model_dump(mode="json", exclude={"signature"})
        fields = self.model_dump(mode="json", exclude={"signature", "payload"})
        fields["payload"] = to_jsonable_python(et.signed_view(self.payload))
        return fields

    def signed_with(self, private_key: Ed25519PrivateKey) -> Envelope:
        return self.model_copy(
            update={"signature": signing.sign(self.signed_fields(), private_key)}
        )

    def signature_valid(self, public_key: str) -> bool:
        """True when the signature is `public_key`'s (hex) over `signed_fields()`."""
        if self.signature is None:
            return False
        return signing.verify(self.signed_fields(), self.signature, public_key)

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()


def new_envelope(
    payload: EventPayload,
    *,
    vault_id: uuid.UUID,
    producer_id: str,
    occurred_at: datetime | None = None,
    signing_key: Ed25519PrivateKey | None = None,
) -> Envelope:
    type_name, version = type_name_of(type(payload))
    env = Envelope(
        event_id=uuid.uuid4(),
        type=type_name,
        schema_version=version,
        occurred_at=occurred_at or datetime.now(UTC),
        vault_id=vault_id,
        producer_id=producer_id,
        payload=payload.model_dump(mode="json"),
    )
    return env.signed_with(signing_key) if signing_key is not None else env
