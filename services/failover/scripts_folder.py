"""The failover service's scripts folder (`DR_FAILOVER_SCRIPTS_DIR`): a plan's script action
names a file in it, checked when the plan is saved and again when the script runs."""

from __future__ import annotations

import os
import re
from pathlib import Path

from services.failover.domain.plans import SCRIPT_NAME


def script_file(folder: Path, name: str) -> Path:
    """The script `name` of the scripts folder, resolved after following links; raises
    ValueError unless it is an executable file inside the folder."""
    if not re.fullmatch(SCRIPT_NAME, name) or ".." in name:
        raise ValueError(f"'{name}' is not a script name (a file name, no path)")
    root = folder.resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root) or path == root:
        raise ValueError(f"script '{name}' resolves outside the scripts folder")
    if not path.is_file():
        raise ValueError(f"script '{name}' is not a file in the scripts folder {folder}")
    if not os.access(path, os.X_OK):
        raise ValueError(f"script '{name}' in the scripts folder is not executable")
    return path
