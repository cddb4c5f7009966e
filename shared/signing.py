"""HMAC-SHA256 signatures of event envelopes with a producer's own credential.

A producer (host agent, site provider) receives a credential once at registration. It signs
with a key derived from that credential; the platform stores the credential only as a hash and
keeps the derived verification key, which cannot be turned back into the credential nor used to
register or authenticate. The signature covers the canonical JSON of every envelope field but
the signature itself.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from typing import Any

_SIGNING_CONTEXT = b"dr-event-signing-v1"


def canonical_json(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def new_secret(prefix: str) -> str:
    """A fresh random secret (256 bits) with a readable prefix, e.g. `drc_...`."""
    return f"{prefix}_{secrets.token_urlsafe(32)}"


def hash_secret(secret: str) -> str:
    """The stored form of a secret: SHA-256 hex (secrets are 256-bit random, so no KDF needed)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def derive_signing_key(credential: str) -> str:
    """The key a producer signs with, derived from its credential (hex)."""
    return hmac.new(credential.encode(), _SIGNING_CONTEXT, hashlib.sha256).hexdigest()


def sign(fields: dict[str, Any], signing_key: str) -> str:
    return hmac.new(bytes.fromhex(signing_key), canonical_json(fields), hashlib.sha256).hexdigest()


def verify(fields: dict[str, Any], signature: str, signing_key: str) -> bool:
    return hmac.compare_digest(sign(fields, signing_key), signature)


def constant_time_equals(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())
