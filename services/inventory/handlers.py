"""Inventory handlers: load (provider, stored hashes), decide (domain), persist the differences
and their events (outbox) in the consumer's transaction."""

from __future__ import annotations

import logging
import time
import uuid
from datetime import datetime

import asyncpg
from prometheus_client import Counter, Histogram

from services.inventory import domain
from services.inventory import repository as repo
from services.inventory.repository import ProviderRef
from shared import outbox, readmodels
from shared.kafka.decode import Incoming, Rejected
from shared.schemas import registration as reg
from shared.schemas.envelope import Envelope
from shared.schemas.inventory import (
    DiscoveryChange,
    DiscoverySnapshot,
    Inventory,
    foreign_ids,
    object_id_of,
)
from shared.schemas.registration import ProducerKind

log = logging.getLogger(__name__)

PRODUCER_ID = "service:inventory"

APPLIED = Counter("dr_inventory_discovery_applied_total", "Discovery records applied", ["type"])
STALE = Counter(
    "dr_inventory_discovery_stale_total", "Discovery records ignored as stale (old sequence)"
)
PARTS_STAGED = Counter(
    "dr_inventory_snapshot_parts_staged_total", "Parts of split snapshots kept until complete"
)
OBJECTS_CHANGED = Counter(
    "dr_inventory_objects_changed_total", "Inventory objects changed", ["kind", "change"]
)
APPLY_SECONDS = Histogram(
    "dr_inventory_apply_seconds",
    "Time to apply one discovery record (diff + writes + events)",
    ["type"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


async def provider_of(conn: asyncpg.Connection, env: Envelope, site: str) -> ProviderRef:
    """The registered site provider that published `env`; rejects agents and wrong sites (the
    signature verifier already checked it is known, active, of this vault, and signed it)."""
    known = await readmodels.known_producer(conn, env.producer_id)
    if known is None:  # only without a verifier
        raise Rejected("unknown_producer", f"producer {env.producer_id} is not registered")
    if known["kind"] != ProducerKind.PROVIDER.value:
        raise Rejected(
            "not_a_provider", f"producer {env.producer_id} is a {known['kind']}, not a provider"
        )
    if known["site"] != site:
        raise Rejected(
            "site_mismatch",
            f"discovery is for site '{site}' but the provider is registered for '{known['site']}'",
        )
    return ProviderRef(uuid.UUID(env.producer_id), known["vault_id"], known["name"], site)


async def apply_plan(conn: asyncpg.Connection, ref: ProviderRef, plan: domain.Plan) -> None:
    """Write the differences and enqueue one event per difference, in the caller's transaction."""
    await repo.delete_objects(conn, ref.provider_id, plan.removals)
    await repo.write_objects(conn, ref, plan.upserts)
    for payload in domain.events_of(plan, ref.provider_id, ref.site):
        await outbox.emit(
            conn, payload, vault_id=ref.vault_id, key=str(ref.provider_id), producer_id=PRODUCER_ID
        )
    for (kind, change), n in plan.tally().items():
        OBJECTS_CHANGED.labels(kind.value, change.value).inc(n)


async def apply_snapshot(
    conn: asyncpg.Connection,
    ref: ProviderRef,
    snapshot: DiscoverySnapshot,
    at: datetime,
    event_id: uuid.UUID | None = None,
) -> domain.Plan | None:
    """Apply a full snapshot (or keep one part of it); None when stale or incomplete."""
    started = time.perf_counter()
    last = await repo.lock_provider(conn, ref)
    if domain.is_stale(last, snapshot.sequence):
        await _ignore_stale(conn, ref, "DiscoverySnapshot", snapshot.sequence, last, event_id)
        return None
    inventory = snapshot.inventory
    if snapshot.parts > 1:
        whole = await _assemble(conn, ref, snapshot)
        if whole is None:
            return None
        inventory = whole
    problems = domain.snapshot_problems(inventory)
    if problems:
        raise Rejected("invalid_inventory", "; ".join(problems))
    _own_ids_only(ref, inventory)
    plan = domain.plan_snapshot(await repo.object_hashes(conn, ref.provider_id), inventory)
    await apply_plan(conn, ref, plan)
    await repo.record_applied(conn, ref.provider_id, snapshot.sequence, at, snapshot=True)
    _applied("DiscoverySnapshot", ref, snapshot.sequence, plan, started, inventory.size())
    return plan


async def apply_change(
    conn: asyncpg.Connection,
    ref: ProviderRef,
    change: DiscoveryChange,
    at: datetime,
    event_id: uuid.UUID | None = None,
) -> domain.Plan | None:
    """Apply an incremental change; None when stale."""
    started = time.perf_counter()
    last = await repo.lock_provider(conn, ref)
    if domain.is_stale(last, change.sequence):
        await _ignore_stale(conn, ref, "DiscoveryChange", change.sequence, last, event_id)
        return None
    problems = domain.duplicate_problems(change.upserts)
    if problems:
        raise Rejected("invalid_inventory", "; ".join(problems[:10]))
    _own_ids_only(ref, change.upserts)
    keys = [(kind, object_id_of(o)) for kind, o in change.upserts.objects()]
    existing = await repo.object_hashes(conn, ref.provider_id, keys + change.removals.keys())
    plan = domain.plan_change(existing, change.upserts, change.removals)
    await apply_plan(conn, ref, plan)
    await repo.record_applied(conn, ref.provider_id, change.sequence, at, snapshot=False)
    _applied("DiscoveryChange", ref, change.sequence, plan, started, change.upserts.size())
    return plan


def _own_ids_only(ref: ProviderRef, inventory: Inventory) -> None:
    """A provider describes only objects whose ids its own vault and site derive: it can't
    publish (and so overwrite) another vault's or site's VM, host, cloud, network or disk."""
    foreign = foreign_ids(inventory, ref.vault_id, ref.site)
    if foreign:
        raise Rejected("foreign_id", "; ".join(foreign))


async def _assemble(
    conn: asyncpg.Connection, ref: ProviderRef, snapshot: DiscoverySnapshot
) -> Inventory | None:
    here = await repo.stage_part(
        conn,
        ref.provider_id,
        snapshot.sequence,
        snapshot.part,
        snapshot.parts,
        snapshot.inventory.model_dump_json(),
    )
    PARTS_STAGED.inc()
    if here < snapshot.parts:
        log.info(
            "snapshot part kept until the snapshot is complete",
            extra={
                "provider_id": str(ref.provider_id),
                "sequence": snapshot.sequence,
                "part": snapshot.part,
                "parts": snapshot.parts,
                "received": here,
            },
        )
        return None
    others = await repo.staged_parts(
        conn, ref.provider_id, snapshot.sequence, snapshot.parts, but=snapshot.part
    )
    await repo.drop_parts(conn, ref.provider_id, snapshot.sequence)
    parsed = [Inventory.model_validate_json(text) for text in others]
    return domain.merge_parts([*parsed, snapshot.inventory])


async def _ignore_stale(
    conn: asyncpg.Connection,
    ref: ProviderRef,
    kind: str,
    sequence: int,
    last: int | None,
    event_id: uuid.UUID | None,
) -> None:
    STALE.inc()
    await repo.count_stale(conn, ref.provider_id)
    log.warning(
        "stale discovery ignored",
        extra={
            "type": kind,
            "provider_id": str(ref.provider_id),
            "sequence": sequence,
            "last_applied": last,
            "event_id": str(event_id) if event_id else None,
        },
    )


def _applied(
    kind: str, ref: ProviderRef, sequence: int, plan: domain.Plan, started: float, size: int
) -> None:
    seconds = time.perf_counter() - started
    APPLIED.labels(kind).inc()
    APPLY_SECONDS.labels(kind).observe(seconds)
    log.info(
        "discovery applied",
        extra={
            "type": kind,
            "provider_id": str(ref.provider_id),
            "site": ref.site,
            "sequence": sequence,
            "objects": size,
            "upserts": len(plan.upserts),
            "removals": len(plan.removals),
            "ms": round(seconds * 1000, 2),
        },
    )


# -- consumer entry points ---------------------------------------------------------------------


async def handle_snapshot(conn: asyncpg.Connection, incoming: Incoming) -> None:
    snapshot = incoming.payload
    assert isinstance(snapshot, DiscoverySnapshot)
    env = incoming.envelope
    ref = await provider_of(conn, env, snapshot.site)
    await apply_snapshot(conn, ref, snapshot, env.occurred_at, env.event_id)


async def handle_change(conn: asyncpg.Connection, incoming: Incoming) -> None:
    change = incoming.payload
    assert isinstance(change, DiscoveryChange)
    env = incoming.envelope
    ref = await provider_of(conn, env, change.site)
    await apply_change(conn, ref, change, env.occurred_at, env.event_id)


async def handle_provider_unregistered(conn: asyncpg.Connection, incoming: Incoming) -> None:
    """Keep the read model, and drop an unregistered provider's inventory (with events)."""
    await readmodels.registration_handlers()["ProducerUnregistered"](conn, incoming)
    ev = incoming.payload
    assert isinstance(ev, reg.ProducerUnregistered)
    ref = await repo.provider_ref(conn, ev.producer_id)
    if ref is None:
        return
    plan = domain.plan_snapshot(await repo.object_hashes(conn, ref.provider_id), Inventory())
    await apply_plan(conn, ref, plan)
    await repo.delete_provider(conn, ref.provider_id)
    log.info(
        "provider unregistered; its inventory removed",
        extra={"provider_id": str(ref.provider_id), "removed": len(plan.removals)},
    )
