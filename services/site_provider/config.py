"""Settings of the site provider (environment variables, prefix `DR_PROVIDER_`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared.edge import EdgeSettings


class ProviderSettings(EdgeSettings):
    model_config = SettingsConfigDict(
        env_prefix="DR_PROVIDER_", extra="ignore", populate_by_name=True
    )

    state_dir: Path = Field(default=Path(".state/provider"))
    site_file: Path | None = Field(
        default=None, description="Site description (YAML/JSON): clouds, hosts, VMs, networks."
    )
