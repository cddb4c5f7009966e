"""Checking files from outside: the SHA-256 of a file (a disk image, a materialised point),
read in 1 MiB chunks so a 4 GiB image never sits in memory."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
