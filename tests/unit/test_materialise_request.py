"""A failover's materialise request as the replication service keeps it: after the recovery
host refused it, the reason noted on it (`replica_refused`) must not make the request itself
invalid (it is then done here, or answered with that reason); a folder the host writes into
must be an absolute path."""

from __future__ import annotations

import uuid

import pytest

from services.replication.config import ReplicationSettings
from services.replication.materialise import materialise_target, requested
from shared.schemas import failover as fo


def test_a_request_the_host_refused_reads_as_it_was_asked() -> None:
    asked = fo.RecoveryPointMaterialiseRequested(
        request_id=uuid.uuid4(), item_id=uuid.uuid4(), target_dir="/srv/r1/vm", handover=True
    )
    kept = asked.model_dump(mode="json") | {"replica_refused": "not in this host's storage"}
    with pytest.raises(ValueError, match="replica_refused"):
        fo.RecoveryPointMaterialiseRequested.model_validate(kept)
    assert requested({"request": kept}) == asked


def test_the_hosts_folder_is_checked_for_what_the_host_cannot_check() -> None:
    settings = ReplicationSettings()
    assert str(materialise_target(settings, "/srv/r1/vm", ["d0"], local=False)) == "/srv/r1/vm"
    with pytest.raises(ValueError, match="not an absolute path"):
        materialise_target(settings, "srv/r1/vm", ["d0"], local=False)
    with pytest.raises(ValueError, match="unusable as file names"):
        materialise_target(settings, "/srv/r1/vm", ["../d0"], local=False)
