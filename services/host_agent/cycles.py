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
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from aiokafka.errors import KafkaError

from shared import topics
from shared.edge_identity import Identity
from shared.files import replace_synced
from shared.kafka.producer import KafkaProducer
from shared.schemas.envelope import Envelope, EventPayload, new_envelope
from shared.schemas.replication import BlocksShipped

log = logging.getLogger(__name__)

RETRY_MAX_SECONDS = 30.0
SEND_WINDOW = 16  # BlocksShipped batches in flight (unacknowledged) at once
REFRESH_ENVELOPE_AFTER = timedelta(seconds=60)


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
