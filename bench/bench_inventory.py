"""Inventory apply benchmark against the real PostgreSQL (`DATABASE_URL`, default: the local
stack): a 2,000-VM site snapshot (2 disks, 1 static NIC each) split into Kafka-sized parts as
the site provider publishes it, then applied through the consumer's path (record bytes ->
envelope + payload validation -> apply in one transaction, commit).

`*_apply_ms` lines are the consumer's service time for all parts of one snapshot (decode,
verify-free validation, staging of parts, diff by content hash, writes, outbox events, commit).
Lines: `bench <name> <value> <unit>`. Run: `.venv/bin/python -m bench.bench_inventory`.
"""

from __future__ import annotations

import asyncio
import secrets
import statistics
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

from services.inventory import handlers
from services.inventory.__main__ import MIGRATIONS
from services.inventory.repository import ProviderRef
from services.site_provider.domain import build_inventory, split_snapshot
from services.site_provider.sitefile import parse_site
from shared import db, signing
from shared.kafka.decode import decode_event
from shared.schemas.envelope import new_envelope
from shared.schemas.inventory import DiscoverySnapshot, Inventory
from shared.settings import CommonSettings

VMS = 2000
REPEATS = 5
PART_BYTES = 700_000  # the site provider's default
SITE = f"""
clouds: [{{name: Gold, host_groups: [HG-Gold]}}, {{name: Silver, host_groups: [HG-Silver]}}]
networks:
  - name: Corp
    subnets: [{{name: corp, cidr: 10.1.0.0/16, static_pool: {{start: 10.1.0.10, end: 10.1.250.0}}}}]
hosts:
  - {{name: "hv{{n:02}}", count: 16, cloud: Gold, storage_dir: "{{name}}"}}
  - {{name: "hs{{n:02}}", count: 4, cloud: Silver, storage_dir: "{{name}}"}}
vms:
  - name: "vm-{{n:04}}"
    count: {VMS}
    hosts: [{", ".join([f"hv{i:02}" for i in range(1, 17)] + [f"hs{i:02}" for i in range(1, 5)])}]
    disks: [{{name: os, size: 40GiB}}, {{name: data, size: 200GiB}}]
    nics: [{{network: Corp, ip: static}}]
"""


def site_inventory(site: str, vault_id: uuid.UUID) -> Inventory:
    scope = str(vault_id)
    return build_inventory(site, parse_site(SITE), Path("/srv/hosts"), [], id_scope=scope).inventory


def with_changes(inventory: Inventory, every: int) -> Inventory:
    """`inventory` with the memory of every `every`-th VM changed."""
    vms = [
        vm.model_copy(update={"memory_mb": vm.memory_mb * 2}) if i % every == 0 else vm
        for i, vm in enumerate(inventory.vms)
    ]
    return inventory.model_copy(update={"vms": vms})


def records(ref: ProviderRef, sequence: int, inventory: Inventory) -> list[bytes]:
    """The snapshot as the Kafka record values the provider would publish (signed)."""
    key = signing.new_private_key()
    return [
        new_envelope(
            part, vault_id=ref.vault_id, producer_id=str(ref.provider_id), signing_key=key
        ).to_bytes()
        for part in split_snapshot(ref.site, sequence, inventory, PART_BYTES)
    ]


async def apply_records(pool: asyncpg.Pool, ref: ProviderRef, values: list[bytes]) -> float:
    """Service time in ms to decode and apply every record (one transaction each)."""
    started = time.perf_counter()
    for value in values:
        envelope, payload = decode_event(value)
        assert isinstance(payload, DiscoverySnapshot)
        async with pool.acquire() as conn, conn.transaction():
            await handlers.apply_snapshot(conn, ref, payload, envelope.occurred_at)
    return (time.perf_counter() - started) * 1000


async def apply_whole(
    pool: asyncpg.Pool, ref: ProviderRef, seq: int, inventory: Inventory
) -> float:
    """Service time in ms to apply the snapshot as one already-decoded record (no parts)."""
    snapshot = DiscoverySnapshot(site=ref.site, sequence=seq, inventory=inventory)
    started = time.perf_counter()
    async with pool.acquire() as conn, conn.transaction():
        await handlers.apply_snapshot(conn, ref, snapshot, datetime.now(UTC))
    return (time.perf_counter() - started) * 1000


def line(name: str, value: float, unit: str) -> None:
    print(
        f"bench {name} {value:.2f} {unit}"
        if unit != "count"
        else f"bench {name} {value:.0f} {unit}"
    )


async def main() -> None:
    settings = CommonSettings()
    schema = f"bench_inventory_{secrets.token_hex(3)}"
    pool = await db.create_pool(settings.database_url, schema)
    try:
        await db.migrate(pool, schema, MIGRATIONS)
        vault = uuid.uuid4()  # ids derive from the provider's vault and site
        base = site_inventory("bench", vault)
        changed = with_changes(base, every=100)  # 1 % of the VMs
        sizes = [len(v) for v in records(ProviderRef(uuid.uuid4(), vault, "p", "bench"), 1, base)]
        line("inventory_snapshot_vms", len(base.vms), "count")
        line("inventory_snapshot_records", len(sizes), "count")
        line("inventory_snapshot_largest_record_kib", max(sizes) / 1024, "KiB")

        first, unchanged, one_pct, in_memory = [], [], [], []
        for _ in range(REPEATS):
            ref = ProviderRef(uuid.uuid4(), vault, "bench-vmm", "bench")
            first.append(await apply_records(pool, ref, records(ref, 1, base)))
            unchanged.append(await apply_records(pool, ref, records(ref, 2, base)))
            # alternate so that every measured apply changes 20 VMs
            one_pct.append(await apply_records(pool, ref, records(ref, 3, changed)))
            one_pct.append(await apply_records(pool, ref, records(ref, 4, base)))
            in_memory.append(await apply_whole(pool, ref, 5, base))
        first_ms = statistics.median(first)
        changed_ms = statistics.median(one_pct)
        line("inventory_first_apply_ms", first_ms, "ms")
        line("inventory_reapply_unchanged_ms", statistics.median(unchanged), "ms")
        line("inventory_reapply_1pct_changed_ms", changed_ms, "ms")
        line("inventory_first_vs_1pct_changed_ratio", first_ms / changed_ms, "x")
        # the database side alone: diff + writes, without decoding or assembling parts
        line("inventory_reapply_unchanged_decoded_ms", statistics.median(in_memory), "ms")
    finally:
        await pool.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await pool.close()


if __name__ == "__main__":
    asyncio.run(main())
