"""The test tools `make` builds outside the repository, in $BBR_TOOLS (never committed)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest


def tool(
    name: str, *, target: str | None = None, env: str | None = None, path: bool = False
) -> str:
    """The `name` that `make TARGET` installed in $BBR_TOOLS/bin, else `$ENV`'s, else (with
    `path`) one on PATH; a missing tool fails the test naming the make target, never skips."""
    target = target or name
    explicit = os.environ.get(env) if env else None
    if explicit:
        if not os.access(explicit, os.X_OK):
            pytest.fail(f"{env}={explicit} is not an executable: run `make {target}`")
        return explicit
    tools = Path(os.environ.get("BBR_TOOLS") or Path.home() / ".cache" / "bbr-tools")
    installed = tools / "bin" / name
    if installed.is_file() and os.access(installed, os.X_OK):
        return str(installed)
    found = shutil.which(name) if path else None
    if found:
        return found
    pytest.fail(f"{name} not found at {installed}: run `make {target}`")
