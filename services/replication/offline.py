"""Offline initial replication: import the cycle files a source agent exported
(`<import_path>/<item_id>/cycle-<seq>.jsonl`, one signed envelope per line, see
services/host_agent/cycles.py) through the same pipeline as Kafka records: signature, vault,
sequence and block hashes are all checked, bad lines go to the deltas DLQ with their reason.

Signed envelopes are not age-checked here (a disk shipped by courier arrives days later); the
cycle sequence is what protects against replays. Delta cycles that reach the service over Kafka
before the import are ignored; the first one after it finds a gap and the item catches up by a
resync that sends only the blocks that differ.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from pathlib import Path

from services.replication.consumer import delta_pipeline
from services.replication.context import Context
from shared import topics
from shared.kafka.consumers import EventConsumer
from shared.runtime import Runtime

CYCLE_FILE = re.compile(r"^cycle-(\d+)\.jsonl$")


@dataclass(frozen=True)
class FileRecord:
    """One line of a cycle file, shaped like a Kafka record for the pipeline."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


def import_pipeline(runtime: Runtime, ctx: Context) -> EventConsumer:
    return delta_pipeline(runtime, ctx, group="replication.offline-import", aged=False)


def cycle_files(folder: Path) -> list[Path]:
    found = [
        (int(m[1]), p) for p in folder.glob("cycle-*.jsonl") if (m := CYCLE_FILE.match(p.name))
    ]
    return [p for _, p in sorted(found)]


async def import_cycles(pipeline: EventConsumer, folder: Path, item_id: str) -> int:
    """Feed every line of every cycle file in `folder` to the pipeline; returns lines read."""
    files = await asyncio.to_thread(cycle_files, folder)
    physical = topics.physical(topics.REPLICATION_DELTAS, pipeline.prefix)
    lines = 0
    for path in files:
        content = await asyncio.to_thread(path.read_bytes)
        for line in content.splitlines():
            if not line.strip():
                continue
            await pipeline.process(FileRecord(physical, -1, lines, item_id.encode(), line))
            lines += 1
    return lines
