"""Ed25519 signatures of event envelopes, and the secrets of the platform (tokens, keys).

An edge producer (host agent, site provider) makes its own Ed25519 key pair when it registers;
the private key never leaves the producer's state folder, the registration request carries only
the public key. The platform stores and publishes only public keys: a public key verifies a
signature but cannot make one, so reading `registration.events.v1` or any service's schema
gives no power to sign as a producer. A forced re-registration replaces the key pair.

Wire formats: a public key is its 32 raw bytes as 64 lowercase hex digits (RFC 8032); a
signature is 64 bytes, 128 hex digits, over the canonical JSON (keys sorted, separators "," and
":", UTF-8 without ASCII escaping) of every envelope field but the signature itself.

Verification is on the delta hot path (every `BlocksShipped` record): a loaded public key is
kept (an LRU of `PUBLIC_KEY_CACHE` keys), so a verify is one Ed25519 check (~50-100 us).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import secrets
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

PUBLIC_KEY_HEX = r"^[0-9a-f]{64}$"
PRIVATE_KEY_HEX = PUBLIC_KEY_HEX  # the 32-byte seed
SIGNATURE_HEX = r"^[0-9a-f]{128}$"
PUBLIC_KEY_CACHE = 4096

_RAW = serialization.Encoding.Raw


def canonical_json(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def new_secret(prefix: str) -> str:
    """A fresh random secret (256 bits) with a readable prefix, e.g. `drc_...`."""
    return f"{prefix}_{secrets.token_urlsafe(32)}"


def hash_secret(secret: str) -> str:
    """The stored form of a secret: SHA-256 hex (secrets are 256-bit random, so no KDF needed)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def constant_time_equals(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


# ------------------------------------------------------------------ Ed25519 event signatures


def new_private_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def private_key_hex(key: Ed25519PrivateKey) -> str:
    """The private key's 32-byte seed as hex: what the edge keeps in its identity file."""
    raw = key.private_bytes(_RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    return raw.hex()


def load_private_key(text: str) -> Ed25519PrivateKey:
    """The private key from its hex seed; ValueError if it is not 32 bytes of hex."""
    raw = bytes.fromhex(text)
    if len(raw) != 32:
        raise ValueError("an Ed25519 private key is 32 bytes (64 hex digits)")
    return Ed25519PrivateKey.from_private_bytes(raw)


def public_key_hex(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw).hex()


@functools.lru_cache(maxsize=PUBLIC_KEY_CACHE)
def _public_key(text: str) -> Ed25519PublicKey | None:
    try:
        raw = bytes.fromhex(text)
        return Ed25519PublicKey.from_public_bytes(raw) if len(raw) == 32 else None
    except ValueError:
        return None


def is_public_key(text: str) -> bool:
    """True for 64 hex digits that load as an Ed25519 public key."""
    return len(text) == 64 and _public_key(text) is not None


def sign(fields: dict[str, Any], key: Ed25519PrivateKey) -> str:
    return key.sign(canonical_json(fields)).hex()


def verify(fields: dict[str, Any], signature: str, public_key: str) -> bool:
    """True when `signature` (hex) is `public_key`'s signature of `fields`."""
    loaded = _public_key(public_key)
    if loaded is None:
        return False
    try:
        loaded.verify(bytes.fromhex(signature), canonical_json(fields))
    except (InvalidSignature, ValueError):
        return False
    return True
