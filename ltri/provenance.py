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
    found = _git("rev-parse", "HEAD")
    if found is None:
        return None
    return found.strip() or None


def git_dirty() -> bool | None:
    """Whether this checkout has uncommitted changes; None when GIT_SHA is given or git is unusable."""
    if os.environ.get("GIT_SHA"):
        return None
    status = _git("status", "--porcelain")
    return None if status is None else bool(status.strip())


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=_ROOT).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
