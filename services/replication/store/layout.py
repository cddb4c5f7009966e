"""Where an item's files lie under the store's root (`Layout`; docs/replica-store.md draws
the tree) and how they are written durably: to tmp/, fsynced, renamed into place, the folder
fsynced."""

from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.replication.store.errors import StoreError
from shared.files import fsync_dir

POINT_FILE = re.compile(r"(\d{12})\.json")


@dataclass(frozen=True)
class Layout:
    dir: Path

    @property
    def packs(self) -> Path:
        return self.dir / "packs"

    @property
    def points(self) -> Path:
        return self.dir / "points"

    @property
    def base(self) -> Path:
        return self.dir / "base"

    @property
    def tmp(self) -> Path:
        return self.dir / "tmp"

    @property
    def base_pointer(self) -> Path:
        return self.dir / "BASE"

    @property
    def journal(self) -> Path:
        return self.dir / "PRUNE.json"

    def point(self, seq: int) -> Path:
        return self.points / f"{seq:012d}.json"

    def staged_point(self, seq: int) -> Path:
        return self.points / f"{seq:012d}.json.next"

    def base_dir(self, seq: int) -> Path:
        return self.base / f"{seq:012d}"

    def temp(self, name: str) -> Path:
        return self.tmp / f"{name}.{uuid.uuid4().hex[:12]}"


def mkdir_durable(path: Path) -> None:
    if path.is_dir():
        return
    mkdir_durable(path.parent)
    try:
        path.mkdir()
    except FileExistsError:
        return
    fsync_dir(path.parent)


def write_synced(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def dumps(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise StoreError(f"unreadable store file {path}: {exc}") from exc
