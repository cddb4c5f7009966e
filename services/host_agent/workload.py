"""The workload generator: our stand-in for guest I/O. Writes blocks to a VM's disks at a set
rate, random or sequential, through `HostIO` (so protected disks journal every write)."""

from __future__ import annotations

import asyncio
import logging
import os
import random
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from prometheus_client import Counter

from services.host_agent.tracking import HostIO, disk_blocks
from services.host_agent.vms import VmFile, disk_path
from shared.merkle import block_length

log = logging.getLogger(__name__)

BLOCKS_WRITTEN = Counter("dr_agent_workload_blocks_written_total", "Blocks written by workloads")


class Pattern(StrEnum):
    RANDOM = "random"
    SEQUENTIAL = "sequential"


@dataclass
class Writer:
    """Picks the next block and its content; one per VM (the sequential cursor lives here)."""

    storage: Path
    vm: VmFile
    pattern: Pattern = Pattern.RANDOM
    cursor: int = 0
    zero_ratio: float = 0.125

    def next(self) -> tuple[Path, int, bytes]:
        disks = [(disk_path(self.storage, self.vm, d), d.size_bytes) for d in self.vm.disks]
        total = sum(disk_blocks(size) for _, size in disks)
        position = random.randrange(total) if self.pattern is Pattern.RANDOM else self.cursor
        self.cursor = (position + 1) % total
        for path, size in disks:
            if position < disk_blocks(size):
                length = block_length(position, size)
                zero = random.random() < self.zero_ratio
                return path, position, bytes(length) if zero else os.urandom(length)
            position -= disk_blocks(size)
        raise AssertionError("unreachable")


def write_blocks(host: HostIO, writer: Writer, count: int) -> int:
    for _ in range(count):
        path, index, data = writer.next()
        host.write(writer.vm.name, path, index, data)
    BLOCKS_WRITTEN.inc(count)
    return count


class Workloads:
    """One background writer per VM at `rate` blocks per second."""

    def __init__(self, host: HostIO, storage: Path) -> None:
        self.host = host
        self.storage = storage
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.rates: dict[str, tuple[float, Pattern]] = {}

    def start(self, vm: VmFile, rate: float, pattern: Pattern) -> None:
        self.stop(vm.name)
        writer = Writer(self.storage, vm, pattern)
        self.rates[vm.name] = (rate, pattern)
        self._tasks[vm.name] = asyncio.create_task(self._run(writer, rate), name=f"wl-{vm.name}")

    def stop(self, name: str) -> None:
        task = self._tasks.pop(name, None)
        self.rates.pop(name, None)
        if task is not None:
            task.cancel()

    async def stop_all(self) -> None:
        tasks = list(self._tasks.values())
        for name in list(self._tasks):
            self.stop(name)
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, writer: Writer, rate: float) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        written = 0
        tick = max(0.01, min(0.1, 1 / rate))
        while True:
            due = int((loop.time() - start) * rate) - written
            if due > 0:
                try:
                    written += write_blocks(self.host, writer, min(due, 1000))
                except OSError as exc:
                    log.warning(
                        "workload write failed", extra={"vm": writer.vm.name, "error": str(exc)}
                    )
            await asyncio.sleep(tick)
