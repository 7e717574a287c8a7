"""Scale-out, the part this machine can run: data versioned with DVC travels through a DVC remote.

A local-folder remote stands in for S3/GCS/SSH (same `dvc push` / `dvc pull`, another URL): a fresh
clone of the git repository has only data.dvc, and `dvc pull` brings back byte-identical images.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from ctsynth.data.phantom import write_phantom_dataset

BIN = Path(sys.executable).parent
COUNTS = {"train": {"normal": 2, "squamous": 2}, "valid": {"normal": 1, "squamous": 1}, "test": {"normal": 1, "squamous": 1}}


def _run(cmd: list[str], cwd: Path) -> str:
    env = os.environ | {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t.invalid", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t.invalid"}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{cmd} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_push_to_a_remote_and_pull_into_a_fresh_clone(tmp_path):
    dvc = str(BIN / "dvc")
    origin, remote, clone = tmp_path / "origin", tmp_path / "remote", tmp_path / "clone"
    origin.mkdir()
    _run(["git", "init", "-q"], origin)
    _run([dvc, "init", "-q"], origin)
    write_phantom_dataset(origin / "data" / "raw", seed=3, workers=1, counts=COUNTS)
    _run([dvc, "add", "data/raw"], origin)
    _run([dvc, "remote", "add", "-d", "storage", str(remote)], origin)
    _run(["git", "add", "-A"], origin)
    _run(["git", "commit", "-qm", "data"], origin)
    _run([dvc, "push"], origin)
    assert any(p.is_file() for p in remote.rglob("*")), "nothing was pushed"

    _run(["git", "clone", "-q", str(origin), str(clone)], tmp_path)
    assert not (clone / "data" / "raw").exists()  # git carries only the pointer file
    _run([dvc, "pull"], clone)
    assert _digests(clone / "data" / "raw") == _digests(origin / "data" / "raw")
    assert len(_digests(clone / "data" / "raw")) == sum(sum(c.values()) for c in COUNTS.values())
    shutil.rmtree(origin / ".dvc" / "cache")
    assert "in sync" in _run([dvc, "status", "--cloud"], clone)
