"""Registration rules: pure, synchronous, no I/O."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from shared.schemas.registration import ConnectionState


class RegistrationError(Exception):
    """A refused registration request; `status` is the HTTP status it maps to."""

    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class KeyRejected(RegistrationError):
    status = 401


class AlreadyRegistered(RegistrationError):
    status = 409


@dataclass(frozen=True)
class KeyState:
    key_id: str
    expires_at: datetime
    revoked_at: datetime | None


def check_registration_key(key: KeyState | None, now: datetime) -> None:
    """A key registers producers only while it is known, unrevoked and unexpired."""
    if key is None:
        raise KeyRejected(
            "unknown registration key: generate one for the vault (POST "
            "/v1/vaults/{vault_id}/registration-keys) and use it as the bearer token"
        )
    if key.revoked_at is not None:
        raise KeyRejected(
            f"registration key {key.key_id} was revoked at {key.revoked_at.isoformat()}: "
            "generate a new key"
        )
    if key.expires_at <= now:
        raise KeyRejected(
            f"registration key {key.key_id} expired at {key.expires_at.isoformat()}: "
            "keys are valid for a limited time (5 days by default); generate a new key"
        )


@dataclass(frozen=True)
class ExistingProducer:
    producer_id: str
    kind: str
    name: str
    site: str
    active: bool
    revoked: bool = False


def check_reregistration(
    same_name: ExistingProducer | None,
    site_provider: ExistingProducer | None,
    kind: str,
    name: str,
    site: str,
    force: bool,
) -> None:
    """Re-registering a registered server must be explicit (`force`); a site has one provider;
    a revoked server is registered again only explicitly (`force`, which needs an admin)."""
    if same_name is not None and same_name.revoked and not force:
        raise AlreadyRegistered(
            f"{kind} '{name}' was revoked (id {same_name.producer_id}): registering it again"
            " needs force=true and an admin token of the vault"
        )
    if same_name is not None and same_name.active and not force:
        raise AlreadyRegistered(
            f"{kind} '{name}' is already registered in this vault (id {same_name.producer_id}); "
            "to re-register it, send force=true: a new credential is issued and the old one "
            "stops working"
        )
    if (
        kind == "provider"
        and site_provider is not None
        and site_provider.active
        and site_provider.name != name
    ):
        raise AlreadyRegistered(
            f"site '{site}' already has provider '{site_provider.name}' "
            f"(id {site_provider.producer_id}); a site has one VMM provider: unregister it first"
        )


def next_state_on_heartbeat(current: ConnectionState) -> ConnectionState | None:
    """A heartbeat connects a producer; returns the new state, or None if unchanged."""
    return ConnectionState.CONNECTED if current is not ConnectionState.CONNECTED else None


def disconnect_deadline(last_heartbeat: datetime, interval_seconds: float, missed: int) -> datetime:
    """The instant after which a silent producer counts as Disconnected."""
    return last_heartbeat + timedelta(seconds=interval_seconds * missed)


@dataclass
class MissedHeartbeatClock:
    """When silence starts to count against a producer, around an outage of the broker or
    the database (as seen by the registration service). After both answer again (the later
    recovery: `recovered_at`), the clock restarts at the heartbeat consumer's first fetch
    since then (it rejoins its group or finishes the record it retried, and that fetch brings
    the heartbeats queued meanwhile); if it fetches nothing for `hold_seconds` (no producer is
    sending at all), at the recovery itself."""

    hold_seconds: float = 60.0
    recovered_at: datetime | None = None
    resumed_at: datetime | None = None

    def counts_from(
        self, outage_ended_at: datetime | None, fetched_at: datetime | None, now: datetime
    ) -> tuple[bool, datetime | None]:
        """(whether producers may be judged now, the instant silence counts from: None for
        their last heartbeat alone)."""
        if outage_ended_at is None:
            return True, None
        if outage_ended_at != self.recovered_at:
            self.recovered_at, self.resumed_at = outage_ended_at, None
        if self.resumed_at is None and fetched_at is not None and fetched_at >= self.recovered_at:
            self.resumed_at = fetched_at
        if self.resumed_at is not None:
            return True, self.resumed_at
        if now - outage_ended_at < timedelta(seconds=self.hold_seconds):
            return False, None
        return True, outage_ended_at
