"""Settings of the host agent (environment variables, prefix `DR_AGENT_`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared.edge import EdgeSettings


class AgentSettings(EdgeSettings):
    model_config = SettingsConfigDict(env_prefix="DR_AGENT_", extra="ignore", populate_by_name=True)

    state_dir: Path = Field(default=Path(".state/agent"), description="Identity and journals.")
    storage_dir: Path = Field(
        default=Path(".state/agent/storage"), description="The host's VM storage folder."
    )
    host_os_version: str = Field(
        default="Windows Server 2022", description="Reported host OS version."
    )
