"""The Merkle trees of a replica's images, kept in memory across points: each follows the
leaves an apply or a restore writes (an 8 GiB disk's 131,072 leaves are not re-read and
re-hashed at each point), and is rebuilt from the `.leaves` file when it was dropped (a size
change, a re-run after a kill, a write that failed)."""

from __future__ import annotations

from services.host_agent.replica_format import DiskState, ItemFiles
from shared.merkle import HASH_SIZE, MerkleTree, block_count


class LeafTrees:
    """(item, disk) -> the tree of the leaves on disk."""

    def __init__(self) -> None:
        self._trees: dict[tuple[str, str], MerkleTree] = {}

    def of(self, item: str, f: ItemFiles, disk: DiskState) -> MerkleTree:
        """The disk's tree (read from its leaves when not cached)."""
        key = (item, disk.disk_id)
        if key not in self._trees:
            n = block_count(disk.size_bytes, disk.block_size)
            with f.leaves(disk.disk_id).open("rb") as lv:
                raw = lv.read(n * HASH_SIZE)
            self._trees[key] = MerkleTree.from_leaves(
                (raw[i * HASH_SIZE : (i + 1) * HASH_SIZE] for i in range(n)), n
            )
        return self._trees[key]

    def roots(self, item: str, f: ItemFiles, disks: tuple[DiskState, ...]) -> dict[str, str]:
        return {d.disk_id: self.of(item, f, d).root_hex() for d in disks}

    def cached(self, item: str, disk_id: str) -> MerkleTree | None:
        return self._trees.get((item, disk_id))

    def take(self, item: str, disk_id: str) -> MerkleTree | None:
        """The cached tree, no longer cached (while its leaves are rewritten)."""
        return self._trees.pop((item, disk_id), None)

    def keep(self, item: str, disk_id: str, tree: MerkleTree) -> None:
        self._trees[(item, disk_id)] = tree

    def forget(self, item: str) -> None:
        for key in [k for k in self._trees if k[0] == item]:
            del self._trees[key]
