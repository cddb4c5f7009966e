"""`python -m services.host_agent.vmctl`: create VMs in a host's storage folder and write
blocks to them (tests, demos).

    vmctl create --storage DIR --name web01 --disk 64MiB --disk 32MiB
    vmctl write  --storage DIR --state STATE_DIR --name web01 --blocks 100 [--sequential] [--raw]

`write` goes through the journal of a protected disk (as the agent's own workload does) while
the agent is stopped; with the agent running use its `POST /v1/vms/{name}/writes` instead.
`--raw` writes around the journal (an image changed outside the agent: the agent finds it by
scan mode at its next start).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from services.host_agent.item_record import ItemRecord, disk_key, image_stat
from services.host_agent.tracking import (
    AgentRunning,
    HostIO,
    Journal,
    JournalUntrusted,
    TrackedDisk,
    agent_lock,
    disk_blocks,
)
from services.host_agent.vms import create_vm, disk_path, load_vm, parse_size
from services.host_agent.workload import Pattern, Writer, write_blocks
from shared.files import write_atomic
from shared.merkle import MerkleTree


def write_offline(
    storage: Path, state_dir: Path, name: str, blocks: int, pattern: Pattern, raw: bool = False
) -> int:
    """Write `blocks` blocks to VM `name`, journaled for every protected disk (unless `raw`)."""
    vm = load_vm(storage, name)
    paths = {disk_path(storage, vm, d).resolve() for d in vm.disks}
    host = HostIO()
    with agent_lock(state_dir):
        touched: list[tuple[Path, ItemRecord]] = []
        for item_file in sorted((state_dir / "items").glob("*/item.json")):
            record = ItemRecord.model_validate_json(item_file.read_text())
            if raw or not record.journaling:
                continue
            for i, spec in enumerate(record.disks):
                if Path(spec.path).resolve() not in paths:
                    continue
                key, n = disk_key(i), disk_blocks(spec.size_bytes)
                state = record.journals.get(key)
                if state is None:
                    continue
                try:
                    journal = Journal.recover(item_file.parent, key, n, state)
                except JournalUntrusted:
                    continue  # the agent will ask for a resync anyway
                host.track(
                    TrackedDisk(
                        spec.disk_id, key, Path(spec.path), spec.size_bytes, MerkleTree(n), journal
                    )
                )
            touched.append((item_file, record))
        try:
            written = write_blocks(host, Writer(storage, vm, pattern), blocks)
        finally:
            host.close()
        for path in paths:
            tracked = host.tracked(path)
            if tracked is not None and tracked.journal is not None:
                tracked.journal.close()
        for item_file, record in touched:  # our writes are journaled: no scan needed for them
            for i, spec in enumerate(record.disks):
                if disk_key(i) in record.closed_stats and Path(spec.path).resolve() in paths:
                    record.closed_stats[disk_key(i)] = image_stat(Path(spec.path))
            write_atomic(item_file, record.model_dump_json(indent=1).encode())
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vmctl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", help="a VM folder with sparse disk images")
    create.add_argument("--storage", type=Path, required=True)
    create.add_argument("--name", required=True)
    create.add_argument("--disk", action="append", required=True, help="size, e.g. 64MiB")
    create.add_argument("--id", default=None, help="VM id (default: a new UUID)")
    create.add_argument("--generation", type=int, choices=(1, 2), default=2)
    write = sub.add_parser("write", help="write random blocks through the journal")
    write.add_argument("--storage", type=Path, required=True)
    write.add_argument("--state", type=Path, required=True, help="the agent's state folder")
    write.add_argument("--name", required=True)
    write.add_argument("--blocks", type=int, default=16)
    write.add_argument("--sequential", action="store_true")
    write.add_argument("--raw", action="store_true", help="bypass the journal")
    args = parser.parse_args(argv)
    try:
        if args.command == "create":
            vm = create_vm(
                args.storage,
                args.name,
                [parse_size(d) for d in args.disk],
                generation=args.generation,
                vm_id=args.id,
            )
            print(vm.model_dump_json(indent=2))
        else:
            pattern = Pattern.SEQUENTIAL if args.sequential else Pattern.RANDOM
            n = write_offline(args.storage, args.state, args.name, args.blocks, pattern, args.raw)
            print(json.dumps({"vm": args.name, "written": n}))
    except (AgentRunning, FileExistsError, LookupError, ValueError) as exc:
        print(f"vmctl: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
