"""Files on disk, one way for every process: durable renames (the file fsynced, renamed into
place, its folder fsynced so the rename survives a crash) and paths confined to configured
roots after following links."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

SAFE_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def unusable_file_names(names: Iterable[str]) -> list[str]:
    """The names (disk ids) that cannot name a file `<name>.vhdx` in a folder."""
    return [n for n in names if not SAFE_FILE_NAME.fullmatch(n)]


def fsync_dir(folder: Path) -> None:
    """Make the entries of `folder` (a rename, a new file) durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_synced(tmp: Path, path: Path) -> None:
    """Rename the (already fsynced) `tmp` to `path` and fsync the folder."""
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` all or nothing, durably (a crash leaves the old or the new)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    replace_synced(tmp, path)


class OutsideRoots(ValueError):
    """A path that resolves (after links) outside every allowed root."""


def confined(path: str | Path, roots: Iterable[Path]) -> Path:
    """`path` resolved (links followed, `..` applied); raises OutsideRoots unless it lies in
    one of `roots` (themselves resolved). A relative path, one with a NUL or a link loop is
    refused."""
    text = str(path)
    if "\x00" in text or not os.path.isabs(text):
        raise OutsideRoots(f"{text[:200]!r} is not an absolute path")
    try:
        resolved = Path(text).resolve()
    except RuntimeError:  # a link loop (Python 3.11 raises it even when not strict)
        raise OutsideRoots(f"{text[:200]} cannot be resolved: a loop of links") from None
    allowed = [Path(r).resolve() for r in roots]
    if not any(resolved.is_relative_to(root) for root in allowed):
        raise OutsideRoots(
            f"{text[:200]} is not under an allowed folder ({', '.join(map(str, allowed))})"
        )
    return resolved
