"""Settings of the replication service (environment variables, prefix `DR_REPLICATION_`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared.settings import ServiceSettings


class ReplicationSettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="DR_REPLICATION_", extra="ignore", populate_by_name=True
    )

    http_port: int = Field(default=8104, ge=0, le=65535, description="HTTP port.")
    store_dir: Path = Field(
        default=Path(".state/replica"),
        description="Replica store root; one sub-folder per recovery site.",
    )
    keep_block_copy: bool = Field(
        default=False,
        description="false: the blocks of an item whose recovery host keeps its replica only "
        "pass through, verified against their hashes and forwarded to the host; its "
        "verification state (leaf hashes) is in PostgreSQL and its points are on its recovery "
        "host only, and any number of instances share the work. true: also keep a copy of "
        "every verified block in the replica store (point download and verification here, a "
        "copy when the host cannot hand its replica over), with one active instance.",
    )
    host_answer_seconds: float = Field(
        default=600,
        gt=0,
        le=3600,
        description="Without a block copy: how long the API waits for the recovery host to "
        "verify or export a point (it reads every block of the point).",
    )
    monitoring_window_seconds: int = Field(
        default=12 * 3600, ge=10, description="Health: window for the missed-cycles rule."
    )
    missed_cycles_warning_ratio: float = Field(
        default=0.2, gt=0, le=1, description="Health Warning above this share of missed cycles."
    )
    stale_log_seconds: int = Field(
        default=3600, ge=1, description="Health Warning when no cycle arrived for this long."
    )
    keep_recent_points: int = Field(
        default=12, ge=1, le=10_000, description="Latest points always kept beside hourly ones."
    )
    retention_interval_seconds: float = Field(
        default=30, gt=0, description="How often retention prunes recovery points."
    )
    resync_backoff_seconds: str = Field(
        default="60,120,240,480,600,1800",
        description="Waits before re-trying a resync that failed again (the last repeats).",
    )
    materialise_roots: str = Field(
        default="",
        description="Comma-separated folders recovery points may be materialised under "
        "(recovery hosts' storage); empty: the parent of the store folder.",
    )
    offline_roots: str = Field(
        default="",
        description="Comma-separated folders an offline import may read exported cycles from "
        "(after following links); empty: the materialise roots.",
    )
    max_disk_bytes: int = Field(
        default=64 * 2**40,
        gt=0,
        le=64 * 2**40,
        description="Largest disk the service protects (64 TiB, a VHDX's limit); a larger disk "
        "is refused at enable and a cycle claiming one goes to the DLQ.",
    )
    max_block_bytes: int = Field(
        default=1_048_576,
        ge=4096,
        le=4 * 1_048_576,
        description="Largest block size a cycle may declare (agents use 64 KiB): bounds the "
        "memory one batch of blocks can take.",
    )
    health_interval_seconds: float = Field(
        default=2, gt=0, description="How often RPO and health are re-evaluated."
    )
    standby_poll_seconds: float = Field(
        default=5,
        gt=0,
        le=300,
        description="One instance per deployment is active: how often a standby instance tries "
        "to take over, and how often the active one refreshes its heartbeat.",
    )

    def resync_backoff(self, attempt: int) -> float:
        steps = [float(x) for x in self.resync_backoff_seconds.split(",") if x.strip()]
        return steps[min(max(attempt, 1), len(steps)) - 1]

    def allowed_offline_roots(self) -> list[Path]:
        if not self.offline_roots.strip():
            return self.allowed_roots()
        return [Path(p).resolve() for p in self.offline_roots.split(",") if p.strip()]

    def allowed_roots(self) -> list[Path]:
        if not self.materialise_roots.strip():
            return [self.store_dir.resolve().parent]
        return [Path(p).resolve() for p in self.materialise_roots.split(",") if p.strip()]
