from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from shared import signing
from shared.kafka.decode import Rejected, decode_event
from shared.schemas.envelope import Envelope, new_envelope
from shared.schemas.registration import Heartbeat, ProducerKind, VaultCreated

VAULT = uuid.uuid4()
CREDENTIAL = signing.new_secret("drc")
KEY = signing.new_private_key()
PUBLIC = signing.public_key_hex(KEY)
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
    assert env.signature is not None and len(env.signature) == 128
    assert env.signature_valid(PUBLIC)
    decoded, payload = decode_event(env.to_bytes(), MAX_AGE)
    assert decoded == env
    assert isinstance(payload, Heartbeat)
    assert decoded.signature_valid(PUBLIC)


def test_signature_fails_with_another_key_or_tampering() -> None:
    env = heartbeat()
    assert not env.signature_valid(signing.public_key_hex(signing.new_private_key()))
    tampered = env.model_copy(update={"payload": {**env.payload, "sequence": 2}})
    assert not tampered.signature_valid(PUBLIC)
    other_vault = env.model_copy(update={"vault_id": uuid.uuid4()})
    assert not other_vault.signature_valid(PUBLIC)
    other_producer = env.model_copy(update={"producer_id": str(uuid.uuid4())})
    assert not other_producer.signature_valid(PUBLIC)
    assert env.signature is not None
    flipped = env.signature[:-1] + ("0" if env.signature[-1] != "0" else "1")
    assert not env.model_copy(update={"signature": flipped}).signature_valid(PUBLIC)


def test_the_public_key_cannot_sign() -> None:
    """What services store and registration publishes is useless for signing: used as a
    private key it makes signatures that its own public key refuses."""
    env = heartbeat(signature=None)
    as_private = signing.load_private_key(PUBLIC)
    forged = env.signed_with(as_private)
    assert not forged.signature_valid(PUBLIC)
    assert signing.public_key_hex(as_private) != PUBLIC
    assert not hasattr(KEY.public_key(), "sign")


def test_private_key_round_trips_as_hex_and_bad_keys_fail_cleanly() -> None:
    text = signing.private_key_hex(KEY)
    assert signing.public_key_hex(signing.load_private_key(text)) == PUBLIC
    with pytest.raises(ValueError):
        signing.load_private_key("ab" * 31)
    env = heartbeat()
    for bad in ("", "zz" * 32, "ab" * 31, PUBLIC + "00"):
        assert not env.signature_valid(bad)
    assert signing.is_public_key(PUBLIC) and not signing.is_public_key("ab" * 31)


def test_an_hmac_signature_is_refused_with_a_clear_reason() -> None:
    import hashlib
    import hmac

    env = heartbeat(signature=None)
    fields = env.model_dump(mode="json", exclude={"signature"})
    legacy = hmac.new(b"k" * 32, signing.canonical_json(fields), hashlib.sha256).hexdigest()
    record = {**json.loads(env.to_bytes()), "signature": legacy}
    with pytest.raises(Rejected) as exc:
        decode_event(json.dumps(record).encode(), MAX_AGE)
    assert exc.value.reason == "invalid_envelope"
    assert "HMAC" in str(exc.value) and "Ed25519" in str(exc.value)


def test_secrets_are_stored_as_hashes_only() -> None:
    assert signing.hash_secret(CREDENTIAL) != CREDENTIAL
    assert len(signing.hash_secret(CREDENTIAL)) == 64


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


# ------------------------------------------------------------- signed view of BlocksShipped


def _shipped(blocks: list[bytes], compression: str = "none") -> Envelope:
    import base64
    import hashlib

    from shared.schemas.replication import Block, BlocksShipped, Compression

    payload = BlocksShipped(
        item_id=uuid.uuid4(),
        cycle_seq=3,
        batch_no=0,
        disk_id="disk0",
        compression=Compression(compression),
        blocks=[
            Block(index=i, sha256=hashlib.sha256(b).hexdigest(), data=base64.b64encode(b).decode())
            for i, b in enumerate(blocks)
        ],
    )
    return new_envelope(payload, vault_id=VAULT, producer_id=str(uuid.uuid4()), signing_key=KEY)


def _with_block(env: Envelope, n: int, **changes: object) -> Envelope:
    blocks = [dict(b) for b in env.payload["blocks"]]
    blocks[n].update(changes)
    return env.model_copy(update={"payload": {**env.payload, "blocks": blocks}})


def test_blocks_signature_covers_hashes_not_data() -> None:
    import base64

    env = _shipped([b"a" * 4096, b"b" * 4096])
    assert env.signature_valid(PUBLIC)
    decoded, _ = decode_event(env.to_bytes(), MAX_AGE)
    assert decoded.signature_valid(PUBLIC)
    # the signed JSON has no block data in it (cheap to sign and verify)
    assert all("data" not in b for b in env.signed_fields()["payload"]["blocks"])
    assert "data" in env.model_dump(mode="json")["payload"]["blocks"][0]
    # altered bytes keep the signature valid: the replica's hash check refuses them
    forged = _with_block(env, 0, data=base64.b64encode(b"x" * 4096).decode())
    assert forged.signature_valid(PUBLIC)


@pytest.mark.parametrize(
    "changes",
    [
        {"sha256": "0" * 64},
        {"index": 7},
        {"compressed": False},
        {"zero": True, "data": None},
    ],
)
def test_blocks_signature_fails_when_a_hash_index_or_flag_changes(
    changes: dict[str, object],
) -> None:
    env = _shipped([b"a" * 4096, b"b" * 4096])
    assert not _with_block(env, 1, **changes).signature_valid(PUBLIC)


def test_blocks_signature_fails_when_a_batch_field_changes() -> None:
    env = _shipped([b"a" * 4096])
    for field, value in (("batch_no", 1), ("cycle_seq", 4), ("compression", "zlib")):
        tampered = env.model_copy(update={"payload": {**env.payload, field: value}})
        assert not tampered.signature_valid(PUBLIC)
    dropped = env.model_copy(update={"payload": {**env.payload, "blocks": []}})
    assert not dropped.signature_valid(PUBLIC)


def test_tampered_block_data_fails_the_replica_hash_check(tmp_path: object) -> None:
    """A block whose bytes were altered (signature still valid) is refused by the hash check
    the replication service runs before storing: the `block_hash_mismatch` path."""
    import base64
    from pathlib import Path

    from services.replication.delta_prepare import block_bytes
    from services.replication.store import BlockHashMismatch, ReplicaStore
    from shared.schemas.replication import BlocksShipped

    env = _shipped([b"a" * 4096])
    forged = _with_block(env, 0, data=base64.b64encode(b"x" * 4096).decode())
    decoded, payload = decode_event(forged.to_bytes(), MAX_AGE)
    assert decoded.signature_valid(PUBLIC)
    assert isinstance(payload, BlocksShipped)
    block = payload.blocks[0]
    data = block_bytes(block, {"size_bytes": 4096, "block_size": 4096}, payload.compression)
    assert data == b"x" * 4096
    store = ReplicaStore(Path(str(tmp_path)))
    with pytest.raises(BlockHashMismatch):
        store.put_blocks("item-1", [(block.index, block.sha256, data)])
    store.close()


def test_the_identity_file_is_owner_only_and_a_legacy_one_is_named(tmp_path: Path) -> None:
    from shared.edge_identity import (
        Identity,
        LegacyIdentity,
        identity_path,
        load_identity,
        save_identity,
    )

    identity = Identity(
        producer_id=uuid.uuid4(),
        vault_id=VAULT,
        kind=ProducerKind.AGENT,
        name="hv-1",
        site="primary",
        generation=1,
        credential=CREDENTIAL,
        private_key=signing.private_key_hex(KEY),
    )
    left_over = identity_path(tmp_path).with_suffix(".tmp")
    left_over.write_text("")
    left_over.chmod(0o644)  # a temporary file a crash left behind keeps its mode on open
    save_identity(tmp_path, identity)
    assert identity_path(tmp_path).stat().st_mode & 0o777 == 0o600
    loaded = load_identity(tmp_path)
    assert loaded == identity and loaded.public_key == PUBLIC
    assert signing.private_key_hex(KEY) not in repr(loaded)

    legacy = identity.model_dump(mode="json", exclude={"private_key"})
    identity_path(tmp_path).write_text(json.dumps(legacy))
    with pytest.raises(LegacyIdentity, match="before Ed25519 event signatures"):
        load_identity(tmp_path)
