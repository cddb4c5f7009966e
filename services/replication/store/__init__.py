"""The replica store (`ReplicaStore`): the bytes of every retained recovery point on the
recovery site's disk; docs/replica-store.md describes its files and guarantees."""

from services.replication.store.errors import (
    BlockHashMismatch,
    CorruptBlock,
    MissingBlock,
    PointConflict,
    RootMismatch,
    StoreError,
    UnknownPoint,
)
from services.replication.store.manifest import (
    BlockRef,
    DiskPoint,
    DiskVerification,
    PointInfo,
    PointManifest,
    VerifyResult,
)
from services.replication.store.replica_store import ReplicaStore, check_hashes

__all__ = [
    "BlockHashMismatch",
    "BlockRef",
    "CorruptBlock",
    "DiskPoint",
    "DiskVerification",
    "MissingBlock",
    "PointConflict",
    "PointInfo",
    "PointManifest",
    "ReplicaStore",
    "RootMismatch",
    "StoreError",
    "UnknownPoint",
    "VerifyResult",
    "check_hashes",
]
