"""One active replication instance per deployment: the role an instance takes (active,
standby, refused) from the lock, its store's identity and the deployment's record; the store
identity file; what /healthz answers for each role."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from services.replication.config import ReplicationSettings
from services.replication.instance import ActiveInstance, Role, decide, takeover_wait
from services.replication.standby import (
    STORE_ID_FILE,
    OneActiveInstance,
    StoreIdentityError,
    store_identity,
)
from shared.http import HEALTHY_STATUSES
from shared.runtime import Role as ReportedRole
from shared.runtime import Runtime, health_status
from shared.settings import ServiceSettings

OURS = uuid.uuid4()
OTHER = uuid.uuid4()
SINCE = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def recorded(
    store: uuid.UUID, *, age: float = 0.0, every: float = 5.0, released: bool = False
) -> ActiveInstance:
    return ActiveInstance(store, "dr-a", 4242, "/srv/replica", SINCE, SINCE, every, age, released)


@pytest.mark.parametrize("protects", [True, False])
def test_the_first_instance_claims_an_empty_deployment(protects: bool) -> None:
    d = decide(lock_taken=True, own_store=OURS, record=None, protects=protects)
    assert (d.role, d.claim, d.reason) == (Role.ACTIVE, True, None)


def test_the_same_store_takes_over_without_a_new_claim() -> None:
    d = decide(lock_taken=True, own_store=OURS, record=recorded(OURS), protects=True)
    assert (d.role, d.claim) == (Role.ACTIVE, False)


def test_another_store_is_refused_while_the_deployment_protects_anything() -> None:
    d = decide(lock_taken=True, own_store=OURS, record=recorded(OTHER), protects=True)
    assert d.role is Role.REFUSED and not d.claim
    assert d.reason is not None
    assert str(OTHER) in d.reason and str(OURS) in d.reason
    assert "/srv/replica" in d.reason and "DR_REPLICATION_STORE_DIR" in d.reason


def test_another_store_claims_a_deployment_that_protects_nothing() -> None:
    d = decide(lock_taken=True, own_store=OURS, record=recorded(OTHER), protects=False)
    assert (d.role, d.claim) == (Role.ACTIVE, True)


@pytest.mark.parametrize(
    ("store", "protects", "warned"),
    [(OURS, True, False), (OTHER, False, False), (OTHER, True, True)],
)
def test_without_the_lock_it_is_a_standby_that_says_when_it_could_not_take_over(
    store: uuid.UUID, protects: bool, warned: bool
) -> None:
    d = decide(lock_taken=False, own_store=OURS, record=recorded(store), protects=protects)
    assert d.role is Role.STANDBY and not d.claim
    assert (d.reason is not None) is warned


@pytest.mark.parametrize(
    ("age", "released", "wait"),
    [
        (0.0, False, 10.0),
        (4.0, False, 6.0),
        (10.0, False, 0.0),
        (60.0, False, 0.0),
        (0.0, True, 0.0),
    ],
)
def test_a_takeover_waits_until_the_last_active_instance_missed_two_heartbeats(
    age: float, released: bool, wait: float
) -> None:
    assert takeover_wait(recorded(OURS, age=age, every=5.0, released=released)) == wait
    assert takeover_wait(recorded(OURS, age=age, every=5.0), gone=True) == 0.0
    assert takeover_wait(None) == 0.0


def test_the_store_identity_is_created_once_and_kept(tmp_path: Path) -> None:
    root = tmp_path / "replica"
    first = store_identity(root)
    assert store_identity(root) == first
    assert (root / STORE_ID_FILE).read_text().strip() == str(first)
    assert [p.name for p in root.iterdir()] == [STORE_ID_FILE]  # no temporary file left
    assert store_identity(tmp_path / "elsewhere") != first


def test_processes_creating_the_identity_together_agree_on_one(tmp_path: Path) -> None:
    got: list[uuid.UUID] = []
    threads = [
        threading.Thread(target=lambda: got.append(store_identity(tmp_path))) for _ in "abcdefgh"
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 8 and len(set(got)) == 1


def test_a_damaged_identity_file_says_what_to_do(tmp_path: Path) -> None:
    (tmp_path / STORE_ID_FILE).write_text("not-a-uuid\n")
    with pytest.raises(StoreIdentityError, match="not a replica store identity"):
        store_identity(tmp_path)


@pytest.mark.parametrize(
    ("healthy", "role", "status"),
    [
        (True, None, "ok"),
        (False, None, "degraded"),
        (True, "active", "ok"),
        (True, "standby", "standby"),
        (False, "standby", "degraded"),
        (True, "refused", "degraded"),
    ],
)
def test_health_status_of_each_role(healthy: bool, role: str | None, status: str) -> None:
    reported = ReportedRole(role) if role is not None else None  # type: ignore[arg-type]
    assert health_status(healthy, reported) == status
    assert (status in HEALTHY_STATUSES) is (healthy and role != "refused")


class _NoDatabase(Runtime):
    """A runtime whose health needs no database (its pool answers nothing)."""

    @property
    def pool(self) -> Any:
        raise RuntimeError("no database here")


async def test_health_names_the_role_the_reason_and_the_active_instance() -> None:
    rt = _NoDatabase("replication", ServiceSettings())
    assert "role" not in await rt.health()
    role = ReportedRole("standby", reason="another is active", active=recorded(OURS).summary())
    rt.report_role(lambda: role)
    health = await rt.health()
    assert (health["role"], health["reason"]) == ("standby", "another is active")
    assert health["active_instance"]["host"] == "dr-a"
    assert health["active_instance"]["pid"] == 4242
    assert health["active_instance"]["since"] == SINCE.isoformat()


def test_an_instance_knows_when_the_last_active_one_ran_here_and_ended() -> None:
    settings = ReplicationSettings()

    async def activate() -> None:
        raise AssertionError("not in this test")

    here = OneActiveInstance(Runtime("replication", settings), settings, activate)

    def last(host: str, pid: int) -> ActiveInstance:
        return ActiveInstance(OURS, host, pid, "/srv/replica", SINCE, SINCE, 5.0, 0.0, False)

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert here.last_one_gone(last(here.host, dead.pid))  # its process ended
    assert here.last_one_gone(last(here.host, os.getpid()))  # this very process id: restarted
    assert not here.last_one_gone(last(here.host, os.getppid()))  # still running
    assert not here.last_one_gone(last(f"not-{here.host}", dead.pid))  # elsewhere: cannot know
    assert not here.last_one_gone(None)
