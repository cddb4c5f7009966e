"""Settings of the host agent (environment variables, prefix `DR_AGENT_`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared.edge_identity import EdgeSettings


class AgentSettings(EdgeSettings):
    model_config = SettingsConfigDict(env_prefix="DR_AGENT_", extra="ignore", populate_by_name=True)

    state_dir: Path = Field(default=Path(".state/agent"), description="Identity and journals.")
    storage_dir: Path = Field(
        default=Path(".state/agent/storage"), description="The host's VM storage folder."
    )
    export_roots: str = Field(
        default="",
        description="Comma-separated folders an offline initial replication may export cycle "
        "files to (after following links); empty: offline export is refused.",
    )
    host_os_version: str = Field(
        default="Windows Server 2022", description="Reported host OS version."
    )
    replica_parallel: int = Field(
        default=4,
        ge=1,
        le=32,
        description="Recovery-site replica: how many items' points are applied at a time (each "
        "item's in order); applying waits mostly on disk flushes.",
    )

    def allowed_export_roots(self) -> list[Path]:
        return [Path(p).resolve() for p in self.export_roots.split(",") if p.strip()]
