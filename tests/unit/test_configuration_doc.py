"""docs/configuration.md lists exactly the variables and defaults the code reads."""

from __future__ import annotations

from scripts import config_doc


def test_configuration_doc_is_up_to_date() -> None:
    assert config_doc.TARGET.read_text() == config_doc.render(), (
        "docs/configuration.md is stale: run `.venv/bin/python -m scripts.config_doc`"
    )


def test_every_service_has_settings() -> None:
    packages = {name for name, _ in config_doc.settings_classes()}
    assert {"registration", "host_agent", "site_provider"} <= packages


def test_a_service_needs_a_strong_admin_token() -> None:
    from pydantic import SecretStr

    from shared.settings import ServiceSettings

    def problem(token: str | None) -> str | None:
        secret = SecretStr(token) if token is not None else None
        return ServiceSettings(DR_ADMIN_TOKEN=secret).admin_token_problem()

    assert "not set" in (problem(None) or "")
    assert "not set" in (problem("") or "")
    assert "too weak" in (problem("x" * 31) or "")
    assert "too weak" in (problem("ab" * 20) or "")
    assert problem("drt_" + "Zx8-Qa1_Lm4Pk7Rt2Wv9Yb3Nc6Hd5Jf0") is None
