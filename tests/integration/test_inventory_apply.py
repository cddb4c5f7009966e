"""Inventory apply handlers against the real PostgreSQL: full snapshots, changes, split
snapshots, stale records, rejected records, and idempotent re-applies that write nothing."""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from kit.stack import migrated_pool
from services.inventory import handlers
from services.inventory.__main__ import MIGRATIONS
from services.inventory.repository import ProviderRef
from services.site_provider.domain import build_inventory, object_id, split_snapshot
from services.site_provider.sitefile import parse_site
from shared import readmodels
from shared.kafka.decode import Incoming, Rejected
from shared.schemas import registration as reg
from shared.schemas.envelope import new_envelope
from shared.schemas.inventory import (
    Change,
    DiscoveryChange,
    DiscoverySnapshot,
    Inventory,
    Removals,
)

pytestmark = pytest.mark.integration

SITE = """
clouds: [{name: Gold, host_groups: [HG]}, {name: Silver, host_groups: [HG2]}]
networks: [{name: Corp, subnets: [{name: corp, cidr: 10.0.0.0/24}]}]
hosts:
  - {name: "hv{n}", count: 2, cloud: Gold}
  - {name: hv3, cloud: Silver}
vms:
  - {name: "web-{n:02}", count: VMS, hosts: [hv1, hv2], nics: [{network: Corp}]}
"""


def inventory(ref: ProviderRef, vms: int = 10, cpu: int = 2) -> Inventory:
    text = SITE.replace("VMS", str(vms)).replace("nics:", f"cpu: {cpu}, nics:")
    scope = str(ref.vault_id)
    return build_inventory(ref.site, parse_site(text), Path("/srv"), [], id_scope=scope).inventory


@pytest.fixture(scope="module")
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    async with migrated_pool(database_url, "inventory", MIGRATIONS) as p:
        yield p


@pytest.fixture
def ref() -> ProviderRef:
    site = f"site-{secrets.token_hex(3)}"
    return ProviderRef(uuid.uuid4(), uuid.uuid4(), f"vmm-{site}", site)


NOW = datetime.now(UTC)


async def snapshot(pool: asyncpg.Pool, ref: ProviderRef, seq: int, inv: Inventory) -> Any:
    async with pool.acquire() as conn, conn.transaction():
        snap = DiscoverySnapshot(site=ref.site, sequence=seq, inventory=inv)
        return await handlers.apply_snapshot(conn, ref, snap, NOW)


async def change(pool: asyncpg.Pool, ref: ProviderRef, seq: int, **kw: Any) -> Any:
    async with pool.acquire() as conn, conn.transaction():
        ch = DiscoveryChange(site=ref.site, sequence=seq, **kw)
        return await handlers.apply_change(conn, ref, ch, NOW)


async def objects(pool: asyncpg.Pool, ref: ProviderRef) -> dict[tuple[str, str], str]:
    """(kind, name) -> the row version (xmin): unchanged xmin means the row was not written."""
    rows = await pool.fetch(
        "SELECT kind, name, xmin::text AS v FROM objects WHERE provider_id = $1", ref.provider_id
    )
    return {(r["kind"], r["name"]): r["v"] for r in rows}


async def events(pool: asyncpg.Pool, ref: ProviderRef) -> list[dict[str, Any]]:
    rows = await pool.fetch(
        "SELECT value FROM outbox WHERE key = $1 ORDER BY id", str(ref.provider_id)
    )
    return [json.loads(r["value"]) for r in rows]


async def provider(pool: asyncpg.Pool, ref: ProviderRef) -> asyncpg.Record:
    row = await pool.fetchrow("SELECT * FROM providers WHERE provider_id = $1", ref.provider_id)
    assert row is not None
    return row


async def test_full_snapshot_adds_everything_with_one_event_each(
    pool: asyncpg.Pool, ref: ProviderRef
) -> None:
    await snapshot(pool, ref, 10, inventory(ref))
    stored = await objects(pool, ref)
    assert sum(1 for kind, _ in stored if kind == "vm") == 10
    assert len(stored) == 2 + 3 + 10 + 1
    evs = await events(pool, ref)
    assert [e["type"] for e in evs[:4]] == [
        "NetworkChanged",
        "CloudChanged",
        "CloudChanged",
        "HostChanged",
    ]
    assert len(evs) == len(stored)
    assert {e["payload"]["change"] for e in evs} == {"added"}
    assert {e["vault_id"] for e in evs} == {str(ref.vault_id)}
    assert evs[-1]["payload"]["vm"]["nics"][0]["network_id"] == object_id(
        f"{ref.vault_id}/{ref.site}", "network", "Corp"
    )
    row = await provider(pool, ref)
    assert (row["last_sequence"], row["last_snapshot_sequence"]) == (10, 10)


async def test_reapplying_an_unchanged_snapshot_writes_nothing(
    pool: asyncpg.Pool, ref: ProviderRef
) -> None:
    await snapshot(pool, ref, 1, inventory(ref))
    before, emitted = await objects(pool, ref), len(await events(pool, ref))
    plan = await snapshot(pool, ref, 2, inventory(ref))
    assert plan is not None and plan.empty
    assert await objects(pool, ref) == before
    assert len(await events(pool, ref)) == emitted
    assert (await provider(pool, ref))["last_sequence"] == 2


async def test_snapshot_changes_and_removes_only_what_differs(
    pool: asyncpg.Pool, ref: ProviderRef
) -> None:
    await snapshot(pool, ref, 1, inventory(ref, vms=10))
    before, emitted = await objects(pool, ref), len(await events(pool, ref))
    smaller = inventory(ref, vms=9)
    edited = smaller.model_copy(
        update={"vms": [*smaller.vms[:-1], smaller.vms[-1].model_copy(update={"cpu_count": 16})]}
    )
    await snapshot(pool, ref, 2, edited)
    after = await objects(pool, ref)
    assert ("vm", "web-10") not in after
    changed = {key for key in after if after[key] != before[key]}
    assert changed == {("vm", "web-09")}
    new = (await events(pool, ref))[emitted:]
    assert [(e["type"], e["payload"]["change"]) for e in new] == [
        ("VmChanged", "changed"),
        ("VmChanged", "removed"),
    ]
    assert new[1]["payload"]["vm"] is None
    assert new[1]["payload"]["vm_id"] == object_id(f"{ref.vault_id}/{ref.site}", "vm", "web-10")


async def test_change_applies_incrementally_and_idempotently(
    pool: asyncpg.Pool, ref: ProviderRef
) -> None:
    inv = inventory(ref, vms=3)
    await snapshot(pool, ref, 1, inv)
    emitted = len(await events(pool, ref))
    bigger = inv.vms[0].model_copy(update={"memory_mb": 8192})
    removals = Removals(vms=[inv.vms[2].vm_id])
    await change(pool, ref, 2, upserts=Inventory(vms=[bigger]), removals=removals)
    stored = await objects(pool, ref)
    assert {name for kind, name in stored if kind == "vm"} == {"web-01", "web-02"}
    assert len(await events(pool, ref)) == emitted + 2
    # the same change again (a new sequence, nothing different): no writes, no events
    plan = await change(pool, ref, 3, upserts=Inventory(vms=[bigger]), removals=removals)
    assert plan is not None and plan.empty
    assert await objects(pool, ref) == stored
    assert len(await events(pool, ref)) == emitted + 2
    row = await provider(pool, ref)
    assert (row["last_sequence"], row["last_snapshot_sequence"]) == (3, 1)


async def test_stale_records_are_ignored_and_counted(pool: asyncpg.Pool, ref: ProviderRef) -> None:
    await snapshot(pool, ref, 5, inventory(ref, vms=2))
    before, emitted = await objects(pool, ref), len(await events(pool, ref))
    assert await snapshot(pool, ref, 5, Inventory()) is None
    assert await snapshot(pool, ref, 4, Inventory()) is None
    assert await change(pool, ref, 3, removals=Removals(vms=["x"])) is None
    assert await objects(pool, ref) == before
    assert len(await events(pool, ref)) == emitted
    row = await provider(pool, ref)
    assert (row["last_sequence"], row["stale_ignored"]) == (5, 3)


async def test_split_snapshot_applies_once_every_part_is_here(
    pool: asyncpg.Pool, ref: ProviderRef
) -> None:
    await snapshot(pool, ref, 1, inventory(ref, vms=5))
    parts = split_snapshot(ref.site, 2, inventory(ref, vms=40), max_bytes=8_000)
    assert len(parts) >= 3
    for part in parts[:-1]:
        async with pool.acquire() as conn, conn.transaction():
            assert await handlers.apply_snapshot(conn, ref, part, NOW) is None
    assert sum(1 for kind, _ in await objects(pool, ref) if kind == "vm") == 5
    async with pool.acquire() as conn, conn.transaction():
        plan = await handlers.apply_snapshot(conn, ref, parts[-1], NOW)
    assert plan is not None and len(plan.upserts) == 35 and plan.removals == []
    assert sum(1 for kind, _ in await objects(pool, ref) if kind == "vm") == 40
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM snapshot_parts WHERE provider_id = $1", ref.provider_id
        )
        == 0
    )
    # a part of an older sequence arriving late is stale
    async with pool.acquire() as conn, conn.transaction():
        assert await handlers.apply_snapshot(conn, ref, parts[0], NOW) is None


async def test_inconsistent_snapshot_is_rejected_and_changes_nothing(
    pool: asyncpg.Pool, ref: ProviderRef
) -> None:
    inv = inventory(ref, vms=2)
    broken = inv.model_copy(update={"hosts": inv.hosts[1:]})  # hv1's VMs lose their host
    with pytest.raises(Rejected) as rej:
        await snapshot(pool, ref, 1, broken)
    assert rej.value.reason == "invalid_inventory"
    assert "is not in the snapshot" in rej.value.detail
    assert await objects(pool, ref) == {}


async def test_ids_of_another_vault_or_site_are_refused_and_change_nothing(
    pool: asyncpg.Pool, ref: ProviderRef
) -> None:
    """A provider can't describe (and so overwrite downstream) another vault's objects: their
    ids derive from the other vault and site, not its own."""
    other_vault = ProviderRef(uuid.uuid4(), uuid.uuid4(), ref.name, ref.site)
    other_site = ProviderRef(uuid.uuid4(), ref.vault_id, ref.name, "elsewhere")
    for foreign in (inventory(other_vault, vms=2), inventory(other_site, vms=2)):
        with pytest.raises(Rejected) as rej:
            await snapshot(pool, ref, 1, foreign)
        assert rej.value.reason == "foreign_id", rej.value
        assert "is not this provider's site's id" in rej.value.detail
    own = inventory(ref, vms=2)
    stolen = own.model_copy(
        update={
            "vms": [own.vms[0].model_copy(update={"vm_id": inventory(other_vault).vms[0].vm_id})]
        }
    )
    with pytest.raises(Rejected, match="foreign_id"):
        await change(pool, ref, 1, upserts=stolen)
    assert await objects(pool, ref) == {}
    await snapshot(pool, ref, 1, own)
    assert await objects(pool, ref)


async def test_consumer_entry_rejects_agents_and_wrong_sites(pool: asyncpg.Pool) -> None:
    vault = uuid.uuid4()
    site = f"site-{secrets.token_hex(3)}"

    async def register(kind: reg.ProducerKind) -> uuid.UUID:
        pid = uuid.uuid4()
        ev = reg.ProducerRegistered(
            producer_id=pid, kind=kind, name=f"{kind}-{pid}", site=site, generation=1,
            public_key="0" * 64, heartbeat_interval_seconds=5,
        )  # fmt: skip
        async with pool.acquire() as conn:
            await readmodels.upsert_producer(conn, vault, ev)
        return pid

    async def handle(pid: uuid.UUID, snap_site: str) -> None:
        payload = DiscoverySnapshot(site=snap_site, sequence=1, inventory=Inventory())
        env = new_envelope(payload, vault_id=vault, producer_id=str(pid))
        async with pool.acquire() as conn, conn.transaction():
            await handlers.handle_snapshot(conn, Incoming(env, payload, "t", 0, 0, str(pid)))

    agent = await register(reg.ProducerKind.AGENT)
    with pytest.raises(Rejected, match="not_a_provider"):
        await handle(agent, site)
    prov = await register(reg.ProducerKind.PROVIDER)
    with pytest.raises(Rejected) as rej:
        await handle(prov, "elsewhere")
    assert rej.value.reason == "site_mismatch"
    await handle(prov, site)
    sites = await pool.fetch("SELECT site FROM providers WHERE provider_id = $1", prov)
    assert [r["site"] for r in sites] == [site]


async def test_unregistered_provider_loses_its_inventory(
    pool: asyncpg.Pool, ref: ProviderRef
) -> None:
    await snapshot(pool, ref, 1, inventory(ref, vms=2))
    emitted = len(await events(pool, ref))
    ev = reg.ProducerUnregistered(
        producer_id=ref.provider_id, kind=reg.ProducerKind.PROVIDER, name=ref.name
    )
    env = new_envelope(ev, vault_id=ref.vault_id, producer_id="service:registration")
    async with pool.acquire() as conn, conn.transaction():
        await handlers.handle_provider_unregistered(conn, Incoming(env, ev, "t", 0, 0, None))
    assert await objects(pool, ref) == {}
    removed = (await events(pool, ref))[emitted:]
    assert {e["payload"]["change"] for e in removed} == {Change.REMOVED.value}
    assert [e["type"] for e in removed][-1] == "NetworkChanged"
