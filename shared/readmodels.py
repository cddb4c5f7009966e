"""Read models every service keeps from `registration.events.v1`: vaults, API tokens and edge
producers (with the Ed25519 public keys that verify their signatures and cannot sign). The
registration service owns the source of truth and writes these rows itself; other services
apply the events here."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg

from shared.kafka.consumers import RUN_MEMO, Handler
from shared.kafka.decode import Incoming, Rejected
from shared.schemas import registration as reg
from shared.schemas.envelope import Envelope


async def upsert_vault(conn: asyncpg.Connection, vault_id: uuid.UUID, name: str) -> None:
    await conn.execute(
        "INSERT INTO known_vaults (vault_id, name) VALUES ($1, $2)"
        " ON CONFLICT (vault_id) DO UPDATE SET name = EXCLUDED.name",
        vault_id,
        name,
    )


async def upsert_token(conn: asyncpg.Connection, ev: reg.ApiTokenIssued) -> None:
    await conn.execute(
        "INSERT INTO known_tokens (token_hash, token_id, vault_id, role, expires_at)"
        " VALUES ($1,$2,$3,$4,$5) ON CONFLICT (token_hash) DO NOTHING",
        ev.token_hash,
        ev.token_id,
        ev.vault_id,
        ev.role.value,
        ev.expires_at,
    )


async def revoke_token(conn: asyncpg.Connection, token_id: str) -> None:
    await conn.execute("UPDATE known_tokens SET revoked = true WHERE token_id = $1", token_id)


async def upsert_producer(
    conn: asyncpg.Connection, vault_id: uuid.UUID, ev: reg.ProducerRegistered
) -> None:
    await conn.execute(
        "INSERT INTO known_producers (producer_id, vault_id, kind, name, site, generation,"
        " public_key, metadata) VALUES ($1,$2,$3,$4,$5,$6,$7,$8)"
        " ON CONFLICT (producer_id) DO UPDATE SET generation = EXCLUDED.generation,"
        " public_key = EXCLUDED.public_key, site = EXCLUDED.site,"
        " metadata = EXCLUDED.metadata, active = true, revoked_at = NULL,"
        " revoked_reason = NULL"
        " WHERE known_producers.generation <= EXCLUDED.generation",
        ev.producer_id,
        vault_id,
        ev.kind.value,
        ev.name,
        ev.site,
        ev.generation,
        ev.public_key,
        ev.metadata,
    )


async def _on_vault(conn: asyncpg.Connection, inc: Incoming) -> None:
    ev = inc.payload
    assert isinstance(ev, reg.VaultCreated)
    await upsert_vault(conn, ev.vault_id, ev.name)


async def _on_token(conn: asyncpg.Connection, inc: Incoming) -> None:
    ev = inc.payload
    assert isinstance(ev, reg.ApiTokenIssued)
    await upsert_token(conn, ev)


async def _on_token_revoked(conn: asyncpg.Connection, inc: Incoming) -> None:
    ev = inc.payload
    assert isinstance(ev, reg.ApiTokenRevoked)
    await revoke_token(conn, ev.token_id)


async def _on_producer(conn: asyncpg.Connection, inc: Incoming) -> None:
    ev = inc.payload
    assert isinstance(ev, reg.ProducerRegistered)
    await upsert_producer(conn, inc.envelope.vault_id, ev)


async def _on_producer_removed(conn: asyncpg.Connection, inc: Incoming) -> None:
    ev = inc.payload
    assert isinstance(ev, reg.ProducerUnregistered)
    await conn.execute(
        "UPDATE known_producers SET active = false WHERE producer_id = $1", ev.producer_id
    )


async def _on_producer_revoked(conn: asyncpg.Connection, inc: Incoming) -> None:
    ev = inc.payload
    assert isinstance(ev, reg.ProducerRevoked)
    await conn.execute(
        "UPDATE known_producers SET active = false, revoked_at = $2, revoked_reason = $3"
        " WHERE producer_id = $1 AND generation <= $4",
        ev.producer_id,
        inc.envelope.occurred_at,
        ev.reason,
        ev.generation,
    )


async def _on_connection(conn: asyncpg.Connection, inc: Incoming) -> None:
    ev = inc.payload
    assert isinstance(ev, reg.ProducerConnectionChanged)
    await conn.execute(
        "UPDATE known_producers SET connection_state = $2 WHERE producer_id = $1",
        ev.producer_id,
        ev.state.value,
    )


def registration_handlers() -> dict[str, Handler]:
    """Handlers that keep this service's read models; merge into a consumer's handler map."""
    return {
        "VaultCreated": _on_vault,
        "ApiTokenIssued": _on_token,
        "ApiTokenRevoked": _on_token_revoked,
        "ProducerRegistered": _on_producer,
        "ProducerUnregistered": _on_producer_removed,
        "ProducerRevoked": _on_producer_revoked,
        "ProducerConnectionChanged": _on_connection,
    }


ProducerLookup = Callable[[asyncpg.Connection, str], Awaitable[dict[str, Any] | None]]


async def known_token(pool: asyncpg.Pool, token_hash: str) -> asyncpg.Record | None:
    """A token of the read model by the hash of its secret (with whether it has expired)."""
    row: asyncpg.Record | None = await pool.fetchrow(
        "SELECT token_id, vault_id, role, revoked, expires_at <= now() AS expired"
        " FROM known_tokens WHERE token_hash = $1",
        token_hash,
    )
    return row


async def known_producer(conn: asyncpg.Connection, producer_id: str) -> dict[str, Any] | None:
    """The producer as this service knows it (looked up once per run of records)."""
    memo = RUN_MEMO.get()
    if memo is not None and ("producer", producer_id) in memo:
        found: dict[str, Any] | None = memo["producer", producer_id]
        return found
    try:
        pid = uuid.UUID(producer_id)
    except ValueError:
        return None
    row = await conn.fetchrow(
        "SELECT vault_id, public_key, active, kind, name, site, revoked_at, revoked_reason"
        " FROM known_producers"
        " WHERE producer_id = $1",
        pid,
    )
    producer = dict(row) if row else None
    if memo is not None:
        memo["producer", producer_id] = producer
    return producer


def signature_verifier(
    lookup: ProducerLookup = known_producer,
) -> Callable[[asyncpg.Connection, Envelope, bool], Awaitable[None]]:
    """A consumer verifier: signed events must come from an active producer of the same vault
    with a valid signature; otherwise the event is rejected to the DLQ with the reason."""

    async def verify(conn: asyncpg.Connection, env: Envelope, signed: bool) -> None:
        if not signed:
            if not env.producer_id.startswith("service:"):
                raise Rejected("unsigned_source", "edge events must use a signed event type")
            return
        if env.signature is None:
            raise Rejected("unsigned", "event has no signature")
        producer = await lookup(conn, env.producer_id)
        if producer is None:
            raise Rejected("unknown_producer", f"producer {env.producer_id} is not registered")
        if producer.get("revoked_at") is not None:
            raise Rejected(
                "producer_revoked",
                f"producer {env.producer_id} was revoked at "
                f"{producer['revoked_at'].isoformat()} ({producer.get('revoked_reason')}):"
                " its key verifies nothing",
            )
        if not producer["active"]:
            raise Rejected("producer_inactive", f"producer {env.producer_id} was unregistered")
        if producer["vault_id"] != env.vault_id:
            raise Rejected("vault_mismatch", "event's vault is not the producer's vault")
        if producer["public_key"] is None:
            raise Rejected(
                "no_public_key",
                f"producer {env.producer_id} was registered before Ed25519 event signatures:"
                " re-register it (force) so it registers a public key",
            )
        if not env.signature_valid(producer["public_key"]):
            raise Rejected(
                "bad_signature",
                "signature does not verify with the producer's registered public key",
            )

    return verify


class NotYetKnown(Exception):
    """A request needs a fact this service learns from an event it may not have applied yet
    (e.g. enabling a VM right after its cloud was paired). `until_known` retries the request
    for a few seconds; if the fact is still missing the answer is a 409 that says to try again
    in a moment, with `Retry-After`."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


READ_MODEL_WAIT_SECONDS = 5.0
T = TypeVar("T")


async def until_known(
    attempt: Callable[[], Awaitable[T]],
    *,
    timeout: float = READ_MODEL_WAIT_SECONDS,
    interval: float = 0.25,
) -> T:
    """`attempt()`, again every `interval` while it raises `NotYetKnown`, for at most
    `timeout` seconds (then the last `NotYetKnown` propagates: a 409 with Retry-After)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await attempt()
        except NotYetKnown:
            if time.monotonic() + interval > deadline:
                raise
            await asyncio.sleep(interval)
