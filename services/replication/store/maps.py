"""A disk's leaf hashes at one point (`DiskMap`: 32 bytes per block, in block order) and the
Merkle trees of an item's latest point that a store keeps in memory (`Latest`)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from shared.merkle import HASH_SIZE, MerkleTree, block_count, block_length, zero_block_hash


class DiskMap:
    """The leaf hashes of one disk at one point: 32 bytes per block, in block order."""

    __slots__ = ("block_size", "leaves", "size_bytes")

    def __init__(self, size_bytes: int, block_size: int, leaves: bytearray) -> None:
        self.size_bytes, self.block_size, self.leaves = size_bytes, block_size, leaves

    @classmethod
    def of_tree(cls, tree: MerkleTree, size_bytes: int, block_size: int) -> DiskMap:
        return cls(size_bytes, block_size, bytearray(b"".join(tree.leaf_hashes())))

    @property
    def count(self) -> int:
        return len(self.leaves) // HASH_SIZE

    def leaf(self, index: int) -> bytes:
        return bytes(self.leaves[index * HASH_SIZE : (index + 1) * HASH_SIZE])

    def is_zero(self, index: int, leaf: bytes) -> bool:
        return leaf == zero_block_hash(block_length(index, self.size_bytes, self.block_size))

    def resize(self, size_bytes: int) -> None:
        """Truncate, or extend with zero-block leaves. Hash-only: a boundary block whose length
        changes keeps its old leaf here; the commit that resized the disk put the right one in
        its delta."""
        old, new = self.count, block_count(size_bytes, self.block_size)
        if new < old:
            del self.leaves[new * HASH_SIZE :]
        elif new > old:
            tail = block_length(new - 1, size_bytes, self.block_size)
            self.leaves += zero_block_hash(self.block_size) * (new - old - 1)
            self.leaves += zero_block_hash(tail)
        self.size_bytes = size_bytes

    def apply(self, entries: Iterable[tuple[int, str]]) -> None:
        for index, sha in entries:
            self.leaves[index * HASH_SIZE : (index + 1) * HASH_SIZE] = bytes.fromhex(sha)

    def copy(self) -> DiskMap:
        return DiskMap(self.size_bytes, self.block_size, bytearray(self.leaves))

    def tree(self) -> MerkleTree:
        n = self.count
        return MerkleTree.from_leaves((self.leaf(i) for i in range(n)), n)

    def diff(self, previous: DiskMap | None) -> list[tuple[int, str]]:
        """The delta that turns `previous` (resized to this size) into this map."""
        base = previous.copy() if previous else DiskMap(0, self.block_size, bytearray())
        base.resize(self.size_bytes)
        return [
            (i, self.leaf(i).hex())
            for i in range(self.count)
            if self.leaves[i * HASH_SIZE : (i + 1) * HASH_SIZE]
            != base.leaves[i * HASH_SIZE : (i + 1) * HASH_SIZE]
        ]


@dataclass
class DiskState:
    size_bytes: int
    block_size: int
    tree: MerkleTree


@dataclass
class Latest:
    seq: int | None
    disks: dict[str, DiskState]
