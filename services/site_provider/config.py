"""Settings of the site provider (environment variables, prefix `DR_PROVIDER_`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared.edge_identity import EdgeSettings


class ProviderSettings(EdgeSettings):
    model_config = SettingsConfigDict(
        env_prefix="DR_PROVIDER_", extra="ignore", populate_by_name=True
    )

    state_dir: Path = Field(
        default=Path(".state/provider"),
        description="Identity and discovery state (sequence, static IP allocations).",
    )
    site_file: Path | None = Field(
        default=None, description="Site description (YAML/JSON): clouds, hosts, VMs, networks."
    )
    storage_root: Path | None = Field(
        default=None,
        description="Base of relative host storage folders; default <state_dir>/hosts.",
    )
    discovery_interval_seconds: float = Field(
        default=5.0, gt=0, le=3600, description="How often the site file and storage are polled."
    )
    full_snapshot_minutes: float = Field(
        default=10.0, gt=0, le=24 * 60, description="A full snapshot at least this often."
    )
    max_part_bytes: int = Field(
        default=700_000,
        ge=10_000,
        le=900_000,
        description="Objects' JSON per snapshot record; larger snapshots are split in parts.",
    )

    @property
    def storage_base(self) -> Path:
        return self.storage_root or self.state_dir / "hosts"
