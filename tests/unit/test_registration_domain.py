from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from services.registration import domain
from shared.schemas.registration import ConnectionState

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def key(expires_in: timedelta, revoked: bool = False) -> domain.KeyState:
    return domain.KeyState("key-1", NOW + expires_in, NOW - timedelta(hours=1) if revoked else None)


def test_valid_key_is_accepted() -> None:
    domain.check_registration_key(key(timedelta(days=5)), NOW)


@pytest.mark.parametrize(
    ("state", "message"),
    [
        (None, "unknown registration key"),
        (key(timedelta(seconds=-1)), "expired"),
        (key(timedelta(0)), "expired"),
        (key(timedelta(days=1), revoked=True), "revoked"),
    ],
)
def test_unusable_keys_are_refused_with_the_reason(
    state: domain.KeyState | None, message: str
) -> None:
    with pytest.raises(domain.KeyRejected, match=message) as exc:
        domain.check_registration_key(state, NOW)
    assert exc.value.status == 401


def producer(kind: str = "agent", name: str = "h1", site: str = "primary", active: bool = True):
    return domain.ExistingProducer(str(uuid.uuid4()), kind, name, site, active)


def test_reregistration_needs_force() -> None:
    existing = producer()
    with pytest.raises(domain.AlreadyRegistered, match=r"already registered.*force=true"):
        domain.check_reregistration(existing, None, "agent", "h1", "primary", force=False)
    domain.check_reregistration(existing, None, "agent", "h1", "primary", force=True)


def test_unregistered_server_may_register_again_without_force() -> None:
    domain.check_reregistration(producer(active=False), None, "agent", "h1", "primary", False)


def test_a_revoked_server_registers_again_only_with_force() -> None:
    revoked = domain.ExistingProducer(str(uuid.uuid4()), "agent", "h1", "primary", False, True)
    with pytest.raises(domain.AlreadyRegistered, match="was revoked"):
        domain.check_reregistration(revoked, None, "agent", "h1", "primary", force=False)
    domain.check_reregistration(revoked, None, "agent", "h1", "primary", force=True)


def test_a_site_has_one_provider() -> None:
    other = producer(kind="provider", name="vmm-a", site="primary")
    with pytest.raises(domain.AlreadyRegistered, match="already has provider 'vmm-a'"):
        domain.check_reregistration(None, other, "provider", "vmm-b", "primary", force=True)
    domain.check_reregistration(other, other, "provider", "vmm-a", "primary", force=True)


def test_heartbeat_connects_only_when_not_connected() -> None:
    assert domain.next_state_on_heartbeat(ConnectionState.DISCONNECTED) is ConnectionState.CONNECTED
    assert domain.next_state_on_heartbeat(ConnectionState.CONNECTED) is None


def test_disconnect_deadline_is_missed_intervals_after_last_beat() -> None:
    assert domain.disconnect_deadline(NOW, 2.5, 3) == NOW + timedelta(seconds=7.5)


def test_the_missed_heartbeat_clock_restarts_after_a_broker_outage() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    clock = domain.MissedHeartbeatClock(hold_seconds=60)
    assert clock.counts_from(None, None, t0) == (True, None)  # never down: last heartbeat only
    recovered = t0 + timedelta(seconds=100)
    # back, but the heartbeat consumer has not fetched since: nobody is judged
    assert clock.counts_from(recovered, t0, recovered + timedelta(seconds=5)) == (False, None)
    # its first fetch since the recovery restarts the clock; later fetches do not move it
    first = recovered + timedelta(seconds=8)
    assert clock.counts_from(recovered, first, first) == (True, first)
    later = first + timedelta(seconds=30)
    assert clock.counts_from(recovered, later, later) == (True, first)
    # nothing fetched for the whole hold (no producer sends): counted from the recovery
    again = t0 + timedelta(seconds=500)
    quiet = domain.MissedHeartbeatClock(hold_seconds=60)
    assert quiet.counts_from(again, None, again + timedelta(seconds=59))[0] is False
    assert quiet.counts_from(again, None, again + timedelta(seconds=61)) == (True, again)
