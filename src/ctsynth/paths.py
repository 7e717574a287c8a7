"""Where the repository is (data, models, params) and where the shared MLflow store is.

The two differ for queued DVC experiments (`dvc exp run --queue`): each runs its stages in a
temporary copy of the repository (the working directory) while ``DVC_ROOT`` names the workspace
the experiment was queued from. Data and params must come from the copy; the default MLflow store
belongs to the workspace, so that every experiment lands in one place.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def repo_root(start: Path | None = None) -> Path:
    """The repository we run in: the nearest folder above the cwd with dvc.yaml or .git."""
    start = (start or Path.cwd()).resolve()
    for candidate in (start, *start.parents):
        if (candidate / "dvc.yaml").exists() or (candidate / ".git").exists():
            return candidate
    return start


def resolve(path: str | Path, root: Path | None = None) -> Path:
    """A path from params.yaml on disk: absolute paths stay as they are, relative ones are taken
    from `root` (default: the repository we run in)."""
    path = Path(path)
    return path if path.is_absolute() else (root or repo_root()) / path


def store_root(repository: Path | None = None) -> Path:
    """Where the default MLflow store lives: the DVC workspace (``DVC_ROOT``) when DVC set one,
    else the repository (`repository`, or the one we run in)."""
    env_root = os.environ.get("DVC_ROOT")
    return Path(env_root).resolve() if env_root else (repository or repo_root())


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


def file_md5(path: Path | str, chunk: int = 1 << 20) -> str:
    """md5 of a file's bytes: what DVC records as the file's hash, so a file's identity can be
    compared with dvc.lock and with MLflow tags written from it."""
    import hashlib

    digest = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
