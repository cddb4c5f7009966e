"""Print a signed event envelope (one JSON line), ready for `kcat -P`: what an upstream system
does to publish to the platform. See docs/publishing-events.md.

    python -m scripts.sign_event --identity state/identity.json \\
        --type Heartbeat --payload heartbeat.json \\
      | kcat -P -b 127.0.0.1:19092 $PUBLISHER -t registration.heartbeats.v1 -k PRODUCER_ID

($PUBLISHER: kcat's `-X` options for the publisher's own client certificate, printed by
`python -m scripts.publisher_register`, see docs/publishing-events.md.)

    python -m scripts.sign_event --new-key          # a key pair: private (keep it), public

The signing key is the producer's Ed25519 private key: read from an edge process's identity
file (`--identity`, which also gives vault and producer id), or given as 64 hex digits with
`--private-key-file` (a file holding the hex seed, kept 0600). Its public key is the one sent
as `public_key` to `POST /v1/registrations`. The payload is checked with the event's model first
(`--no-validate` skips that, to craft a bad event on purpose).

Signing rule (shared/signing.py): signature = hex(Ed25519-sign(private key, canonical JSON of
the envelope without `signature`)), canonical JSON = keys sorted, separators "," and ":", UTF-8
without ASCII escaping; for `BlocksShipped` the payload's blocks are signed without `data`.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import shared.schemas  # noqa: F401 - registers every event type
from shared import signing
from shared.schemas.envelope import Envelope
from shared.schemas.registry import payload_model


def signed_envelope(
    *,
    private_key: Ed25519PrivateKey,
    vault_id: uuid.UUID,
    producer_id: str,
    type_name: str,
    payload: dict[str, Any],
    version: int = 1,
    occurred_at: datetime | None = None,
    event_id: uuid.UUID | None = None,
    validate: bool = True,
) -> Envelope:
    if validate:
        et = payload_model(type_name, version)
        if et is None:
            raise ValueError(f"{type_name} v{version} is not a known event type")
        payload = et.model.model_validate(payload).model_dump(mode="json")
    envelope = Envelope(
        event_id=event_id or uuid.uuid4(),
        type=type_name,
        schema_version=version,
        occurred_at=occurred_at or datetime.now(UTC),
        vault_id=vault_id,
        producer_id=producer_id,
        payload=payload,
    )
    return envelope.signed_with(private_key)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.sign_event",
        description="Print a signed event envelope as one JSON line (for kcat -P).",
    )
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument(
        "--identity",
        type=Path,
        help="an edge process's identity.json (private key, vault and producer id)",
    )
    who.add_argument(
        "--private-key-file", type=Path, help="a file with the Ed25519 private key (64 hex digits)"
    )
    who.add_argument(
        "--new-key",
        action="store_true",
        help="print a new key pair as JSON (private_key, public_key) and exit",
    )
    parser.add_argument("--vault", type=uuid.UUID, help="vault id (from --identity if given)")
    parser.add_argument("--producer", help="producer id (from --identity if given)")
    parser.add_argument("--type", dest="type_name", help="event type, e.g. Heartbeat")
    parser.add_argument("--version", type=int, default=1, help="schema version (default 1)")
    parser.add_argument("--payload", help="payload JSON file, or - for standard input")
    parser.add_argument("--occurred-at", help="ISO 8601 time (default: now)")
    parser.add_argument(
        "--no-validate", action="store_true", help="do not check the payload with its model"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.new_key:
        key = signing.new_private_key()
        pair = {
            "private_key": signing.private_key_hex(key),
            "public_key": signing.public_key_hex(key),
        }
        print(json.dumps(pair))
        return 0
    if not args.type_name or not args.payload:
        parser.error("--type and --payload are needed")
    vault, producer = args.vault, args.producer
    try:
        if args.identity:
            identity = json.loads(args.identity.read_text())
            if "private_key" not in identity:
                raise ValueError(
                    f"{args.identity} has no private key (saved before Ed25519 signatures):"
                    " restart the edge process with its registration key to re-register it"
                )
            key_text = identity["private_key"]
            vault = vault or uuid.UUID(identity["vault_id"])
            producer = producer or identity["producer_id"]
        else:
            key_text = args.private_key_file.read_text().strip()
        private_key = signing.load_private_key(key_text)
    except (OSError, ValueError, KeyError) as exc:
        print(f"sign_event: {exc}", file=sys.stderr)
        return 1
    if vault is None or not producer:
        parser.error("--vault and --producer are needed (or --identity)")
    text = sys.stdin.read() if args.payload == "-" else Path(args.payload).read_text()
    try:
        payload = json.loads(text)
        envelope = signed_envelope(
            private_key=private_key,
            vault_id=vault,
            producer_id=producer,
            type_name=args.type_name,
            payload=payload,
            version=args.version,
            occurred_at=datetime.fromisoformat(args.occurred_at) if args.occurred_at else None,
            validate=not args.no_validate,
        )
    except (ValueError, json.JSONDecodeError) as exc:
        print(f"sign_event: {exc}", file=sys.stderr)
        return 1
    print(envelope.model_dump_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
