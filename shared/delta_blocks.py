"""The bytes of a shipped block (`BlocksShipped`): the one decoding the replication service's
pipeline and the recovery host's replica use."""

from __future__ import annotations

import binascii
import zlib

import pybase64

from shared.schemas.replication import Block, Compression


def decode_data(block: Block, compression: Compression) -> bytes:
    """The bytes of a block that carries data (base64, zlib-compressed when the block or its
    batch says); ValueError says what is wrong."""
    assert block.data is not None
    try:
        raw = pybase64.b64decode(block.data, validate=True)  # binascii.Error if not base64
        compressed = (
            block.compressed if block.compressed is not None else compression is Compression.ZLIB
        )
        return zlib.decompress(raw) if compressed else raw
    except (binascii.Error, zlib.error) as exc:
        raise ValueError(f"undecodable data ({exc})") from None
