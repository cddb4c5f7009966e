"""The operations docs stay true to the code: every DLQ reason the code can raise is in the
troubleshooting table, and the pages link to what exists."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"


def dlq_reasons_in_code() -> set[str]:
    reasons: set[str] = set()
    for folder in ("shared", "services"):
        for path in (REPO / folder).rglob("*.py"):
            reasons.update(re.findall(r'Rejected\(\s*"(\w+)"', path.read_text()))
    return reasons


def test_every_dlq_reason_is_documented() -> None:
    text = (DOCS / "troubleshooting.md").read_text()
    documented = set(re.findall(r"^\| `(\w+)` \|", text, re.MULTILINE))
    missing = dlq_reasons_in_code() - documented
    assert not missing, f"add these DLQ reasons to docs/troubleshooting.md: {sorted(missing)}"


def test_relative_links_resolve() -> None:
    for page in (
        "operator-guide.md",
        "troubleshooting.md",
        "publishing-events.md",
        "architecture.md",
    ):
        text = (DOCS / page).read_text()
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
            assert (DOCS / target).exists(), f"{page} links to missing {target}"
