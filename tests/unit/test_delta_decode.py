"""Block data on the delta wire: base64 (zlib first when compressed) decoded exactly, and
anything else refused with a reason (the replication service then requires a resync)."""

from __future__ import annotations

import base64
import hashlib
import zlib

import pytest

from shared.delta_blocks import decode_data
from shared.schemas.replication import Block, Compression

RAW = bytes(range(256)) * 16


def block(data: str, compressed: bool | None = None) -> Block:
    return Block(index=0, sha256=hashlib.sha256(RAW).hexdigest(), data=data, compressed=compressed)


def test_raw_and_compressed_blocks_decode_to_their_bytes() -> None:
    assert decode_data(block(base64.b64encode(RAW).decode()), Compression.NONE, len(RAW)) == RAW
    packed = base64.b64encode(zlib.compress(RAW)).decode()
    assert decode_data(block(packed), Compression.ZLIB, len(RAW)) == RAW
    raw_in_zlib_batch = block(base64.b64encode(RAW).decode(), compressed=False)
    assert decode_data(raw_in_zlib_batch, Compression.ZLIB, len(RAW)) == RAW


@pytest.mark.parametrize(
    "data",
    ["not base64!", "QUJD\n", "QUJDRA", "QUJD=RA=="],
    ids=["foreign characters", "newline", "missing padding", "padding inside"],
)
def test_text_that_is_not_strict_base64_is_refused(data: str) -> None:
    with pytest.raises(ValueError, match="undecodable data"):
        decode_data(block(data), Compression.NONE, len(RAW))


def test_compressed_flag_on_bytes_that_are_not_zlib_is_refused() -> None:
    with pytest.raises(ValueError, match="undecodable data"):
        decode_data(block(base64.b64encode(RAW).decode()), Compression.ZLIB, len(RAW))
