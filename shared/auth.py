"""Bearer-token authentication and vault-scoped roles for every HTTP route.

Tokens are issued by the registration service and stored only as SHA-256 hashes; every service
keeps a read model of them (`known_tokens`, fed by `registration.events.v1`). A bootstrap admin
token from the environment (`DR_ADMIN_TOKEN`) is a global admin, for creating the first vault.
Roles: reader < operator < admin. A reader can't change anything; an operator runs operations
(failovers, replication actions) but can't change configuration; an admin can do everything
in its vault.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Annotated

import asyncpg
from fastapi import Depends, HTTPException, Request, status

from shared import signing
from shared.readmodels import known_token
from shared.schemas.registration import Role

ROLE_RANK = {Role.READER: 1, Role.OPERATOR: 2, Role.ADMIN: 3}


@dataclass(frozen=True)
class Principal:
    token_id: str
    role: Role
    vault_id: uuid.UUID | None  # None: the bootstrap admin, global

    @property
    def is_global_admin(self) -> bool:
        return self.vault_id is None and self.role is Role.ADMIN

    def allows(self, role: Role, vault_id: uuid.UUID | None) -> bool:
        if ROLE_RANK[self.role] < ROLE_RANK[role]:
            return False
        return self.vault_id is None or (vault_id is not None and vault_id == self.vault_id)

    def check(self, role: Role, vault_id: uuid.UUID | None) -> None:
        """Raise 403 unless this principal has at least `role` in `vault_id`."""
        if ROLE_RANK[self.role] < ROLE_RANK[role]:
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                f"this token's role is {self.role.value}; the operation needs {role.value}",
            )
        if self.vault_id is not None and vault_id != self.vault_id:
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                "this token belongs to another vault; use a token issued for this vault",
            )


def bearer_of(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing bearer token: send 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return token.strip()


def metrics_access(request: Request) -> None:
    """Dependency of `/metrics`: with `DR_METRICS_TOKEN` set, only a request bearing it
    (compared in constant time) reads the metrics, 401 otherwise; unset or empty: open."""
    expected = request.app.state.settings.metrics_token
    secret = expected.get_secret_value() if expected is not None else ""
    if not secret:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and signing.constant_time_equals(token.strip(), secret):
        return
    sent = "the token sent is not the metrics token; " if token.strip() else ""
    raise HTTPException(
        status.HTTP_401_UNAUTHORIZED,
        f"{sent}/metrics needs the metrics token: send 'Authorization: Bearer <DR_METRICS_TOKEN>'",
        headers={"WWW-Authenticate": 'Bearer realm="metrics"'},
    )


async def lookup_token(pool: asyncpg.Pool, token: str, admin_token: str | None) -> Principal:
    if admin_token and signing.constant_time_equals(token, admin_token):
        return Principal(token_id="bootstrap-admin", role=Role.ADMIN, vault_id=None)
    row = await known_token(pool, signing.hash_secret(token))
    if row is not None and row["expired"]:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "this token has expired: ask an admin of the vault for a new one",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if row is None or row["revoked"]:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "invalid or revoked token",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return Principal(token_id=row["token_id"], role=Role(row["role"]), vault_id=row["vault_id"])


async def authenticate(request: Request) -> Principal:
    token = bearer_of(request)
    admin = request.app.state.settings.admin_token
    return await lookup_token(
        request.app.state.pool, token, admin.get_secret_value() if admin else None
    )


CurrentPrincipal = Annotated[Principal, Depends(authenticate)]
