"""Registration handlers: load, decide (domain), persist + outbox in one transaction."""

from __future__ import annotations

import logging
import secrets
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from cryptography import x509
from prometheus_client import Gauge

from services.registration import domain
from services.registration import repository as repo
from services.registration.edge_certs import EdgeCertificates
from shared import edge_pki, outbox, signing
from shared.kafka.decode import Incoming, Rejected
from shared.runtime import DependencyWatch
from shared.schemas import registration as ev
from shared.schemas.envelope import EventPayload

log = logging.getLogger(__name__)

PRODUCER_ID = "service:registration"

PRODUCERS = Gauge(
    "dr_registration_producers",
    "Registered (active) site providers and host agents by kind and connection state",
    ["kind", "state"],
)


async def emit(conn: asyncpg.Connection, vault_id: uuid.UUID, payload: EventPayload) -> None:
    await outbox.emit(conn, payload, vault_id=vault_id, key=str(vault_id), producer_id=PRODUCER_ID)


async def create_vault(pool: asyncpg.Pool, name: str) -> dict[str, Any]:
    vault_id = uuid.uuid4()
    async with pool.acquire() as conn, conn.transaction():
        try:
            vault = await repo.insert_vault(conn, vault_id, name)
        except asyncpg.UniqueViolationError:
            raise domain.AlreadyRegistered(
                f"a vault named '{name}' already exists: choose another name"
            ) from None
        await repo.insert_known_vault(conn, vault_id, name)
        await emit(conn, vault_id, ev.VaultCreated(vault_id=vault_id, name=name))
    return vault


async def issue_token(
    pool: asyncpg.Pool,
    vault_id: uuid.UUID,
    name: str,
    role: ev.Role,
    expires_in_seconds: int | None = None,
) -> dict[str, Any]:
    token_id = f"tok-{secrets.token_hex(6)}"
    token = signing.new_secret("drt")
    token_hash = signing.hash_secret(token)
    expires_at = (
        datetime.now(UTC) + timedelta(seconds=expires_in_seconds) if expires_in_seconds else None
    )
    async with pool.acquire() as conn, conn.transaction():
        row = await repo.insert_token(
            conn, token_id, vault_id, name, role.value, token_hash, expires_at
        )
        await emit(
            conn,
            vault_id,
            ev.ApiTokenIssued(
                token_id=token_id,
                token_hash=token_hash,
                role=role,
                vault_id=vault_id,
                name=name,
                expires_at=expires_at,
            ),
        )
    return {**row, "token": token}


async def revoke_token(
    pool: asyncpg.Pool, vault_id: uuid.UUID, token_id: str
) -> dict[str, Any] | None:
    async with pool.acquire() as conn, conn.transaction():
        row = await repo.revoke_token(conn, vault_id, token_id)
        if row is not None:
            await emit(conn, vault_id, ev.ApiTokenRevoked(token_id=token_id))
    return row


async def create_registration_key(
    pool: asyncpg.Pool, vault_id: uuid.UUID, valid_hours: float
) -> dict[str, Any]:
    key_id = f"key-{secrets.token_hex(6)}"
    key = signing.new_secret("drk")
    expires_at = datetime.now(UTC) + timedelta(hours=valid_hours)
    async with pool.acquire() as conn, conn.transaction():
        row = await repo.insert_key(conn, key_id, vault_id, signing.hash_secret(key), expires_at)
        await emit(conn, vault_id, ev.RegistrationKeyCreated(key_id=key_id, expires_at=expires_at))
    return {**row, "key": key}


async def revoke_registration_key(
    pool: asyncpg.Pool, vault_id: uuid.UUID, key_id: str
) -> dict[str, Any] | None:
    async with pool.acquire() as conn, conn.transaction():
        row = await repo.revoke_key(conn, vault_id, key_id)
        if row is not None:
            await emit(conn, vault_id, ev.RegistrationKeyRevoked(key_id=key_id))
    return row


async def register_producer(
    pool: asyncpg.Pool,
    *,
    registration_key: str,
    kind: ev.ProducerKind,
    name: str,
    site: str,
    heartbeat_seconds: float,
    force: bool,
    metadata: dict[str, Any],
    public_key: str,
    csr: x509.CertificateSigningRequest | None = None,
    certificates: EdgeCertificates | None = None,
) -> dict[str, Any]:
    """Register (or, with force, re-register) a provider or agent with the Ed25519 public key
    it made (it keeps the private key); returns its new credential. A re-registration
    replaces the public key, so events signed with the old private key are refused.

    With a `csr` (checked by the caller) the producer gets a Kafka client certificate for the
    principal of this registration (`edge_pki.principal_of`) and that principal's ACLs; the
    ACLs of the previous registration's principal are deleted first, so its old certificate
    may do nothing. Both happen before the transaction commits: if Kafka refuses, nothing is
    registered (ACLs created for a registration that then fails to commit name a principal no
    certificate was issued for)."""
    credential = signing.new_secret("drc")
    async with pool.acquire() as conn, conn.transaction():
        found = await repo.key_by_hash(conn, signing.hash_secret(registration_key))
        domain.check_registration_key(found[1] if found else None, datetime.now(UTC))
        assert found is not None
        vault_id, key = found
        same = await repo.producer_by_name(conn, vault_id, kind.value, name)
        site_provider = await repo.provider_of_site(conn, vault_id, site)
        domain.check_reregistration(same, site_provider, kind.value, name, site, force)
        before = await repo.get_producer(conn, uuid.UUID(same.producer_id)) if same else None
        row = await repo.upsert_producer(
            conn,
            producer_id=uuid.UUID(same.producer_id) if same else uuid.uuid4(),
            vault_id=vault_id,
            kind=kind.value,
            name=name,
            site=site,
            credential_hash=signing.hash_secret(credential),
            public_key=public_key,
            key_id=key.key_id,
            heartbeat_seconds=heartbeat_seconds,
            metadata=metadata,
        )
        previous = before["kafka_principal"] if before else None
        issued = await _kafka_identity(row, previous, csr, certificates)
        if issued is not None:
            row = await repo.set_certificate(
                conn, row["producer_id"], issued.principal, issued.serial, issued.not_after
            )
        await emit(
            conn,
            vault_id,
            ev.ProducerRegistered(
                producer_id=row["producer_id"],
                kind=kind,
                name=name,
                site=site,
                generation=row["generation"],
                public_key=public_key,
                heartbeat_interval_seconds=heartbeat_seconds,
                metadata=metadata,
            ),
        )
    log.info(
        "producer registered",
        extra={
            "producer_id": str(row["producer_id"]),
            "kind": kind.value,
            "generation": row["generation"],
        },
    )
    return {**row, "credential": credential, "kafka_certificate": issued.pem if issued else None}


async def _kafka_identity(
    row: dict[str, Any],
    previous_principal: str | None,
    csr: x509.CertificateSigningRequest | None,
    certificates: EdgeCertificates | None,
) -> edge_pki.IssuedCertificate | None:
    """Cut off the previous registration's principal; certify and grant this one's."""
    if certificates is None:
        return None
    if previous_principal:
        await certificates.remove(previous_principal)
    if csr is None:
        return None
    principal = edge_pki.principal_of(row["producer_id"], row["generation"])
    return await certificates.grant(csr, principal, row["kind"], str(row["producer_id"]))


async def refresh_edge_acls(pool: asyncpg.Pool, certificates: EdgeCertificates) -> int:
    """At start: every certified edge's ACLs brought to what this version grants its kind (a
    right added by an upgrade reaches edges registered before it; one retired is removed).
    Returns how many retired ACLs were deleted."""
    async with pool.acquire() as conn:
        rows = await repo.certified_producers(conn)
    deleted = await certificates.refresh(
        (row["kafka_principal"], row["kind"], str(row["producer_id"])) for row in rows
    )
    log.info("edge ACLs refreshed", extra={"edges": len(rows), "retired_deleted": deleted})
    return deleted


async def renew_certificate(
    pool: asyncpg.Pool,
    producer: dict[str, Any],
    csr: x509.CertificateSigningRequest,
    certificates: EdgeCertificates,
) -> dict[str, Any]:
    """A new Kafka certificate for the producer's current registration (its principal, whose
    ACLs it keeps; created if it had none)."""
    async with pool.acquire() as conn, conn.transaction():
        row = await repo.get_producer(conn, producer["producer_id"], lock=True)
        if row is None or not row["active"]:
            raise domain.KeyRejected("the producer was unregistered or revoked")
        principal = row["kafka_principal"]
        if principal is None:
            principal = edge_pki.principal_of(row["producer_id"], row["generation"])
            issued = await certificates.grant(csr, principal, row["kind"], str(row["producer_id"]))
        else:
            issued = certificates.issuer.issue(csr, principal, certificates.valid)
        row = await repo.set_certificate(
            conn, row["producer_id"], principal, issued.serial, issued.not_after
        )
    return {**row, "kafka_certificate": issued.pem}


async def unregister_producer(
    pool: asyncpg.Pool,
    vault_id: uuid.UUID,
    producer_id: uuid.UUID,
    certificates: EdgeCertificates | None = None,
) -> dict[str, Any] | None:
    """Deactivate the producer; its Kafka principal's ACLs are deleted."""
    async with pool.acquire() as conn, conn.transaction():
        row = await repo.deactivate_producer(conn, vault_id, producer_id)
        if row is not None and certificates is not None and row["kafka_principal"]:
            await certificates.remove(row["kafka_principal"])
        if row is not None:
            await emit(
                conn,
                vault_id,
                ev.ProducerUnregistered(
                    producer_id=producer_id, kind=ev.ProducerKind(row["kind"]), name=row["name"]
                ),
            )
    return row


async def revoke_producer(
    pool: asyncpg.Pool,
    vault_id: uuid.UUID,
    producer_id: uuid.UUID,
    reason: str,
    revoked_by: str,
    certificates: EdgeCertificates | None = None,
) -> dict[str, Any] | None:
    """Revoke a producer (None: unknown in this vault, or revoked already): its ACLs are
    deleted (before the commit: if Kafka refuses, nothing changes), it is deactivated, and
    `ProducerRevoked` tells every service to refuse its signatures."""
    async with pool.acquire() as conn, conn.transaction():
        row = await repo.revoke_producer(conn, vault_id, producer_id, reason)
        if row is None:
            return None
        principal = row["kafka_principal"]
        deleted = await certificates.remove(principal) if certificates and principal else 0
        await emit(
            conn,
            vault_id,
            ev.ProducerRevoked(
                producer_id=producer_id,
                kind=ev.ProducerKind(row["kind"]),
                name=row["name"],
                site=row["site"],
                generation=row["generation"],
                reason=reason,
                revoked_by=revoked_by,
                kafka_principal=principal,
                acls_deleted=deleted,
            ),
        )
    log.warning(
        "producer revoked",
        extra={"producer_id": str(producer_id), "principal": principal, "reason": reason},
    )
    return {**row, "acls_deleted": deleted}


async def _change_connection(
    conn: asyncpg.Connection,
    producer: dict[str, Any],
    state: ev.ConnectionState,
    last_heartbeat: datetime | None,
    reason: str,
) -> None:
    await repo.set_connection_state(conn, producer["producer_id"], state.value)
    await emit(
        conn,
        producer["vault_id"],
        ev.ProducerConnectionChanged(
            producer_id=producer["producer_id"],
            kind=ev.ProducerKind(producer["kind"]),
            name=producer["name"],
            site=producer["site"],
            state=state,
            previous_state=ev.ConnectionState(producer["connection_state"]),
            last_heartbeat_at=last_heartbeat,
            reason=reason,
        ),
    )
    log.info(
        "connection state changed",
        extra={"producer_id": str(producer["producer_id"]), "state": state.value, "reason": reason},
    )


async def handle_heartbeat(conn: asyncpg.Connection, incoming: Incoming) -> None:
    """Consumer handler: a verified heartbeat connects its producer."""
    beat = incoming.payload
    assert isinstance(beat, ev.Heartbeat)
    producer = await repo.get_producer(conn, uuid.UUID(incoming.envelope.producer_id), lock=True)
    assert producer is not None  # the signature verifier found it
    if producer["kind"] != beat.kind.value:
        raise Rejected(
            "kind_mismatch", f"producer is a {producer['kind']}, heartbeat says {beat.kind}"
        )
    at = incoming.envelope.occurred_at
    await repo.record_heartbeat(
        conn, producer["producer_id"], at, beat.sequence, beat.interval_seconds, beat.status
    )
    new_state = domain.next_state_on_heartbeat(ev.ConnectionState(producer["connection_state"]))
    if new_state is not None:
        await _change_connection(conn, producer, new_state, at, "heartbeat received")


async def sweep_disconnected(
    pool: asyncpg.Pool,
    missed: int,
    broker: DependencyWatch,
    clock: domain.MissedHeartbeatClock | None = None,
    heartbeats_fetched_at: Callable[[], datetime | None] = lambda: None,
    database: DependencyWatch | None = None,
) -> int:
    """Mark producers that missed `missed` heartbeat intervals Disconnected (with an event).

    Heartbeats reach this service through Kafka and are recorded in its database, so while
    this service cannot reach either, their absence says nothing about the edges: the
    missed-heartbeat clock is suspended, and restarts after both answer again
    (`MissedHeartbeatClock`). Just before marking, the broker is asked once more: the probe
    runs every few seconds, heartbeats are missed sooner."""
    watches = [w for w in (broker, database) if w is not None]
    if not all(w.reachable for w in watches):
        return 0
    recoveries = [w.recovered_at for w in watches if w.recovered_at is not None]
    judge, clock_from = (clock or domain.MissedHeartbeatClock()).counts_from(
        max(recoveries, default=None), heartbeats_fetched_at(), datetime.now(UTC)
    )
    if not judge:
        return 0
    async with pool.acquire() as conn:
        candidates = await repo.silent_producers(conn, missed, clock_from, lock=False)
    if candidates and not await broker.probe():
        return 0
    async with pool.acquire() as conn, conn.transaction():
        silent = await repo.silent_producers(conn, missed, clock_from)
        for producer in silent:
            await _change_connection(
                conn,
                producer,
                ev.ConnectionState.DISCONNECTED,
                producer["last_heartbeat_at"],
                f"no heartbeat for {missed} intervals of {producer['heartbeat_seconds']:g}s",
            )
        found = await repo.producer_counts(conn)
    for kind in ev.ProducerKind:
        for state in ev.ConnectionState:
            PRODUCERS.labels(kind.value, state.value).set(found.get((kind.value, state.value), 0))
    return len(silent)
