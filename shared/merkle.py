"""Disk blocks and Merkle roots: the one definition of "same disk" the agent and the replica
agree on.

A disk is split into fixed-size blocks (64 KiB by default; the last may be shorter). A leaf is
the SHA-256 of a block's bytes. The tree is a complete binary tree over the leaves padded to a
power of two with zero nodes (32 zero bytes); a parent is SHA-256(left || right). The root of a
disk changes if any byte changes, and one block's change costs log2(n) hashes to re-root.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

BLOCK_SIZE = 64 * 1024
HASH_SIZE = 32
ZERO_NODE = bytes(HASH_SIZE)


def block_count(size_bytes: int, block_size: int = BLOCK_SIZE) -> int:
    return (size_bytes + block_size - 1) // block_size


def block_hash(data: bytes | bytearray | memoryview) -> bytes:
    return hashlib.sha256(data).digest()


_ZERO_HASHES: dict[int, bytes] = {}


def zero_block_hash(length: int = BLOCK_SIZE) -> bytes:
    """Hash of a block of `length` zero bytes (sparse regions of an image)."""
    if length not in _ZERO_HASHES:
        _ZERO_HASHES[length] = block_hash(bytes(length))
    return _ZERO_HASHES[length]


def block_length(index: int, size_bytes: int, block_size: int = BLOCK_SIZE) -> int:
    return min(block_size, size_bytes - index * block_size)


class MerkleTree:
    """A Merkle tree over a fixed number of leaves, updated in place (O(log n) per leaf).

    Storage is one bytearray in heap order: node i (1-based) at [32*i, 32*i+32); leaves start at
    `capacity`. 4 GiB of 64 KiB blocks = 65,536 leaves = 4 MiB of tree.
    """

    def __init__(self, leaves: int) -> None:
        if leaves < 0:
            raise ValueError("leaf count must be >= 0")
        self.leaves = leaves
        capacity = 1
        while capacity < max(leaves, 1):
            capacity *= 2
        self.capacity = capacity
        self._nodes = bytearray(ZERO_NODE * (2 * capacity))
        self._dirty = False

    @classmethod
    def from_leaves(cls, hashes: Iterable[bytes], leaves: int) -> MerkleTree:
        tree = cls(leaves)
        for index, digest in enumerate(hashes):
            tree.set_leaf(index, digest, rehash=False)
        tree.rebuild()
        return tree

    def _node(self, i: int) -> bytes:
        return bytes(self._nodes[i * HASH_SIZE : (i + 1) * HASH_SIZE])

    def leaf(self, index: int) -> bytes:
        return self._node(self.capacity + index)

    def leaf_hashes(self) -> Iterator[bytes]:
        for index in range(self.leaves):
            yield self.leaf(index)

    def set_leaf(self, index: int, digest: bytes, *, rehash: bool = True) -> None:
        if not 0 <= index < self.leaves:
            raise IndexError(f"block {index} outside disk of {self.leaves} blocks")
        if len(digest) != HASH_SIZE:
            raise ValueError("a leaf is a 32-byte SHA-256 digest")
        i = self.capacity + index
        self._nodes[i * HASH_SIZE : (i + 1) * HASH_SIZE] = digest
        if not rehash:
            self._dirty = True
            return
        i //= 2
        while i >= 1:
            self._set(i, hashlib.sha256(self._node(2 * i) + self._node(2 * i + 1)).digest())
            i //= 2

    def _set(self, i: int, digest: bytes) -> None:
        self._nodes[i * HASH_SIZE : (i + 1) * HASH_SIZE] = digest

    def rebuild(self) -> None:
        for i in range(self.capacity - 1, 0, -1):
            self._set(i, hashlib.sha256(self._node(2 * i) + self._node(2 * i + 1)).digest())
        self._dirty = False

    def root(self) -> bytes:
        if self._dirty:
            self.rebuild()
        return self._node(1)

    def root_hex(self) -> str:
        return self.root().hex()

    def copy(self) -> MerkleTree:
        other = MerkleTree.__new__(MerkleTree)
        other.leaves = self.leaves
        other.capacity = self.capacity
        other._nodes = bytearray(self._nodes)
        other._dirty = self._dirty
        return other


def read_blocks(
    fh: BinaryIO, size_bytes: int, block_size: int = BLOCK_SIZE
) -> Iterator[tuple[int, bytes]]:
    """(index, bytes) of every block of an image of `size_bytes`, in order."""
    fh.seek(0)
    for index in range(block_count(size_bytes, block_size)):
        data = fh.read(block_size)
        expected = block_length(index, size_bytes, block_size)
        if len(data) < expected:  # sparse tail / short file reads as zeros
            data = data + bytes(expected - len(data))
        yield index, data


def disk_tree(
    path: Path, size_bytes: int | None = None, block_size: int = BLOCK_SIZE
) -> MerkleTree:
    """The Merkle tree of an image file (reads it once)."""
    size = path.stat().st_size if size_bytes is None else size_bytes
    tree = MerkleTree(block_count(size, block_size))
    with path.open("rb") as fh:
        for index, data in read_blocks(fh, size, block_size):
            tree.set_leaf(index, block_hash(data), rehash=False)
    tree.rebuild()
    return tree


def disk_root(path: Path, size_bytes: int | None = None, block_size: int = BLOCK_SIZE) -> str:
    return disk_tree(path, size_bytes, block_size).root_hex()
