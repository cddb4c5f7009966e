"""Event signature cost on the delta hot path, no stack needed: sign (agent) and verify
(replication service) of a `BlocksShipped` envelope of a full batch (`MAX_BLOCKS_PER_BATCH`
random 64 KiB blocks, signed over its view without block data) with Ed25519, as the pipeline
does it (signed view + canonical JSON + the signature), median of many rounds.

Lines: `bench <name> <value> <unit>`; `signing_*_share_of_batch_pct` puts a verify beside the
time a batch takes on the wire at 100 MB/s. Run: `.venv/bin/python -m bench.bench_signing`.
"""

from __future__ import annotations

import base64
import hashlib
import os
import statistics
import time
import uuid
from collections.abc import Callable

from shared import signing
from shared.schemas.envelope import Envelope, new_envelope
from shared.schemas.replication import MAX_BLOCKS_PER_BATCH, Block, BlocksShipped

ROUNDS = 300
BLOCK = 64 * 1024


def batch() -> BlocksShipped:
    blocks = []
    for i in range(MAX_BLOCKS_PER_BATCH):
        data = os.urandom(BLOCK)
        sha = hashlib.sha256(data).hexdigest()
        blocks.append(Block(index=i, sha256=sha, data=base64.b64encode(data).decode()))
    return BlocksShipped(item_id=uuid.uuid4(), cycle_seq=1, batch_no=0, disk_id="d0", blocks=blocks)


def median_us(step: Callable[[], object]) -> float:
    times = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def main() -> None:
    key = signing.new_private_key()
    public = signing.public_key_hex(key)
    payload = batch()
    env = new_envelope(payload, vault_id=uuid.uuid4(), producer_id=str(uuid.uuid4()))
    signed = env.signed_with(key)
    assert signed.signature_valid(public)
    fields = signed.signed_fields()
    assert signed.signature is not None
    signature = signed.signature
    view_us = median_us(signed.signed_fields)
    sign_us = median_us(lambda: env.signed_with(key))
    verify_us = median_us(lambda: signed.signature_valid(public))
    raw_verify_us = median_us(lambda: signing.verify(fields, signature, public))
    wire_us = len(Envelope.to_bytes(signed)) / 100e6 * 1e6
    print(f"bench signing_blocks_per_batch {len(payload.blocks)} blocks")
    print(f"bench signing_signed_view_us {view_us:.1f} us")
    print(f"bench signing_sign_batch_us {sign_us:.1f} us")
    print(f"bench signing_verify_batch_us {verify_us:.1f} us")
    print(f"bench signing_ed25519_verify_us {raw_verify_us:.1f} us")
    print(f"bench signing_verify_share_of_batch_pct {100 * verify_us / wire_us:.2f} %")


if __name__ == "__main__":
    main()
