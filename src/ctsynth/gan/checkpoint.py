"""Training snapshots that survive SIGKILL and load with `torch.load(weights_only=True)`.

A snapshot is a plain dict of tensors, numbers, strings, lists and dicts (no pickled classes), so
loading one never executes code. It is written to a temporary file in the same folder, flushed to
disk, then renamed over the final name: a rename is atomic on POSIX, so a reader sees either the
previous snapshot or the complete new one, never half a file.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

SNAPSHOT_PATTERN = re.compile(r"^snapshot-(\d{9})\.pt$")
FINAL_NETWORK = "network-final.pt"


def snapshot_name(cur_nimg: int) -> str:
    return f"snapshot-{cur_nimg:09d}.pt"


def atomic_torch_save(obj: dict[str, Any], path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    return torch.load(Path(path), map_location=map_location, weights_only=True)


def list_snapshots(folder: Path) -> list[Path]:
    """Snapshots in `folder`, oldest first (by image counter, which is in the name)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if SNAPSHOT_PATTERN.match(p.name)]
    return sorted(found, key=lambda p: int(SNAPSHOT_PATTERN.match(p.name).group(1)))


def newest_loadable_snapshot(folder: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest snapshot that loads; a damaged file (e.g. a disk error) is skipped, not fatal."""
    for path in reversed(list_snapshots(folder)):
        try:
            return path, load_checkpoint(path)
        except Exception as exc:  # torch raises several types for damaged zip archives
            log.warning("snapshot %s could not be loaded (%s); trying an older one", path, exc)
    return None


def prune_snapshots(folder: Path, keep: int) -> None:
    """Keep the newest `keep` snapshots; the disk of a long run does not fill up."""
    if keep <= 0:
        return
    for path in list_snapshots(folder)[:-keep]:
        path.unlink(missing_ok=True)


def clean_stale_temporaries(folder: Path) -> None:
    """Remove half-written temporaries left by a killed writer."""
    folder = Path(folder)
    if folder.is_dir():
        for path in folder.glob(".*.tmp"):
            path.unlink(missing_ok=True)
