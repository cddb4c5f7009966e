"""Writes docs/configuration.md from the settings classes of every service and edge process,
so the documented variables and defaults are the ones the code reads.
`python -m scripts.config_doc` (a unit test fails when the file is out of date)."""

from __future__ import annotations

import importlib
import pkgutil
import sys

from pydantic_settings import BaseSettings

import services
from kit.procs import REPO

TARGET = REPO / "docs" / "configuration.md"
COMMON = {"KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL"}


def settings_classes() -> list[tuple[str, type[BaseSettings]]]:
    found: list[tuple[str, type[BaseSettings]]] = []
    for info in sorted(pkgutil.iter_modules(services.__path__), key=lambda i: i.name):
        try:
            module = importlib.import_module(f"services.{info.name}.config")
        except ModuleNotFoundError:
            continue
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, BaseSettings)
                and value.__module__ == module.__name__
            ):
                found.append((info.name, value))
    return found


def _rows(cls: type[BaseSettings], skip: set[str]) -> list[str]:
    prefix = str(cls.model_config.get("env_prefix", ""))
    rows = []
    for name, field in cls.model_fields.items():
        env = str(field.validation_alias or f"{prefix}{name}".upper())
        if env in skip:
            continue
        default = field.default
        shown = "(unset)" if default is None else f"`{default}`"
        if field.default_factory is not None:
            shown = "(computed)"
        rows.append(f"| `{env}` | {shown} | {field.description or ''} |")
    return rows


def render() -> str:
    from shared.settings import CommonSettings

    out = [
        "# Configuration",
        "",
        "Every process reads its settings from environment variables; this page is generated",
        "from the settings classes (`python -m scripts.config_doc`).",
        "",
        "## Common to every process",
        "",
        "| variable | default | meaning |",
        "|---|---|---|",
        *_rows(CommonSettings, set()),
    ]
    common_envs = {
        str(f.validation_alias or n.upper()) for n, f in CommonSettings.model_fields.items()
    }
    for package, cls in settings_classes():
        out += [
            "",
            f"## `services.{package}` ({cls.__name__})",
            "",
            "| variable | default | meaning |",
            "|---|---|---|",
            *_rows(cls, common_envs),
        ]
    return "\n".join(out) + "\n"


def main() -> None:
    TARGET.parent.mkdir(exist_ok=True)
    TARGET.write_text(render())
    print(f"wrote {TARGET.relative_to(REPO)}", file=sys.stderr)


if __name__ == "__main__":
    main()
