"""Event signature cost on the delta hot path, no stack needed: sign (agent) and verify
(replication service) of a `BlocksShipped` envelope with Ed25519, as the pipeline does it
(signed view without block data + canonical JSON + the signature), median of many rounds, for
a batch as the agent ships random data (64 KiB blocks up to its 512 KiB of data per batch) and
for a batch of `MAX_BLOCKS_PER_BATCH` zero blocks (the most hashes a signature covers).

Lines: `bench <name> <value> <unit>`; `signing_verify_us_per_mib` is the verify cost per MiB of
random changed data shipped (the replication service verifies each record in its store step
and again in the consumer pipeline). Run: `.venv/bin/python -m bench.bench_signing`.
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
from shared.delta_blocks import MAX_BATCH_DATA
from shared.schemas.envelope import new_envelope
from shared.schemas.replication import MAX_BLOCKS_PER_BATCH, Block, BlocksShipped

ROUNDS = 300
BLOCK = 64 * 1024


def batch(count: int, zero: bool) -> BlocksShipped:
    blocks = []
    for i in range(count):
        data = bytes(BLOCK) if zero else os.urandom(BLOCK)
        sha = hashlib.sha256(data).hexdigest()
        if zero:
            blocks.append(Block(index=i, sha256=sha, zero=True))
        else:
            blocks.append(Block(index=i, sha256=sha, data=base64.b64encode(data).decode()))
    return BlocksShipped(item_id=uuid.uuid4(), cycle_seq=1, batch_no=0, disk_id="d0", blocks=blocks)


def median_us(step: Callable[[], object]) -> float:
    times = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def measure(label: str, payload: BlocksShipped) -> float:
    """Prints sign and verify times of one envelope of `payload`; returns the verify time."""
    key = signing.new_private_key()
    public = signing.public_key_hex(key)
    env = new_envelope(payload, vault_id=uuid.uuid4(), producer_id=str(uuid.uuid4()))
    signed = env.signed_with(key)
    assert signed.signature_valid(public)
    sign_us = median_us(lambda: env.signed_with(key))
    verify_us = median_us(lambda: signed.signature_valid(public))
    print(f"bench signing_{label}_blocks {len(payload.blocks)} blocks")
    print(f"bench signing_{label}_sign_us {sign_us:.1f} us")
    print(f"bench signing_{label}_verify_us {verify_us:.1f} us")
    return verify_us


def main() -> None:
    per_batch = MAX_BATCH_DATA // BLOCK
    verify_us = measure("random_batch", batch(per_batch, zero=False))
    measure("zero_batch", batch(MAX_BLOCKS_PER_BATCH, zero=True))
    mib_per_batch = per_batch * BLOCK / 2**20
    print(f"bench signing_verify_us_per_mib {2 * verify_us / mib_per_batch:.1f} us")


if __name__ == "__main__":
    main()
