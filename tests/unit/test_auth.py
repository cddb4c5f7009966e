from __future__ import annotations

import uuid

import pytest
from fastapi import HTTPException

from shared.auth import Principal
from shared.schemas.registration import Role

VAULT = uuid.uuid4()
OTHER = uuid.uuid4()


@pytest.mark.parametrize(
    ("role", "needed", "allowed"),
    [
        (Role.READER, Role.READER, True),
        (Role.READER, Role.OPERATOR, False),
        (Role.OPERATOR, Role.OPERATOR, True),
        (Role.OPERATOR, Role.ADMIN, False),
        (Role.ADMIN, Role.ADMIN, True),
    ],
)
def test_roles_are_ordered(role: Role, needed: Role, allowed: bool) -> None:
    who = Principal("t", role, VAULT)
    assert who.allows(needed, VAULT) is allowed
    if not allowed:
        with pytest.raises(HTTPException) as exc:
            who.check(needed, VAULT)
        assert exc.value.status_code == 403
        assert needed.value in str(exc.value.detail)


def test_a_vault_token_cannot_touch_another_vault() -> None:
    who = Principal("t", Role.ADMIN, VAULT)
    assert not who.allows(Role.READER, OTHER)
    with pytest.raises(HTTPException, match="another vault"):
        who.check(Role.READER, OTHER)


def test_bootstrap_admin_is_global() -> None:
    who = Principal("bootstrap-admin", Role.ADMIN, None)
    assert who.is_global_admin
    assert who.allows(Role.ADMIN, OTHER)
