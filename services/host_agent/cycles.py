"""One delta cycle on the wire: how blocks are encoded and batched, and where the signed
envelopes go (Kafka, or a file for offline initial replication).

A cycle is `CycleStarted`, then `BlocksShipped` batches (per disk, in block order, numbered
0.. across the cycle), then `CycleCompleted` with the batch and block counts and every disk's
Merkle root after the cycle. A batch holds at most 64 blocks and at most `MAX_BATCH_DATA`
bytes of encoded block data (so base64 + JSON stays far below Kafka's 1 MiB record limit even
when every block is incompressible). Each block carries the SHA-256 of its uncompressed bytes;
all-zero blocks go as `zero=true` without data; with compression `zlib` each block's bytes are
zlib-compressed before base64, except blocks that would not shrink (a cheap probe, then the
result checked): those go raw with `compressed=false`.

Offline export (initial replication `offline`): the initial cycle's signed envelopes, exactly
as they would be published on `replication.deltas.v1`, one JSON envelope per line in order
(`CycleStarted`, every `BlocksShipped`, `CycleCompleted`) in
`<export_path>/<item_id>/cycle-<seq>.jsonl`. The file is written as `.jsonl.tmp`, fsynced and
renamed, so a file under its final name is always complete. The importer verifies the
signatures and hashes as for Kafka records; later delta cycles come over Kafka from `seq + 1`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import pybase64
from aiokafka.errors import KafkaError

from shared import topics
from shared.edge_identity import Identity
from shared.files import replace_synced
from shared.kafka.producer import KafkaProducer
from shared.merkle import block_hash, zero_block_hash
from shared.schemas.envelope import Envelope, EventPayload, new_envelope
from shared.schemas.replication import MAX_BLOCKS_PER_BATCH, Block, BlocksShipped, Compression

log = logging.getLogger(__name__)

MAX_BATCH_DATA = 512 * 1024
RETRY_MAX_SECONDS = 30.0
SEND_WINDOW = 16  # BlocksShipped batches in flight (unacknowledged) at once
REFRESH_ENVELOPE_AFTER = timedelta(seconds=60)


@dataclass(frozen=True)
class EncodedBlock:
    block: Block
    digest: bytes
    raw_len: int
    wire_len: int  # encoded bytes before base64


_ZEROS: dict[int, bytes] = {}
PROBE_BYTES = 2048  # two samples of this size decide whether a block is worth compressing
# A first, cheaper look (~12 us against ~130 us for zlib's set-up on a sample): random,
# encrypted or already-compressed data uses nearly every byte value even in a small sample
# (1 KiB of random bytes: ~251 distinct values), text and most structured data far fewer.
ENTROPY_SAMPLE = 512
HIGH_ENTROPY_DISTINCT = 240
COMPRESS_MIN_GAIN = 0.95  # compressed data must be below 95 % of the raw size to be sent


def _is_zero(data: bytes) -> bool:
    zeros = _ZEROS.get(len(data))
    if zeros is None:
        zeros = _ZEROS.setdefault(len(data), bytes(len(data)))
    return data == zeros  # a memcmp, far cheaper than hashing


def _worth_compressing(data: bytes) -> bool:
    """A cheap probe: a block whose samples use nearly every byte value is taken as
    incompressible at once; otherwise zlib over two small samples (start and middle of the
    block) decides. Random or already compressed data is sent raw without paying for zlib."""
    if len(data) <= 2 * PROBE_BYTES:
        return True
    mid = len(data) // 2
    glance = data[:ENTROPY_SAMPLE] + data[mid : mid + ENTROPY_SAMPLE]
    if len(set(glance)) >= HIGH_ENTROPY_DISTINCT:
        return False
    sample = data[:PROBE_BYTES] + data[mid : mid + PROBE_BYTES]
    return len(zlib.compress(sample, 1)) < COMPRESS_MIN_GAIN * len(sample)


def encode_block(index: int, data: bytes, compression: Compression) -> EncodedBlock:
    if _is_zero(data):
        digest = zero_block_hash(len(data))
        return EncodedBlock(
            Block(index=index, sha256=digest.hex(), zero=True), digest, len(data), 0
        )
    digest = block_hash(data)
    body, flag = data, None
    if compression is Compression.ZLIB:
        packed = zlib.compress(data, 1) if _worth_compressing(data) else None
        if packed is not None and len(packed) < COMPRESS_MIN_GAIN * len(data):
            body = packed
        else:
            flag = False  # incompressible: raw, flagged so the replica does not inflate it
    block = Block(
        index=index, sha256=digest.hex(), data=pybase64.b64encode(body).decode(), compressed=flag
    )
    return EncodedBlock(block, digest, len(data), len(body))


@dataclass
class Batcher:
    """Groups one disk's encoded blocks into `BlocksShipped` payloads within the limits."""

    item_id: uuid.UUID
    cycle_seq: int
    compression: Compression
    batch_no: int = 0
    blocks: int = 0
    _disk: str = ""
    _open: list[EncodedBlock] = field(default_factory=list)

    def add(self, disk_id: str, block: EncodedBlock) -> BlocksShipped | None:
        """Add a block; returns a full batch to send first, if adding it overflowed one."""
        out = None
        size = sum(b.wire_len for b in self._open)
        if self._open and (
            disk_id != self._disk
            or len(self._open) >= MAX_BLOCKS_PER_BATCH
            or size + block.wire_len > MAX_BATCH_DATA
        ):
            out = self.flush()
        self._disk = disk_id
        self._open.append(block)
        return out

    def flush(self) -> BlocksShipped | None:
        if not self._open:
            return None
        batch = BlocksShipped(
            item_id=self.item_id,
            cycle_seq=self.cycle_seq,
            batch_no=self.batch_no,
            disk_id=self._disk,
            compression=self.compression,
            blocks=[b.block for b in self._open],
        )
        self.batch_no += 1
        self.blocks += len(self._open)
        self._open = []
        return batch


class CycleSink(Protocol):
    """Where a cycle's messages go, in order."""

    async def emit(self, payload: EventPayload) -> int:
        """Send one message; returns its size in bytes."""
        ...

    async def close(self) -> None: ...


Signer = Callable[[EventPayload], Envelope]
SinkFactory = Callable[[uuid.UUID, int], CycleSink]


def signer_for(identity: Identity) -> Signer:
    """Envelopes signed with the agent's private key, as `SignedPublisher` makes them."""
    key = identity.signing_key

    def sign(payload: EventPayload) -> Envelope:
        return new_envelope(
            payload,
            vault_id=identity.vault_id,
            producer_id=str(identity.producer_id),
            signing_key=key,
        )

    return sign


class KafkaSink:
    """Publishes to `replication.deltas.v1`, keyed by item id. A failed send is retried with
    backoff (same envelope, so a consumer de-duplicates a send whose ack was lost) until it is
    out: a cycle, once begun, is never left half-sent by a broker outage.

    `BlocksShipped` batches are pipelined: up to `SEND_WINDOW` of them are in flight (the
    idempotent producer keeps their order); every other message (`CycleStarted`,
    `CycleCompleted`) is sent only once everything before it is acknowledged, and is itself
    awaited. A batch whose send failed is sent again (possibly after later batches of the same
    cycle: the replica stages batches by number, in any order), so `CycleCompleted` always
    follows every batch of its cycle and `CycleStarted` precedes them."""

    def __init__(self, producer: KafkaProducer, sign: Signer, item_id: uuid.UUID) -> None:
        self.producer = producer
        self.sign = sign
        self.key = str(item_id)
        self._inflight: deque[tuple[asyncio.Future[Any], EventPayload, Envelope]] = deque()

    async def emit(self, payload: EventPayload) -> int:
        envelope = self.sign(payload)
        value = envelope.to_bytes()
        if isinstance(payload, BlocksShipped):
            while len(self._inflight) >= SEND_WINDOW:
                await self._settle(*self._inflight.popleft())
            try:
                future = await self.producer.send(topics.REPLICATION_DELTAS, value, key=self.key)
            except (TimeoutError, KafkaError, OSError) as exc:
                self._retrying(exc, 0.0)
                await self._send_until_out(payload, envelope)
            else:
                self._inflight.append((future, payload, envelope))
            return len(value)
        await self.drain()
        await self._send_until_out(payload, envelope, value)
        return len(value)

    async def drain(self) -> None:
        """Wait until every pipelined batch is acknowledged (re-sending failed ones)."""
        while self._inflight:
            await self._settle(*self._inflight.popleft())

    async def _settle(
        self, future: asyncio.Future[Any], payload: EventPayload, envelope: Envelope
    ) -> None:
        try:
            await future
        except (TimeoutError, KafkaError, OSError) as exc:
            self._retrying(exc, 0.0)
            await self._send_until_out(payload, envelope)

    async def _send_until_out(
        self, payload: EventPayload, envelope: Envelope, value: bytes | None = None
    ) -> None:
        delay = 0.5
        while True:
            try:
                value = value or envelope.to_bytes()
                await self.producer.send_and_wait(topics.REPLICATION_DELTAS, value, key=self.key)
                return
            except (TimeoutError, KafkaError, OSError) as exc:
                self._retrying(exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_SECONDS)
                if datetime.now(UTC) - envelope.occurred_at > REFRESH_ENVELOPE_AFTER:
                    envelope, value = self.sign(payload), None  # don't let it look replayed

    def _retrying(self, exc: BaseException, delay: float) -> None:
        log.warning(
            "cycle message not sent; retrying",
            extra={"item_id": self.key, "error": repr(exc), "retry_in": delay},
        )

    async def close(self) -> None:
        await self.drain()


class FileSink:
    """Offline export: signed envelopes as JSON lines, renamed into place when complete."""

    def __init__(self, sign: Signer, path: Path) -> None:
        self.sign = sign
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = path.with_name(path.name + ".tmp")
        self._fh = open(self._tmp, "wb")  # noqa: SIM115 - closed in close()

    async def emit(self, payload: EventPayload) -> int:
        line = self.sign(payload).to_bytes() + b"\n"
        await asyncio.to_thread(self._fh.write, line)
        return len(line)

    async def close(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        replace_synced(self._tmp, self.path)

    def abort(self) -> None:
        self._fh.close()
        self._tmp.unlink(missing_ok=True)


def export_path(base: Path, item_id: uuid.UUID, seq: int) -> Path:
    return base / str(item_id) / f"cycle-{seq}.jsonl"
