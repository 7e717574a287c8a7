"""Where the repository root is, so every stage writes to the same MLflow store and folders.

Queued DVC experiments run in temporary copies of the repository; DVC exports ``DVC_ROOT`` to
point at that copy, and we honour it before falling back to git or the working directory.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def repo_root(start: Path | None = None) -> Path:
    env_root = os.environ.get("DVC_ROOT")
    if env_root:
        return Path(env_root).resolve()
    start = (start or Path.cwd()).resolve()
    for candidate in (start, *start.parents):
        if (candidate / "dvc.yaml").exists() or (candidate / ".git").exists():
            return candidate
    return start


def git_commit(root: Path | None = None) -> str:
    """The commit the code ran from, or 'unknown' outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=root or repo_root(),
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
