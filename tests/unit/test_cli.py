"""The CLI without services: URL resolution, argument parsing, tables, usage errors."""

from __future__ import annotations

import io

import pytest

from services.cli import output
from services.cli.__main__ import main
from services.cli.client import service_urls
from services.cli.commands import build_parser


def test_urls_per_service_then_fallback() -> None:
    env = {"DR_URL": "http://gw/", "DR_POLICY_URL": "http://pol:1"}
    urls = service_urls(None, env)
    assert urls == {
        "registration": "http://gw",
        "inventory": "http://gw",
        "policy": "http://pol:1",
        "replication": "http://gw",
        "failover": "http://gw",
    }
    assert set(service_urls("http://x", env).values()) == {"http://x"}
    assert service_urls(None, {})["policy"] == "http://127.0.0.1:8103"


def test_global_options_before_or_after_the_subcommand() -> None:
    parser = build_parser()
    before = parser.parse_args(["--vault", "v1", "--json", "policy", "list"])
    after = parser.parse_args(["policy", "list", "--vault", "v2", "--json"])
    assert (before.vault, before.json) == ("v1", True)
    assert (after.vault, after.json) == ("v2", True)


def test_policy_flags_only_send_what_is_given() -> None:
    from services.cli.commands import _settings_from

    args = build_parser().parse_args(
        ["policy", "create", "gold", "--copy-frequency", "30", "--no-compression"]
    )
    assert _settings_from(args) == {"copy_frequency_seconds": 30, "compression": False}


def test_table_is_aligned() -> None:
    out = io.StringIO()
    rows = [{"a": "x", "b": None}, {"a": "longer", "b": True}]
    output.table(rows, [("A", output.field("a")), ("B", output.field("b"))], out)
    assert out.getvalue().splitlines() == ["A       B", "x       -", "longer  yes"]
    empty = io.StringIO()
    output.table([], [("A", output.field("a"))], empty)
    assert empty.getvalue() == "(none)\n"


def test_usage_errors_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("DR_TOKEN", raising=False)
    monkeypatch.delenv("DR_VAULT", raising=False)
    with pytest.raises(SystemExit) as info:
        main(["policy", "list"])
    assert info.value.code == 2
    assert "an API token is needed" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["--token", "t", "policy", "list"])
    assert info.value.code == 2
    assert "needs a vault" in capsys.readouterr().err


def test_unreachable_service_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--token", "t", "--vault", "v", "--url", "http://127.0.0.1:9", "policy", "list"])
    assert code == 1
    assert "cannot reach the policy service" in capsys.readouterr().err


def test_dr_url_env_does_not_override_per_service_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DR_URL", "http://gw")
    args = build_parser().parse_args(["policy", "list"])
    assert args.url is None  # so service_urls() applies DR_POLICY_URL before DR_URL


def test_revoking_a_producer_needs_a_reason(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["site", "revoke", "p1"])
    assert info.value.code == 2
    assert "--reason" in capsys.readouterr().err
    args = build_parser().parse_args(["site", "revoke", "p1", "--reason", "stolen"])
    assert (args.producer_id, args.reason) == ("p1", "stolen")
