"""Settings of the policy service (environment variables, prefix `DR_POLICY_`)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared.settings import ServiceSettings


class PolicySettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="DR_POLICY_", extra="ignore", populate_by_name=True
    )

    http_port: int = Field(default=8103, ge=0, le=65535)
