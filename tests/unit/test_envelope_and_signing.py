from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from shared import signing
from shared.kafka import Rejected, decode_event
from shared.schemas.envelope import Envelope, new_envelope
from shared.schemas.registration import Heartbeat, ProducerKind, VaultCreated

VAULT = uuid.uuid4()
CREDENTIAL = signing.new_secret("drc")
KEY = signing.derive_signing_key(CREDENTIAL)
MAX_AGE = timedelta(minutes=10)


def heartbeat(**overrides: object) -> Envelope:
    env = new_envelope(
        Heartbeat(kind=ProducerKind.AGENT, sequence=1, interval_seconds=5),
        vault_id=VAULT,
        producer_id=str(uuid.uuid4()),
        signing_key=KEY,
    )
    return env.model_copy(update=overrides) if overrides else env


def test_signature_round_trip() -> None:
    env = heartbeat()
    assert env.signature_valid(KEY)
    decoded, payload = decode_event(env.to_bytes(), MAX_AGE)
    assert decoded == env
    assert isinstance(payload, Heartbeat)
    assert decoded.signature_valid(KEY)


def test_signature_fails_with_another_credential_or_tampering() -> None:
    env = heartbeat()
    assert not env.signature_valid(signing.derive_signing_key(signing.new_secret("drc")))
    tampered = env.model_copy(update={"payload": {**env.payload, "sequence": 2}})
    assert not tampered.signature_valid(KEY)
    other_vault = env.model_copy(update={"vault_id": uuid.uuid4()})
    assert not other_vault.signature_valid(KEY)


def test_secrets_are_stored_as_hashes_only() -> None:
    assert signing.hash_secret(CREDENTIAL) != CREDENTIAL
    assert len(signing.hash_secret(CREDENTIAL)) == 64
    assert signing.derive_signing_key(CREDENTIAL) != signing.hash_secret(CREDENTIAL)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, "empty_record"),
        (b"{not json", "malformed_json"),
        (b"\xff\xfe", "malformed_json"),
        (b"[]", "invalid_envelope"),
        (json.dumps({"type": "Heartbeat"}).encode(), "invalid_envelope"),
        (b"x" * 1_000_001, "oversize_record"),
    ],
)
def test_malformed_records_are_rejected_with_a_reason(value: bytes | None, reason: str) -> None:
    with pytest.raises(Rejected) as exc:
        decode_event(value, MAX_AGE)
    assert exc.value.reason == reason


def test_unknown_type_unknown_field_and_bad_payload_are_rejected() -> None:
    raw = json.loads(heartbeat().to_bytes())
    for mutate, reason in (
        (lambda r: r.update(type="NoSuchEvent"), "unknown_event_type"),
        (lambda r: r.update(extra_field=1), "invalid_envelope"),
        (lambda r: r["payload"].update(sequence=-1), "invalid_payload"),
        (lambda r: r["payload"].update(surprise=True), "invalid_payload"),
    ):
        record = json.loads(json.dumps(raw))
        mutate(record)
        with pytest.raises(Rejected) as exc:
            decode_event(json.dumps(record).encode(), MAX_AGE)
        assert exc.value.reason == reason, exc.value


def test_stale_and_future_signed_events_are_rejected() -> None:
    old = heartbeat(occurred_at=datetime.now(UTC) - timedelta(hours=1))
    with pytest.raises(Rejected, match="stale_event"):
        decode_event(old.to_bytes(), MAX_AGE)
    future = heartbeat(occurred_at=datetime.now(UTC) + timedelta(hours=1))
    with pytest.raises(Rejected, match="future_event"):
        decode_event(future.to_bytes(), MAX_AGE)


def test_service_events_are_not_age_checked() -> None:
    env = new_envelope(
        VaultCreated(vault_id=VAULT, name="v"),
        vault_id=VAULT,
        producer_id="service:registration",
        occurred_at=datetime.now(UTC) - timedelta(days=3),
    )
    decoded, payload = decode_event(env.to_bytes(), MAX_AGE)
    assert isinstance(payload, VaultCreated)
    assert decoded.signature is None
