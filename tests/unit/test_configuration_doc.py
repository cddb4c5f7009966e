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
