"""Settings of the failover service (environment variables, prefix `DR_FAILOVER_`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared.settings import ServiceSettings


class FailoverSettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="DR_FAILOVER_", extra="ignore", populate_by_name=True
    )

    http_port: int = Field(default=8105, ge=0, le=65535, description="HTTP port.")
    test_max_age_seconds: float = Field(
        default=14 * 24 * 3600,
        gt=0,
        description="Test failovers older than this are cleaned up by force (2 weeks).",
    )
    cleanup_interval_seconds: float = Field(
        default=60, gt=0, description="How often old test failovers are looked for."
    )
    script_timeout_seconds: float = Field(
        default=600, gt=0, description="Default timeout of a recovery plan's script action."
    )
    scripts_dir: Path = Field(
        default=Path("/etc/dr/failover/scripts"),
        description="The folder of scripts a recovery plan's script action may run, by file "
        "name only (links are followed and must stay inside). Only an admin of the host should "
        "be able to write to it.",
    )
    script_path: str = Field(
        default="/usr/local/bin:/usr/bin:/bin",
        max_length=4096,
        description="PATH of a script action: its whole environment is PATH and DR_PLAN_* values.",
    )
    script_output_bytes: int = Field(
        default=65_536,
        ge=1024,
        le=16 * 1_048_576,
        description="Most of a script's output (stdout, stderr each) kept while it runs; the "
        "rest is read and dropped.",
    )
    script_excerpt_chars: int = Field(
        default=2000,
        ge=0,
        le=65_536,
        description="Characters of a script's output (its end, secrets removed) kept in the job.",
    )
    step_timeout_seconds: float = Field(
        default=1800,
        gt=0,
        description="How long a step waits for an agent's or the replication service's answer.",
    )
    disk_check_timeout_seconds: float = Field(
        default=60,
        gt=0,
        description="Reverse replication: how long the old primary's host agent has to say "
        "which of its disk images it still has; no answer refuses the seeded reverse (pass "
        "force_full_resync to copy every block).",
    )
    sync_timeout_seconds: float = Field(
        default=120,
        gt=0,
        description="Unplanned failover: how long the optional source shutdown + final sync "
        "may take before the failover goes on without it.",
    )
    poll_seconds: float = Field(
        default=0.5, gt=0, le=10, description="Longest wait between checks for an answer."
    )
