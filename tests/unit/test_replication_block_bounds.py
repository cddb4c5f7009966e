"""A block's data is decoded to at most the block's length from its cycle's geometry: longer
data and data that expands beyond it (a decompression bomb) are refused before more than that
many bytes are made."""

from __future__ import annotations

import base64
import os
import tracemalloc
import zlib

import pytest

from services.replication.delta_prepare import block_bytes
from shared.merkle import block_hash
from shared.schemas import replication as ev

DISK = {"disk_id": "d0", "size_bytes": 3 * 65536 + 100, "block_size": 65536}


def block(index: int, raw: bytes, compressed: bool) -> ev.Block:
    data = zlib.compress(raw) if compressed else raw
    return ev.Block(
        index=index,
        sha256=block_hash(raw).hex(),
        data=base64.b64encode(data).decode(),
        compressed=compressed,
    )


def bomb(expanded: int) -> bytes:
    deflate = zlib.compressobj(9)
    zeros = bytes(1 << 20)
    out = [deflate.compress(zeros) for _ in range(expanded >> 20)]
    return b"".join(out) + deflate.flush()


@pytest.mark.parametrize("compressed", [False, True])
def test_a_block_of_the_right_length_is_decoded(compressed: bool) -> None:
    full, tail = os.urandom(65536), os.urandom(100)
    assert block_bytes(block(0, full, compressed), DISK, ev.Compression.NONE) == full
    assert block_bytes(block(3, tail, compressed), DISK, ev.Compression.NONE) == tail


@pytest.mark.parametrize("compressed", [False, True])
def test_a_block_longer_or_shorter_than_its_geometry_is_refused(compressed: bool) -> None:
    with pytest.raises(
        ValueError, match=r"150 bytes where the block has 100|expands beyond the block.s 100 bytes"
    ):
        block_bytes(block(3, os.urandom(150), compressed), DISK, ev.Compression.NONE)
    with pytest.raises(ValueError, match="characters of base64 for a block of 100 bytes"):
        block_bytes(block(3, os.urandom(65536), compressed), DISK, ev.Compression.NONE)
    with pytest.raises(ValueError, match="where the block has 65536"):
        block_bytes(block(0, os.urandom(100), compressed), DISK, ev.Compression.NONE)


def test_a_decompression_bomb_is_refused_without_expanding_it() -> None:
    data = bomb(48 << 20)  # 48 MiB of zeros in ~48 KB: passes the size check on the base64
    bad = ev.Block(
        index=0,
        sha256="0" * 64,
        data=base64.b64encode(data).decode(),
        compressed=True,
    )
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="expands beyond the block's 65536 bytes"):
            block_bytes(bad, DISK, ev.Compression.NONE)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak  # never more than the block and its input, not 48 MiB


def test_base64_far_longer_than_the_block_is_refused_before_decoding() -> None:
    data = bomb(600 << 20)  # a 600 MiB bomb in ~600 KB
    bad = ev.Block(index=0, sha256="0" * 64, data=base64.b64encode(data).decode(), compressed=True)
    with pytest.raises(ValueError, match="characters of base64 for a block of 65536 bytes"):
        block_bytes(bad, DISK, ev.Compression.NONE)
