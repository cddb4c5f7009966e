"""The bytes of a shipped block (`BlocksShipped`): how a block is encoded (zero, raw or zlib,
base64) and grouped into batches, as a source agent ships them and the replication service
forwards them again from its store; and the one decoding the replication service's pipeline and
the recovery host's replica use."""

from __future__ import annotations

import binascii
import uuid
import zlib
from dataclasses import dataclass, field

import pybase64

from shared.merkle import block_hash, zero_block_hash
from shared.schemas.replication import MAX_BLOCKS_PER_BATCH, Block, BlocksShipped, Compression

MAX_BATCH_DATA = 512 * 1024  # block data (as sent, before base64) in one `BlocksShipped`


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


def decode_data(block: Block, compression: Compression, length: int) -> bytes:
    """The bytes of a block that carries data (base64, zlib-compressed when the block or its
    batch says), decoded and decompressed to at most `length` (the block's length from the
    cycle's geometry): data that is longer, or expands beyond it (a decompression bomb), is
    refused before more than `length` bytes are made. ValueError says what is wrong."""
    assert block.data is not None
    if len(block.data) > 4 * ((length + length // 100 + 64) // 3 + 1):
        raise ValueError(f"{len(block.data)} characters of base64 for a block of {length} bytes")
    try:
        raw = pybase64.b64decode(block.data, validate=True)  # binascii.Error if not base64
        compressed = (
            block.compressed if block.compressed is not None else compression is Compression.ZLIB
        )
        if compressed:
            inflater = zlib.decompressobj()
            data = inflater.decompress(raw, length)
            if inflater.unconsumed_tail or not inflater.eof:
                raise ValueError(f"expands beyond the block's {length} bytes or is truncated")
        else:
            data = raw
    except (binascii.Error, zlib.error) as exc:
        raise ValueError(f"undecodable data ({exc})") from None
    if len(data) != length:
        raise ValueError(f"{len(data)} bytes where the block has {length}")
    return data
