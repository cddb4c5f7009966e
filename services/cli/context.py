"""What every CLI command gets (the API client, the vault, the output) and the command types;
apart from the command modules so that they all import it and none imports another."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from services.cli import output
from services.cli.client import Api
from services.cli.output import Column


class UsageError(Exception):
    """A command line that can't be run as given (exit status 2)."""


@dataclass
class Context:
    api: Api
    vault: str | None
    json: bool
    out: TextIO

    def vault_path(self, suffix: str = "") -> str:
        if not self.vault:
            raise UsageError("this command needs a vault: pass --vault VAULT_ID or set DR_VAULT")
        return f"/v1/vaults/{self.vault}{suffix}"

    def rows(self, data: Any, columns: Sequence[Column]) -> None:
        if self.json:
            output.as_json(data, self.out)
        else:
            output.table(data, columns, self.out)

    def record(self, data: Any, keys: Sequence[str] | None = None, note: str = "") -> None:
        if self.json:
            output.as_json(data, self.out)
            return
        output.record(data, self.out, keys)
        if note:
            self.out.write(f"\n{note}\n")


Command = Callable[[Context, argparse.Namespace], None]
