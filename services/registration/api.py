"""HTTP routes of the registration service: translate requests into handler calls."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, status
from pydantic import BaseModel, ConfigDict, Field, field_validator

from services.registration import domain, handlers
from services.registration import repository as repo
from shared import auth, edge_pki, signing
from shared.auth import CurrentPrincipal
from shared.schemas.registration import ConnectionState, ProducerKind, Role

router = APIRouter(prefix="/v1")

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VaultIn(Strict):
    name: str = Field(min_length=1, max_length=100, pattern=NAME_PATTERN)


class VaultOut(BaseModel):
    vault_id: uuid.UUID
    name: str
    created_at: datetime


class TokenIn(Strict):
    name: str = Field(min_length=1, max_length=100, pattern=NAME_PATTERN)
    role: Role
    expires_in: int | None = Field(
        default=None,
        ge=1,
        le=10 * 365 * 24 * 3600,
        description="Seconds until the token stops authenticating; absent: it never expires.",
    )


class TokenOut(BaseModel):
    token_id: str
    vault_id: uuid.UUID
    name: str
    role: Role
    created_at: datetime
    expires_at: datetime | None = None
    revoked_at: datetime | None


class TokenCreated(TokenOut):
    token: str = Field(description="The secret token. Shown once: store it now.")


class KeyIn(Strict):
    valid_hours: float | None = Field(
        default=None, gt=0, le=24 * 30, description="Validity; default 120 h (5 days)."
    )


class KeyOut(BaseModel):
    key_id: str
    vault_id: uuid.UUID
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None


class KeyCreated(KeyOut):
    key: str = Field(description="The registration key. Shown once: store it now.")


_CSR_DOC = (
    "A PEM certificate signing request (PKCS#10) for the Kafka client key pair the server made,"
    " with subject CN=<name>. The answer's `kafka_certificate` is then its own Kafka"
    " certificate (principal edge-<producer id>-g<generation>, with ACLs for what its kind"
    " does). Keys: EC P-256/P-384 or RSA 2048-4096."
)


class RegistrationIn(Strict):
    kind: ProducerKind
    name: str = Field(min_length=1, max_length=200, pattern=NAME_PATTERN, description="Server FQDN")
    site: str = Field(min_length=1, max_length=100, pattern=NAME_PATTERN)
    heartbeat_interval_seconds: float | None = Field(default=None, gt=0, le=3600)
    force: bool = Field(default=False, description="Re-register a registered server.")
    metadata: dict[str, Any] = Field(default_factory=dict)
    public_key: str = Field(
        pattern=signing.PUBLIC_KEY_HEX,
        description="The server's Ed25519 public key (32 bytes as 64 hex digits) that verifies"
        " its event signatures. The server makes the key pair and keeps the private key.",
    )

    kafka_csr: str | None = Field(
        default=None, max_length=edge_pki.MAX_CSR_CHARS, description=_CSR_DOC
    )

    @field_validator("public_key")
    @classmethod
    def _loads(cls, value: str) -> str:
        if not signing.is_public_key(value):
            raise ValueError("not an Ed25519 public key")
        return value


class ProducerOut(BaseModel):
    producer_id: uuid.UUID
    vault_id: uuid.UUID
    kind: ProducerKind
    name: str
    site: str
    generation: int
    registered_at: datetime
    heartbeat_seconds: float
    connection_state: ConnectionState
    state_changed_at: datetime
    last_heartbeat_at: datetime | None
    status: dict[str, Any]
    metadata: dict[str, Any]
    kafka_principal: str | None = Field(
        default=None, description="The Kafka principal of its certificate; None: none issued."
    )
    certificate_not_after: datetime | None = None
    revoked_at: datetime | None = None
    revoked_reason: str | None = None


class Registered(ProducerOut):
    credential: str = Field(description="The producer's own credential. Shown once.")
    kafka_certificate: str | None = Field(
        default=None,
        description="With a `kafka_csr`: the server's Kafka client certificate followed by the"
        " edge-issuing CA's (PEM), to present with its private key.",
    )


class RevokeIn(Strict):
    reason: str = Field(min_length=1, max_length=500, description="Why (kept in the audit).")


class Revoked(ProducerOut):
    acls_deleted: int = Field(description="Kafka ACLs of its principal that were deleted.")


def _not_found(what: str) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, f"{what} not found")


async def _vault_or_404(request: Request, vault_id: uuid.UUID) -> dict[str, Any]:
    async with request.app.state.pool.acquire() as conn:
        vault = await repo.get_vault(conn, vault_id)
    if vault is None:
        raise _not_found(f"vault {vault_id}")
    return vault


@router.post("/vaults", status_code=201, response_model=VaultOut, tags=["vaults"])
async def create_vault(body: VaultIn, request: Request, who: CurrentPrincipal) -> Any:
    """Create a vault (the tenant boundary). Needs the bootstrap admin token."""
    if not who.is_global_admin:
        raise HTTPException(403, "creating a vault needs the bootstrap admin token")
    try:
        return await handlers.create_vault(request.app.state.pool, body.name)
    except domain.RegistrationError as exc:
        raise HTTPException(exc.status, exc.message) from None


@router.get("/vaults", response_model=list[VaultOut], tags=["vaults"])
async def list_vaults(request: Request, who: CurrentPrincipal) -> Any:
    async with request.app.state.pool.acquire() as conn:
        return await repo.list_vaults(conn, who.vault_id)


@router.get("/vaults/{vault_id}", response_model=VaultOut, tags=["vaults"])
async def get_vault(vault_id: uuid.UUID, request: Request, who: CurrentPrincipal) -> Any:
    who.check(Role.READER, vault_id)
    return await _vault_or_404(request, vault_id)


@router.post(
    "/vaults/{vault_id}/tokens", status_code=201, response_model=TokenCreated, tags=["tokens"]
)
async def issue_token(
    vault_id: uuid.UUID, body: TokenIn, request: Request, who: CurrentPrincipal
) -> Any:
    """Issue an API token with a role in this vault. The token is shown once."""
    who.check(Role.ADMIN, vault_id)
    await _vault_or_404(request, vault_id)
    return await handlers.issue_token(
        request.app.state.pool, vault_id, body.name, body.role, body.expires_in
    )


@router.get("/vaults/{vault_id}/tokens", response_model=list[TokenOut], tags=["tokens"])
async def list_tokens(vault_id: uuid.UUID, request: Request, who: CurrentPrincipal) -> Any:
    who.check(Role.ADMIN, vault_id)
    async with request.app.state.pool.acquire() as conn:
        return await repo.list_tokens(conn, vault_id)


@router.delete("/vaults/{vault_id}/tokens/{token_id}", response_model=TokenOut, tags=["tokens"])
async def revoke_token(
    vault_id: uuid.UUID, token_id: str, request: Request, who: CurrentPrincipal
) -> Any:
    who.check(Role.ADMIN, vault_id)
    row = await handlers.revoke_token(request.app.state.pool, vault_id, token_id)
    if row is None:
        raise _not_found(f"token {token_id}")
    return row


@router.post(
    "/vaults/{vault_id}/registration-keys",
    status_code=201,
    response_model=KeyCreated,
    tags=["registration keys"],
)
async def create_key(
    vault_id: uuid.UUID, body: KeyIn, request: Request, who: CurrentPrincipal
) -> Any:
    """Generate a registration key for site providers and host agents. Shown once."""
    who.check(Role.ADMIN, vault_id)
    await _vault_or_404(request, vault_id)
    hours = body.valid_hours or request.app.state.settings.key_valid_hours
    return await handlers.create_registration_key(request.app.state.pool, vault_id, hours)


@router.get(
    "/vaults/{vault_id}/registration-keys",
    response_model=list[KeyOut],
    tags=["registration keys"],
)
async def list_keys(vault_id: uuid.UUID, request: Request, who: CurrentPrincipal) -> Any:
    who.check(Role.ADMIN, vault_id)
    async with request.app.state.pool.acquire() as conn:
        return await repo.list_keys(conn, vault_id)


@router.delete(
    "/vaults/{vault_id}/registration-keys/{key_id}",
    response_model=KeyOut,
    tags=["registration keys"],
)
async def revoke_key(
    vault_id: uuid.UUID, key_id: str, request: Request, who: CurrentPrincipal
) -> Any:
    who.check(Role.ADMIN, vault_id)
    row = await handlers.revoke_registration_key(request.app.state.pool, vault_id, key_id)
    if row is None:
        raise _not_found(f"registration key {key_id}")
    return row


ADMIN_HEADER = "X-DR-Admin-Token"


CREDENTIAL_HEADER = "X-DR-Credential"


async def _check_force(request: Request, key: str, body: RegistrationIn) -> None:
    """A forced re-registration cuts the registered producer off: besides the registration
    key it needs an admin token of the key's vault (or the bootstrap admin token) in the
    `X-DR-Admin-Token` header, so a registration-key holder can't take over a producer; or the
    producer's own current credential in `X-DR-Credential` (a server renewing its own identity,
    e.g. its signing key pair, proves it is that server)."""
    credential = request.headers.get(CREDENTIAL_HEADER, "").strip()
    if credential:
        async with request.app.state.pool.acquire() as conn:
            me = await repo.producer_by_credential(conn, signing.hash_secret(credential))
            found = await repo.key_by_hash(conn, signing.hash_secret(key))
            revoked = (
                None
                if me
                else await repo.revoked_by_credential(conn, signing.hash_secret(credential))
            )
        if revoked is not None:
            raise HTTPException(
                403,
                f"{revoked['kind']} {revoked['name']!r} was revoked at "
                f"{revoked['revoked_at'].isoformat()} ({revoked['revoked_reason']}): its"
                " credential re-registers nothing; an admin registers the server anew",
            )
        if (
            me is None
            or found is None
            or (me["vault_id"], me["kind"], me["name"]) != (found[0], body.kind, body.name)
        ):
            raise HTTPException(
                403,
                f"the credential in {CREDENTIAL_HEADER} is not the current credential of "
                f"{body.kind} {body.name!r} in this registration key's vault",
            )
        return
    token = request.headers.get(ADMIN_HEADER, "").strip()
    if not token:
        raise HTTPException(
            403,
            f"a forced re-registration needs an admin token of the vault in the {ADMIN_HEADER} "
            "header (for an edge: set DR_ADMIN_TOKEN for that one run), or the server's own "
            f"current credential in {CREDENTIAL_HEADER}",
        )
    admin = request.app.state.settings.admin_token
    principal = await auth.lookup_token(
        request.app.state.pool, token, admin.get_secret_value() if admin else None
    )
    async with request.app.state.pool.acquire() as conn:
        found = await repo.key_by_hash(conn, signing.hash_secret(key))
    if found is not None:  # an unknown key is refused (401) by the registration itself
        principal.check(Role.ADMIN, found[0])


@router.post("/registrations", status_code=201, response_model=Registered, tags=["producers"])
async def register(body: RegistrationIn, request: Request) -> Any:
    """Register a site provider (VMM server) or host agent.

    Authenticate with the vault's registration key as the bearer token and send the server's
    Ed25519 public key (the server keeps the private key and signs its events with it). Returns
    the producer's own credential, shown once. An already-registered server is refused unless
    `force` is true; re-registering issues a new credential, replaces the public key, and the
    old credential and key stop working; it needs an admin token of the vault in the
    `X-DR-Admin-Token` header, or the server's own current credential in `X-DR-Credential`.
    """
    key = auth.bearer_of(request)
    settings = request.app.state.settings
    certificates = request.app.state.edge_certificates
    csr = None
    if body.kafka_csr is not None:
        if certificates is None:
            raise HTTPException(
                400,
                "this registration service issues no Kafka certificates (no edge CA"
                " configured): register without kafka_csr",
            )
        try:
            csr = edge_pki.check_csr(body.kafka_csr, body.name)
        except edge_pki.CsrRejected as exc:
            raise HTTPException(422, f"kafka_csr: {exc}") from None
    if body.force:
        await _check_force(request, key, body)
    try:
        return await handlers.register_producer(
            request.app.state.pool,
            registration_key=key,
            kind=body.kind,
            name=body.name,
            site=body.site,
            heartbeat_seconds=body.heartbeat_interval_seconds or settings.default_heartbeat_seconds,
            force=body.force,
            metadata=body.metadata,
            public_key=body.public_key,
            csr=csr,
            certificates=certificates,
        )
    except domain.RegistrationError as exc:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        raise HTTPException(exc.status, exc.message, headers=headers) from None


async def _producer_of_credential(request: Request) -> dict[str, Any]:
    """The active producer whose credential is the bearer token; 401 otherwise."""
    credential = auth.bearer_of(request)
    async with request.app.state.pool.acquire() as conn:
        row = await repo.producer_by_credential(conn, signing.hash_secret(credential))
    if row is None:
        raise HTTPException(
            401,
            "invalid credential: it was never issued, was replaced by a re-registration, "
            "or the producer was unregistered or revoked",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return row


@router.get("/self", response_model=ProducerOut, tags=["producers"])
async def whoami(request: Request) -> Any:
    """A producer's own registration, authenticated by its credential."""
    return await _producer_of_credential(request)


class CertificateIn(Strict):
    kafka_csr: str = Field(max_length=edge_pki.MAX_CSR_CHARS, description=_CSR_DOC)


class CertificateOut(BaseModel):
    producer_id: uuid.UUID
    kafka_principal: str
    certificate_not_after: datetime
    kafka_certificate: str = Field(description="The certificate and the edge CA's (PEM).")


@router.post("/self/kafka-certificate", response_model=CertificateOut, tags=["producers"])
async def renew_certificate(body: CertificateIn, request: Request) -> Any:
    """A producer renews its own Kafka client certificate (same principal and ACLs; a new
    key pair's CSR with subject CN=<its name>), authenticated by its credential. No
    registration key is needed."""
    me = await _producer_of_credential(request)
    certificates = request.app.state.edge_certificates
    if certificates is None:
        raise HTTPException(400, "this registration service issues no Kafka certificates")
    try:
        csr = edge_pki.check_csr(body.kafka_csr, me["name"])
    except edge_pki.CsrRejected as exc:
        raise HTTPException(422, f"kafka_csr: {exc}") from None
    try:
        return await handlers.renew_certificate(request.app.state.pool, me, csr, certificates)
    except domain.RegistrationError as exc:
        raise HTTPException(exc.status, exc.message) from None


@router.get("/vaults/{vault_id}/producers", response_model=list[ProducerOut], tags=["producers"])
async def list_producers(
    vault_id: uuid.UUID,
    request: Request,
    who: CurrentPrincipal,
    kind: ProducerKind | None = None,
    state: ConnectionState | None = None,
    site: Annotated[str | None, Query(max_length=100)] = None,
) -> Any:
    """Site providers and host agents of the vault with their connection state."""
    who.check(Role.READER, vault_id)
    async with request.app.state.pool.acquire() as conn:
        return await repo.list_producers(
            conn, vault_id, kind.value if kind else None, state.value if state else None, site
        )


@router.get(
    "/vaults/{vault_id}/producers/{producer_id}", response_model=ProducerOut, tags=["producers"]
)
async def get_producer(
    vault_id: uuid.UUID, producer_id: uuid.UUID, request: Request, who: CurrentPrincipal
) -> Any:
    who.check(Role.READER, vault_id)
    async with request.app.state.pool.acquire() as conn:
        row = await repo.get_producer(conn, producer_id)
    if row is None or row["vault_id"] != vault_id or not row["active"]:
        raise _not_found(f"producer {producer_id}")
    return row


@router.delete(
    "/vaults/{vault_id}/producers/{producer_id}", response_model=ProducerOut, tags=["producers"]
)
async def unregister(
    vault_id: uuid.UUID, producer_id: uuid.UUID, request: Request, who: CurrentPrincipal
) -> Any:
    """Unregister a provider or agent; its credential stops working."""
    who.check(Role.ADMIN, vault_id)
    try:
        row = await handlers.unregister_producer(
            request.app.state.pool, vault_id, producer_id, request.app.state.edge_certificates
        )
    except domain.RegistrationError as exc:
        raise HTTPException(exc.status, exc.message) from None
    if row is None:
        raise _not_found(f"producer {producer_id}")
    return row


@router.post(
    "/vaults/{vault_id}/producers/{producer_id}/revoke",
    response_model=Revoked,
    tags=["producers"],
)
async def revoke(
    vault_id: uuid.UUID,
    producer_id: uuid.UUID,
    body: RevokeIn,
    request: Request,
    who: CurrentPrincipal,
) -> Any:
    """Revoke a provider or agent (e.g. a stolen host). Its Kafka ACLs are deleted (the broker
    refuses its certificate from then on), its public key verifies nothing (its signed events
    go to the DLQ with reason `producer_revoked`), its credential re-registers nothing; a
    `ProducerRevoked` event records who, when and why. Registering the server again needs the
    registration key and, as it stays known by name, an admin (force)."""
    who.check(Role.ADMIN, vault_id)
    try:
        row = await handlers.revoke_producer(
            request.app.state.pool,
            vault_id,
            producer_id,
            body.reason,
            who.token_id,
            request.app.state.edge_certificates,
        )
    except domain.RegistrationError as exc:
        raise HTTPException(exc.status, exc.message) from None
    if row is None:
        raise _not_found(f"producer {producer_id} (not in this vault, or revoked already)")
    return row
