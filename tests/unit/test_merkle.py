from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from shared.merkle import (
    BLOCK_SIZE,
    ZERO_NODE,
    MerkleTree,
    block_count,
    block_hash,
    disk_root,
    disk_tree,
)


def naive_root(leaves: list[bytes]) -> bytes:
    level = list(leaves) or [ZERO_NODE]
    size = 1
    while size < len(level):
        size *= 2
    level += [ZERO_NODE] * (size - len(level))
    while len(level) > 1:
        level = [hashlib.sha256(level[i] + level[i + 1]).digest() for i in range(0, len(level), 2)]
    return level[0]


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13, 64])
def test_root_matches_the_definition(n: int) -> None:
    leaves = [block_hash(os.urandom(16)) for _ in range(n)]
    assert MerkleTree.from_leaves(leaves, n).root() == naive_root(leaves)


def test_incremental_update_equals_rebuild() -> None:
    leaves = [block_hash(bytes([i])) for i in range(37)]
    tree = MerkleTree.from_leaves(leaves, 37)
    for index in (0, 36, 17):
        leaves[index] = block_hash(os.urandom(8))
        tree.set_leaf(index, leaves[index])
        assert tree.root() == naive_root(leaves)


def test_any_change_changes_the_root() -> None:
    tree = MerkleTree.from_leaves([block_hash(b"a")] * 4, 4)
    before = tree.root()
    copy = tree.copy()
    copy.set_leaf(2, block_hash(b"b"))
    assert copy.root() != before
    assert tree.root() == before, "copies are independent"


def test_out_of_range_and_bad_digest_are_refused() -> None:
    tree = MerkleTree(4)
    with pytest.raises(IndexError):
        tree.set_leaf(4, ZERO_NODE)
    with pytest.raises(ValueError):
        tree.set_leaf(0, b"short")


def test_disk_root_of_an_image_with_a_short_last_block(tmp_path: Path) -> None:
    data = os.urandom(BLOCK_SIZE * 3 + 100)
    image = tmp_path / "disk.vhdx"
    image.write_bytes(data)
    assert block_count(len(data)) == 4
    leaves = [block_hash(data[i : i + BLOCK_SIZE]) for i in range(0, len(data), BLOCK_SIZE)]
    assert disk_root(image) == naive_root(leaves).hex()
    tree = disk_tree(image)
    assert list(tree.leaf_hashes()) == leaves
