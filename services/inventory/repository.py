"""Queries on the inventory service's own schema."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from services.inventory.domain import Key, Upsert, columns_of
from shared.schemas.inventory import Kind


@dataclass(frozen=True)
class ProviderRef:
    """A site provider as the registration read model knows it."""

    provider_id: uuid.UUID
    vault_id: uuid.UUID
    name: str
    site: str


async def lock_provider(conn: asyncpg.Connection, ref: ProviderRef) -> int | None:
    """Create the provider's row on first sight, lock it; returns its last applied sequence."""
    await conn.execute(
        "INSERT INTO providers (provider_id, vault_id, name, site) VALUES ($1,$2,$3,$4)"
        " ON CONFLICT (provider_id) DO UPDATE SET name = EXCLUDED.name, site = EXCLUDED.site"
        " WHERE providers.name <> EXCLUDED.name OR providers.site <> EXCLUDED.site",
        ref.provider_id,
        ref.vault_id,
        ref.name,
        ref.site,
    )
    last: int = await conn.fetchval(
        "SELECT last_sequence FROM providers WHERE provider_id = $1 FOR UPDATE", ref.provider_id
    )
    return None if last < 0 else last


async def provider_ref(conn: asyncpg.Connection, provider_id: uuid.UUID) -> ProviderRef | None:
    row = await conn.fetchrow(
        "SELECT provider_id, vault_id, name, site FROM providers WHERE provider_id = $1 FOR UPDATE",
        provider_id,
    )
    return (
        ProviderRef(row["provider_id"], row["vault_id"], row["name"], row["site"]) if row else None
    )


async def record_applied(
    conn: asyncpg.Connection,
    provider_id: uuid.UUID,
    sequence: int,
    at: datetime,
    *,
    snapshot: bool,
) -> None:
    if snapshot:
        await conn.execute(
            "UPDATE providers SET last_sequence = $2, last_snapshot_sequence = $2,"
            " last_snapshot_at = $3, updated_at = now() WHERE provider_id = $1",
            provider_id,
            sequence,
            at,
        )
    else:
        await conn.execute(
            "UPDATE providers SET last_sequence = $2, last_change_at = $3, updated_at = now()"
            " WHERE provider_id = $1",
            provider_id,
            sequence,
            at,
        )


async def count_stale(conn: asyncpg.Connection, provider_id: uuid.UUID) -> None:
    await conn.execute(
        "UPDATE providers SET stale_ignored = stale_ignored + 1 WHERE provider_id = $1",
        provider_id,
    )


async def object_hashes(
    conn: asyncpg.Connection, provider_id: uuid.UUID, keys: list[Key] | None = None
) -> dict[Key, str]:
    """Content hashes of the provider's objects (all, or only `keys`)."""
    if keys is None:
        rows = await conn.fetch(
            "SELECT kind, object_id, content_hash FROM objects WHERE provider_id = $1",
            provider_id,
        )
    else:
        rows = await conn.fetch(
            "SELECT o.kind, o.object_id, o.content_hash FROM objects o"
            " JOIN unnest($2::text[], $3::text[]) AS k(kind, object_id)"
            " ON o.kind = k.kind AND o.object_id = k.object_id WHERE o.provider_id = $1",
            provider_id,
            [k.value for k, _ in keys],
            [oid for _, oid in keys],
        )
    return {(Kind(r["kind"]), r["object_id"]): r["content_hash"] for r in rows}


async def write_objects(conn: asyncpg.Connection, ref: ProviderRef, upserts: list[Upsert]) -> None:
    if not upserts:
        return
    rows = []
    for u in upserts:
        name, cloud_id, host_id = columns_of(u.obj)
        rows.append(
            (
                ref.provider_id,
                u.kind.value,
                u.object_id,
                ref.vault_id,
                ref.site,
                name,
                cloud_id,
                host_id,
                u.content_hash,
                u.obj.model_dump_json(),
            )
        )
    await conn.executemany(
        "INSERT INTO objects (provider_id, kind, object_id, vault_id, site, name, cloud_id,"
        " host_id, content_hash, body) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10::text::jsonb)"
        " ON CONFLICT (provider_id, kind, object_id) DO UPDATE SET site = EXCLUDED.site,"
        " name = EXCLUDED.name, cloud_id = EXCLUDED.cloud_id, host_id = EXCLUDED.host_id,"
        " content_hash = EXCLUDED.content_hash, body = EXCLUDED.body, updated_at = now()",
        rows,
    )


async def delete_objects(conn: asyncpg.Connection, provider_id: uuid.UUID, keys: list[Key]) -> None:
    if keys:
        await conn.execute(
            "DELETE FROM objects o USING unnest($2::text[], $3::text[]) AS k(kind, object_id)"
            " WHERE o.provider_id = $1 AND o.kind = k.kind AND o.object_id = k.object_id",
            provider_id,
            [k.value for k, _ in keys],
            [oid for _, oid in keys],
        )


async def delete_provider(conn: asyncpg.Connection, provider_id: uuid.UUID) -> None:
    await conn.execute("DELETE FROM providers WHERE provider_id = $1", provider_id)
    await conn.execute("DELETE FROM snapshot_parts WHERE provider_id = $1", provider_id)


async def stage_part(
    conn: asyncpg.Connection,
    provider_id: uuid.UUID,
    sequence: int,
    part: int,
    parts: int,
    inventory_json: str,
) -> int:
    """Keep one part of a split snapshot; returns how many of its parts are here."""
    await conn.execute(
        "INSERT INTO snapshot_parts (provider_id, sequence, part, parts, inventory)"
        " VALUES ($1,$2,$3,$4,$5) ON CONFLICT DO NOTHING",
        provider_id,
        sequence,
        part,
        parts,
        inventory_json,
    )
    count: int = await conn.fetchval(
        "SELECT count(*) FROM snapshot_parts WHERE provider_id = $1 AND sequence = $2"
        " AND part <= $3",
        provider_id,
        sequence,
        parts,
    )
    return count


async def staged_parts(
    conn: asyncpg.Connection, provider_id: uuid.UUID, sequence: int, parts: int, *, but: int
) -> list[str]:
    """The staged parts of a snapshot except part `but` (the one in hand)."""
    rows = await conn.fetch(
        "SELECT inventory FROM snapshot_parts WHERE provider_id = $1 AND sequence = $2"
        " AND part <= $3 AND part <> $4 ORDER BY part",
        provider_id,
        sequence,
        parts,
        but,
    )
    return [r["inventory"] for r in rows]


async def drop_parts(conn: asyncpg.Connection, provider_id: uuid.UUID, up_to: int) -> None:
    await conn.execute(
        "DELETE FROM snapshot_parts WHERE provider_id = $1 AND sequence <= $2", provider_id, up_to
    )


# -- reads for the API ------------------------------------------------------------------------


async def resolve(
    conn: asyncpg.Connection, vault_id: uuid.UUID, kind: Kind, id_or_name: str
) -> list[str]:
    """Ids of the vault's objects of `kind` whose id or name is `id_or_name`."""
    rows = await conn.fetch(
        "SELECT object_id FROM objects WHERE vault_id = $1 AND kind = $2"
        " AND (object_id = $3 OR name = $3)",
        vault_id,
        kind.value,
        id_or_name,
    )
    return [r["object_id"] for r in rows]


async def site_known(conn: asyncpg.Connection, vault_id: uuid.UUID, site: str) -> bool:
    found: bool = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM providers WHERE vault_id = $1 AND site = $2)",
        vault_id,
        site,
    )
    return found


def _object(row: asyncpg.Record) -> dict[str, Any]:
    return {
        **row["body"],
        "site": row["site"],
        "provider_id": row["provider_id"],
        "updated_at": row["updated_at"],
    }


async def list_objects(
    conn: asyncpg.Connection,
    vault_id: uuid.UUID,
    kind: Kind,
    *,
    site: str | None = None,
    cloud_ids: list[str] | None = None,
    host_ids: list[str] | None = None,
    name_contains: str | None = None,
    limit: int | None = None,
    offset: int = 0,
) -> tuple[list[dict[str, Any]], int]:
    """One page of the vault's objects of `kind` (filters are ANDed) and the total count."""
    pattern = None
    if name_contains is not None:
        escaped = name_contains.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        pattern = f"%{escaped}%"
    rows = await conn.fetch(
        "SELECT provider_id, site, body, updated_at, count(*) OVER () AS total FROM objects"
        " WHERE vault_id = $1 AND kind = $2 AND ($3::text IS NULL OR site = $3)"
        " AND ($4::text[] IS NULL OR cloud_id = ANY($4))"
        " AND ($5::text[] IS NULL OR host_id = ANY($5))"
        " AND ($6::text IS NULL OR name ILIKE $6) ORDER BY site, name, object_id"
        " LIMIT $7 OFFSET $8",
        vault_id,
        kind.value,
        site,
        cloud_ids,
        host_ids,
        pattern,
        limit,
        offset,
    )
    if rows:
        return [_object(r) for r in rows], int(rows[0]["total"])
    if offset > 0:  # past the end: count anyway, so the client sees the total
        _, total = await list_objects(
            conn, vault_id, kind, site=site, cloud_ids=cloud_ids, host_ids=host_ids,
            name_contains=name_contains, limit=1,
        )  # fmt: skip
        return [], total
    return [], 0


async def get_object(
    conn: asyncpg.Connection, vault_id: uuid.UUID, kind: Kind, object_id: str
) -> dict[str, Any] | None:
    row = await conn.fetchrow(
        "SELECT provider_id, site, body, updated_at FROM objects"
        " WHERE vault_id = $1 AND kind = $2 AND object_id = $3 LIMIT 1",
        vault_id,
        kind.value,
        object_id,
    )
    return _object(row) if row else None


async def list_sites(conn: asyncpg.Connection, vault_id: uuid.UUID) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT p.provider_id, p.name, p.site, p.last_sequence, p.last_snapshot_sequence,"
        " p.last_snapshot_at, p.last_change_at, p.stale_ignored, p.updated_at,"
        " count(*) FILTER (WHERE o.kind = 'cloud') AS clouds,"
        " count(*) FILTER (WHERE o.kind = 'host') AS hosts,"
        " count(*) FILTER (WHERE o.kind = 'vm') AS vms,"
        " count(*) FILTER (WHERE o.kind = 'network') AS networks"
        " FROM providers p LEFT JOIN objects o ON o.provider_id = p.provider_id"
        " WHERE p.vault_id = $1 GROUP BY p.provider_id ORDER BY p.site",
        vault_id,
    )
    return [dict(r) for r in rows]
