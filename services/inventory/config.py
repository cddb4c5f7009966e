"""Settings of the inventory service (environment variables, prefix `DR_INVENTORY_`)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared.settings import ServiceSettings


class InventorySettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="DR_INVENTORY_", extra="ignore", populate_by_name=True
    )

    http_port: int = Field(default=8102, ge=0, le=65535)
    verify_grace_seconds: float = Field(
        default=10.0,
        ge=0,
        le=600,
        description="A discovery event younger than this from a producer not (yet) known, or "
        "with a signature the known key doesn't verify, is retried rather than dead-lettered: "
        "the registration event it depends on may still be on its way.",
    )
