"""Where a benchmark result came from: the git commit of the code that produced it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent


def git_sha() -> str | None:
    """``GIT_SHA`` when set (the device's copy of the tree has no usable .git: pass
    GIT_SHA=$(git rev-parse HEAD)), else ``git rev-parse HEAD`` of this checkout, else None."""
    explicit = os.environ.get("GIT_SHA")
    if explicit:
        return explicit
    try:
        found = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=_ROOT)
    except (OSError, subprocess.CalledProcessError):
        return None
    return found.stdout.strip() or None
