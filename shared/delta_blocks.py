"""The bytes of a shipped block (`BlocksShipped`): the one decoding the replication service's
pipeline and the recovery host's replica use."""

from __future__ import annotations

import binascii
import zlib

import pybase64

from shared.schemas.replication import Block, Compression


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
