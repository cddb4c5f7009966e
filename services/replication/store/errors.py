"""What the replica store raises: a refused operation, or damage it found."""

from __future__ import annotations


class StoreError(Exception):
    """The store refused an operation or found itself damaged."""


class BlockHashMismatch(StoreError, ValueError):
    def __init__(self, expected: str, actual: str, index: int | None = None) -> None:
        where = "block" if index is None else f"block {index}"
        super().__init__(f"{where}: SHA-256 is {actual}, expected {expected}")
        self.index, self.expected, self.actual = index, expected, actual


class MissingBlock(StoreError):
    def __init__(self, disk_id: str, index: int, sha256: str) -> None:
        super().__init__(f"disk {disk_id} block {index}: block {sha256} is not stored")
        self.disk_id, self.index, self.sha256 = disk_id, index, sha256


class CorruptBlock(StoreError):
    def __init__(self, disk_id: str, index: int, expected: str, actual: str) -> None:
        super().__init__(
            f"disk {disk_id} block {index}: stored bytes hash to {actual}, not {expected}"
        )
        self.disk_id, self.index, self.expected, self.actual = disk_id, index, expected, actual


class RootMismatch(StoreError):
    def __init__(self, disk_id: str, expected: str, actual: str) -> None:
        super().__init__(f"disk {disk_id}: Merkle root would be {actual}, manifest says {expected}")
        self.disk_id, self.expected, self.actual = disk_id, expected, actual


class PointConflict(StoreError):
    """A commit that contradicts what is stored (other content, or an older sequence)."""


class UnknownPoint(StoreError, LookupError):
    """No such retained point (or disk at that point)."""
