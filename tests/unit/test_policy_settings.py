"""Replication policy settings: every rule, broken one at a time, with its message."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from services.policy import domain
from shared.schemas.envelope import new_envelope
from shared.schemas.policy import (
    Authentication,
    InitialReplication,
    Policy,
    PolicyCreated,
    ReplicationPolicySettings,
)
from shared.schemas.registry import payload_model, topic_of

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def settings(**kw: Any) -> ReplicationPolicySettings:
    return ReplicationPolicySettings.model_validate(kw)


def refused(**kw: Any) -> str:
    with pytest.raises(ValidationError) as info:
        settings(**kw)
    return str(info.value)


def test_defaults_are_the_products() -> None:
    s = ReplicationPolicySettings()
    assert s.copy_frequency_seconds == 300
    assert s.recovery_points == 0
    assert s.app_consistent_frequency_hours == 0
    assert s.compression is True
    assert s.authentication is Authentication.CERTIFICATE
    assert s.port == 8084
    assert s.initial_replication is InitialReplication.ONLINE_NOW
    assert s.delete_replica_on_disable is False
    assert s.target_host_os_version is None


@pytest.mark.parametrize("seconds", [30, 300, 900, 1, 3600, 45])
def test_copy_frequency_product_values_and_our_extension(seconds: int) -> None:
    assert settings(copy_frequency_seconds=seconds).copy_frequency_seconds == seconds


@pytest.mark.parametrize("seconds", [0, -5, 3601])
def test_copy_frequency_out_of_range(seconds: int) -> None:
    msg = refused(copy_frequency_seconds=seconds)
    assert "copy_frequency_seconds must be a whole number of seconds from 1 to 3600" in msg
    assert "30, 300, 900" in msg


def test_copy_frequency_must_be_whole() -> None:
    assert "fractional part" in refused(copy_frequency_seconds=30.5)


@pytest.mark.parametrize("points", [0, 24, 168])
def test_recovery_points_in_range(points: int) -> None:
    assert settings(recovery_points=points).recovery_points == points


@pytest.mark.parametrize("points", [-1, 169])
def test_recovery_points_out_of_range(points: int) -> None:
    msg = refused(recovery_points=points)
    assert "recovery_points must be 0..168" in msg
    assert "product allows up to 24" in msg


def test_app_consistent_in_range() -> None:
    s = settings(recovery_points=24, app_consistent_frequency_hours=12)
    assert s.app_consistent_frequency_hours == 12
    assert settings(app_consistent_frequency_hours=0).app_consistent_frequency_hours == 0


@pytest.mark.parametrize("hours", [-1, 13])
def test_app_consistent_out_of_range(hours: int) -> None:
    msg = refused(recovery_points=24, app_consistent_frequency_hours=hours)
    assert "app_consistent_frequency_hours must be 0 (off) or 1..12 hours" in msg


@pytest.mark.parametrize(("points", "hours"), [(4, 4), (2, 5), (0, 1)])
def test_app_consistent_must_be_less_than_points(points: int, hours: int) -> None:
    msg = refused(recovery_points=points, app_consistent_frequency_hours=hours)
    assert f"app_consistent_frequency_hours ({hours}) must be less than recovery_points" in msg


def test_kerberos_default_port() -> None:
    assert settings(authentication="kerberos").port == 8083
    assert settings(authentication="kerberos", port=9000).port == 9000


@pytest.mark.parametrize("port", [0, 65536, -1])
def test_port_out_of_range(port: int) -> None:
    assert "port must be 1..65535" in refused(port=port)


def test_unknown_authentication() -> None:
    assert "'certificate' or 'kerberos'" in refused(authentication="ntlm")


def test_scheduled_needs_a_start() -> None:
    msg = refused(initial_replication="online_scheduled")
    assert "online_scheduled needs initial_replication_start_at" in msg


def test_start_only_with_scheduled() -> None:
    msg = refused(initial_replication_start_at=NOW.isoformat())
    assert "only used with initial_replication online_scheduled" in msg


def test_start_must_be_aware() -> None:
    msg = refused(
        initial_replication="online_scheduled", initial_replication_start_at="2030-01-01T12:00:00"
    )
    assert "timezone" in msg


def test_offline_needs_both_paths() -> None:
    msg = refused(initial_replication="offline")
    assert "offline needs offline_export_path" in msg
    assert "offline needs offline_import_path" in msg
    msg = refused(initial_replication="offline", offline_export_path="/exp")
    assert "offline needs offline_import_path" in msg
    assert "offline_export_path" not in msg.replace("offline needs offline_import_path", "")
    ok = settings(initial_replication="offline", offline_export_path="/e", offline_import_path="/i")
    assert ok.offline_import_path == "/i"


@pytest.mark.parametrize(
    ("path", "wanted"),
    [("../../../etc", "absolute"), ("exports", "absolute"), ("/exp/../etc", "'..'")],
)
def test_offline_paths_are_absolute_without_traversal(path: str, wanted: str) -> None:
    msg = refused(initial_replication="offline", offline_export_path=path, offline_import_path="/i")
    assert "offline_export_path" in msg and wanted in msg
    msg = refused(initial_replication="offline", offline_export_path="/e", offline_import_path=path)
    assert "offline_import_path" in msg and wanted in msg
    ok = settings(
        initial_replication="offline",
        offline_export_path="C:\\exports",
        offline_import_path="\\\\srv\\imports",
    )
    assert ok.offline_export_path == "C:\\exports"


def test_paths_only_with_offline() -> None:
    assert "only used with initial_replication offline" in refused(offline_export_path="/e")


def test_unknown_setting_rejected() -> None:
    assert "Extra inputs are not permitted" in refused(rpo=5)


def test_schedule_window() -> None:
    def at(delta: timedelta) -> ReplicationPolicySettings:
        return settings(
            initial_replication="online_scheduled",
            initial_replication_start_at=(NOW + delta).isoformat(),
        )

    assert at(timedelta(hours=1)).schedule_problem(NOW) is None
    assert at(timedelta(hours=24)).schedule_problem(NOW) is None
    past = at(-timedelta(minutes=1)).schedule_problem(NOW)
    assert past is not None and "is in the past" in past
    far = at(timedelta(hours=24, seconds=1)).schedule_problem(NOW)
    assert far is not None and "more than 24 h ahead" in far
    with pytest.raises(domain.Invalid, match="more than 24 h ahead"):
        domain.check_schedule(at(timedelta(hours=30)), NOW)
    assert settings().schedule_problem(NOW) is None


def test_updated_settings_merges_and_revalidates() -> None:
    current = settings(recovery_points=10, app_consistent_frequency_hours=4)
    merged = domain.updated_settings(current, {"copy_frequency_seconds": 30})
    assert merged.copy_frequency_seconds == 30 and merged.recovery_points == 10
    with pytest.raises(domain.Invalid, match="must be less than recovery_points"):
        domain.updated_settings(current, {"recovery_points": 3})
    kerberos = domain.updated_settings(current, {"authentication": "kerberos"})
    assert kerberos.port == 8083
    offline = settings(
        initial_replication="offline", offline_export_path="/e", offline_import_path="/i"
    )
    online = domain.updated_settings(offline, {"initial_replication": "online_now"})
    assert online.offline_export_path is None and online.offline_import_path is None
    with pytest.raises(domain.Invalid, match="unknown setting 'bogus'"):
        domain.updated_settings(current, {"bogus": 1})


def test_policy_event_round_trip() -> None:
    policy = Policy(
        policy_id="6f1c2a52-8e2a-4f7e-9a51-1d1f0e0c0b0a",
        name="gold",
        settings=settings(copy_frequency_seconds=30, recovery_points=24),
        version=1,
        created_at=NOW,
        updated_at=NOW,
    )
    env = new_envelope(
        PolicyCreated(policy=policy),
        vault_id="6f1c2a52-8e2a-4f7e-9a51-1d1f0e0c0b0b",
        producer_id="service:policy",
    )
    et = payload_model(env.type, env.schema_version)
    assert et is not None and et.topic == "policy.events.v1" == topic_of(PolicyCreated)
    parsed = et.model.model_validate(env.payload)
    assert isinstance(parsed, PolicyCreated) and parsed.policy.settings.port == 8084
