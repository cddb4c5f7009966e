"""Queries on the registration service's own schema."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import asyncpg

from services.registration.domain import ExistingProducer, KeyState

PRODUCER_COLUMNS = (
    "producer_id, vault_id, kind, name, site, generation, registered_at, heartbeat_seconds,"
    " connection_state, state_changed_at, last_heartbeat_at, last_sequence, status, metadata,"
    " active, kafka_principal, certificate_serial, certificate_not_after, revoked_at,"
    " revoked_reason"
)


async def insert_vault(conn: asyncpg.Connection, vault_id: uuid.UUID, name: str) -> dict[str, Any]:
    row = await conn.fetchrow(
        "INSERT INTO vaults (vault_id, name) VALUES ($1, $2) RETURNING vault_id, name, created_at",
        vault_id,
        name,
    )
    return dict(row)


async def insert_known_vault(conn: asyncpg.Connection, vault_id: uuid.UUID, name: str) -> None:
    """The registration read model every service keeps (shared/readmodels.py), written here
    by the service that owns the vault, in the vault's own transaction."""
    await conn.execute("INSERT INTO known_vaults (vault_id, name) VALUES ($1, $2)", vault_id, name)


async def get_vault(conn: asyncpg.Connection, vault_id: uuid.UUID) -> dict[str, Any] | None:
    row = await conn.fetchrow(
        "SELECT vault_id, name, created_at FROM vaults WHERE vault_id = $1", vault_id
    )
    return dict(row) if row else None


async def list_vaults(conn: asyncpg.Connection, only: uuid.UUID | None) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT vault_id, name, created_at FROM vaults WHERE $1::uuid IS NULL OR vault_id = $1"
        " ORDER BY created_at",
        only,
    )
    return [dict(r) for r in rows]


async def insert_token(
    conn: asyncpg.Connection,
    token_id: str,
    vault_id: uuid.UUID,
    name: str,
    role: str,
    token_hash: str,
    expires_at: datetime | None = None,
) -> dict[str, Any]:
    row = await conn.fetchrow(
        "INSERT INTO api_tokens (token_id, vault_id, name, role, expires_at)"
        " VALUES ($1,$2,$3,$4,$5)"
        " RETURNING token_id, vault_id, name, role, created_at, revoked_at, expires_at",
        token_id,
        vault_id,
        name,
        role,
        expires_at,
    )
    await conn.execute(
        "INSERT INTO known_tokens (token_hash, token_id, vault_id, role, expires_at)"
        " VALUES ($1,$2,$3,$4,$5)",
        token_hash,
        token_id,
        vault_id,
        role,
        expires_at,
    )
    return dict(row)


async def list_tokens(conn: asyncpg.Connection, vault_id: uuid.UUID) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT token_id, vault_id, name, role, created_at, revoked_at, expires_at"
        " FROM api_tokens WHERE vault_id = $1 ORDER BY created_at",
        vault_id,
    )
    return [dict(r) for r in rows]


async def revoke_token(
    conn: asyncpg.Connection, vault_id: uuid.UUID, token_id: str
) -> dict[str, Any] | None:
    row = await conn.fetchrow(
        "UPDATE api_tokens SET revoked_at = coalesce(revoked_at, now())"
        " WHERE vault_id = $1 AND token_id = $2"
        " RETURNING token_id, vault_id, name, role, created_at, revoked_at, expires_at",
        vault_id,
        token_id,
    )
    if row is not None:
        await conn.execute("UPDATE known_tokens SET revoked = true WHERE token_id = $1", token_id)
    return dict(row) if row else None


async def insert_key(
    conn: asyncpg.Connection,
    key_id: str,
    vault_id: uuid.UUID,
    key_hash: str,
    expires_at: datetime,
) -> dict[str, Any]:
    row = await conn.fetchrow(
        "INSERT INTO registration_keys (key_id, vault_id, key_hash, expires_at)"
        " VALUES ($1,$2,$3,$4) RETURNING key_id, vault_id, created_at, expires_at, revoked_at",
        key_id,
        vault_id,
        key_hash,
        expires_at,
    )
    return dict(row)


async def list_keys(conn: asyncpg.Connection, vault_id: uuid.UUID) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT key_id, vault_id, created_at, expires_at, revoked_at FROM registration_keys"
        " WHERE vault_id = $1 ORDER BY created_at",
        vault_id,
    )
    return [dict(r) for r in rows]


async def revoke_key(
    conn: asyncpg.Connection, vault_id: uuid.UUID, key_id: str
) -> dict[str, Any] | None:
    row = await conn.fetchrow(
        "UPDATE registration_keys SET revoked_at = coalesce(revoked_at, now())"
        " WHERE vault_id = $1 AND key_id = $2"
        " RETURNING key_id, vault_id, created_at, expires_at, revoked_at",
        vault_id,
        key_id,
    )
    return dict(row) if row else None


async def key_by_hash(conn: asyncpg.Connection, key_hash: str) -> tuple[uuid.UUID, KeyState] | None:
    row = await conn.fetchrow(
        "SELECT key_id, vault_id, expires_at, revoked_at FROM registration_keys"
        " WHERE key_hash = $1",
        key_hash,
    )
    if row is None:
        return None
    return row["vault_id"], KeyState(row["key_id"], row["expires_at"], row["revoked_at"])


def _existing(row: asyncpg.Record | None) -> ExistingProducer | None:
    if row is None:
        return None
    return ExistingProducer(
        str(row["producer_id"]),
        row["kind"],
        row["name"],
        row["site"],
        row["active"],
        row["revoked_at"] is not None,
    )


async def producer_by_name(
    conn: asyncpg.Connection, vault_id: uuid.UUID, kind: str, name: str
) -> ExistingProducer | None:
    row = await conn.fetchrow(
        "SELECT producer_id, kind, name, site, active, revoked_at FROM producers"
        " WHERE vault_id = $1 AND kind = $2 AND name = $3 FOR UPDATE",
        vault_id,
        kind,
        name,
    )
    return _existing(row)


async def provider_of_site(
    conn: asyncpg.Connection, vault_id: uuid.UUID, site: str
) -> ExistingProducer | None:
    row = await conn.fetchrow(
        "SELECT producer_id, kind, name, site, active, revoked_at FROM producers"
        " WHERE vault_id = $1 AND kind = 'provider' AND site = $2 AND active",
        vault_id,
        site,
    )
    return _existing(row)


async def upsert_producer(
    conn: asyncpg.Connection,
    *,
    producer_id: uuid.UUID,
    vault_id: uuid.UUID,
    kind: str,
    name: str,
    site: str,
    credential_hash: str,
    public_key: str,
    key_id: str,
    heartbeat_seconds: float,
    metadata: dict[str, Any],
) -> dict[str, Any]:
    """Insert a new producer, or re-register an existing one (same id, generation + 1)."""
    row = await conn.fetchrow(
        "INSERT INTO producers (producer_id, vault_id, kind, name, site, credential_hash,"
        " public_key, registered_key_id, heartbeat_seconds, metadata)"
        " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10)"
        " ON CONFLICT (vault_id, kind, name) DO UPDATE SET"
        " generation = producers.generation + 1, site = EXCLUDED.site,"
        " credential_hash = EXCLUDED.credential_hash,"
        " public_key = EXCLUDED.public_key,"
        " registered_key_id = EXCLUDED.registered_key_id, registered_at = now(),"
        " heartbeat_seconds = EXCLUDED.heartbeat_seconds, metadata = EXCLUDED.metadata,"
        " active = true, last_sequence = NULL, revoked_at = NULL, revoked_reason = NULL,"
        " kafka_principal = NULL, certificate_serial = NULL, certificate_not_after = NULL"
        f" RETURNING {PRODUCER_COLUMNS}",
        producer_id,
        vault_id,
        kind,
        name,
        site,
        credential_hash,
        public_key,
        key_id,
        heartbeat_seconds,
        metadata,
    )
    return dict(row)


async def get_producer(
    conn: asyncpg.Connection, producer_id: uuid.UUID, *, lock: bool = False
) -> dict[str, Any] | None:
    row = await conn.fetchrow(
        f"SELECT {PRODUCER_COLUMNS}, public_key, credential_hash FROM producers"
        f" WHERE producer_id = $1{' FOR UPDATE' if lock else ''}",
        producer_id,
    )
    return dict(row) if row else None


async def producer_by_credential(
    conn: asyncpg.Connection, credential_hash: str
) -> dict[str, Any] | None:
    row = await conn.fetchrow(
        f"SELECT {PRODUCER_COLUMNS} FROM producers WHERE credential_hash = $1 AND active",
        credential_hash,
    )
    return dict(row) if row else None


async def list_producers(
    conn: asyncpg.Connection,
    vault_id: uuid.UUID,
    kind: str | None,
    state: str | None,
    site: str | None,
) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        f"SELECT {PRODUCER_COLUMNS} FROM producers WHERE vault_id = $1 AND active"
        " AND ($2::text IS NULL OR kind = $2) AND ($3::text IS NULL OR connection_state = $3)"
        " AND ($4::text IS NULL OR site = $4) ORDER BY kind, site, name",
        vault_id,
        kind,
        state,
        site,
    )
    return [dict(r) for r in rows]


async def record_heartbeat(
    conn: asyncpg.Connection,
    producer_id: uuid.UUID,
    at: datetime,
    sequence: int,
    interval: float,
    status: dict[str, Any],
) -> None:
    await conn.execute(
        "UPDATE producers SET last_heartbeat_at = greatest(last_heartbeat_at, $2),"
        " last_sequence = greatest(last_sequence, $3), heartbeat_seconds = $4, status = $5"
        " WHERE producer_id = $1",
        producer_id,
        at,
        sequence,
        interval,
        status,
    )


async def set_connection_state(
    conn: asyncpg.Connection, producer_id: uuid.UUID, state: str
) -> None:
    await conn.execute(
        "UPDATE producers SET connection_state = $2, state_changed_at = now()"
        " WHERE producer_id = $1",
        producer_id,
        state,
    )


async def silent_producers(
    conn: asyncpg.Connection, missed: int, clock_from: datetime | None = None, lock: bool = True
) -> list[dict[str, Any]]:
    """Connected producers whose last heartbeat (or `clock_from`, when later: the instant the
    missed-heartbeat clock restarted) is older than `missed` intervals (locked)."""
    rows = await conn.fetch(
        f"SELECT {PRODUCER_COLUMNS} FROM producers WHERE active AND connection_state = 'Connected'"
        " AND greatest(last_heartbeat_at, $2::timestamptz)"
        "  < now() - make_interval(secs => heartbeat_seconds * $1)"
        + (" FOR UPDATE SKIP LOCKED" if lock else ""),
        missed,
        clock_from,
    )
    return [dict(r) for r in rows]


async def producer_counts(conn: asyncpg.Connection) -> dict[tuple[str, str], int]:
    """(kind, connection state) -> how many active producers."""
    rows = await conn.fetch(
        "SELECT kind, connection_state, count(*) AS n FROM producers WHERE active"
        " GROUP BY kind, connection_state"
    )
    return {(r["kind"], r["connection_state"]): r["n"] for r in rows}


async def deactivate_producer(
    conn: asyncpg.Connection, vault_id: uuid.UUID, producer_id: uuid.UUID
) -> dict[str, Any] | None:
    row = await conn.fetchrow(
        "UPDATE producers SET active = false, connection_state = 'Disconnected'"
        f" WHERE vault_id = $1 AND producer_id = $2 AND active RETURNING {PRODUCER_COLUMNS}",
        vault_id,
        producer_id,
    )
    return dict(row) if row else None


async def producer_lookup(conn: asyncpg.Connection, producer_id: str) -> dict[str, Any] | None:
    """Signature-verifier lookup against this service's own producers table."""
    try:
        pid = uuid.UUID(producer_id)
    except ValueError:
        return None
    row = await conn.fetchrow(
        "SELECT vault_id, public_key, active, kind, name, site, revoked_at, revoked_reason"
        " FROM producers"
        " WHERE producer_id = $1",
        pid,
    )
    return dict(row) if row else None


async def certified_producers(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    """Active producers holding a Kafka principal: (producer_id, kind, kafka_principal)."""
    rows = await conn.fetch(
        "SELECT producer_id, kind, kafka_principal FROM producers"
        " WHERE active AND kafka_principal IS NOT NULL ORDER BY producer_id"
    )
    return [dict(r) for r in rows]


async def set_certificate(
    conn: asyncpg.Connection,
    producer_id: uuid.UUID,
    principal: str,
    serial: str,
    not_after: datetime,
) -> dict[str, Any]:
    """Record the Kafka certificate issued to the producer's current registration."""
    row = await conn.fetchrow(
        "UPDATE producers SET kafka_principal = $2, certificate_serial = $3,"
        f" certificate_not_after = $4 WHERE producer_id = $1 RETURNING {PRODUCER_COLUMNS}",
        producer_id,
        principal,
        serial,
        not_after,
    )
    return dict(row)


async def revoke_producer(
    conn: asyncpg.Connection, vault_id: uuid.UUID, producer_id: uuid.UUID, reason: str
) -> dict[str, Any] | None:
    """Deactivate the producer and mark it revoked (None: no such producer or revoked)."""
    row = await conn.fetchrow(
        "UPDATE producers SET active = false, connection_state = 'Disconnected',"
        " revoked_at = now(), revoked_reason = $3"
        " WHERE vault_id = $1 AND producer_id = $2 AND revoked_at IS NULL"
        f" RETURNING {PRODUCER_COLUMNS}",
        vault_id,
        producer_id,
        reason,
    )
    return dict(row) if row else None


async def revoked_by_credential(
    conn: asyncpg.Connection, credential_hash: str
) -> dict[str, Any] | None:
    """The revoked producer whose last credential this is, if any."""
    row = await conn.fetchrow(
        f"SELECT {PRODUCER_COLUMNS} FROM producers WHERE credential_hash = $1"
        " AND revoked_at IS NOT NULL",
        credential_hash,
    )
    return dict(row) if row else None
