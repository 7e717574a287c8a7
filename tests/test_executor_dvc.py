"""DVC stays the source of truth for the sweep: the repository's own `train_classifier` stage, run by a
real `dvc repro` in a temporary git + DVC repository on tiny data. After it `dvc status` is clean, a
second `dvc repro` runs nothing, and changing one seed reruns only that seed's items."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from _classifier_data import write_prepared, write_synthetic
from test_executor import TINY

from ctsynth.config import Params

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STAGE = "train_classifier"


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(cmd)} exited {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout + result.stderr


def write_params(repo: Path, seeds: list[int]) -> None:
    values = json.loads(json.dumps(TINY))
    values["classifier"]["feature_cache"] = ".cache/features"
    values["sweep"]["seeds"] = seeds
    full = Params.model_validate(values).model_dump(mode="json", by_alias=True)  # every section, as a real params.yaml
    (repo / "params.yaml").write_text(yaml.safe_dump(full, sort_keys=False))


def test_dvc_repro_reuses_items_and_reruns_only_a_changed_seed(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {STAGE: stages[STAGE]}}, sort_keys=False))
    # the code the stage runs: all of src/ (its deps are part of it) and the stage's script
    shutil.copytree(REPO / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (repo / "pipelines").mkdir()
    shutil.copy2(REPO / "pipelines" / f"{STAGE}.py", repo / "pipelines")
    write_prepared(repo, {"train": (12, 12), "valid": (4, 4), "test": (5, 5)}, size=16)
    write_synthetic(repo, per_class=8, size=16)
    # the stage depends on the oracle stage's folder; these items (arm synthetic) never read it
    (repo / "data" / "oracle").mkdir(parents=True)
    (repo / "data" / "oracle" / "NOTE").write_text("no oracle pool: the oracle arm is not in this sweep\n")
    write_params(repo, seeds=[0, 1])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_"))}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(repo / "src"),
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", OMP_NUM_THREADS="1",
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t.invalid", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t.invalid")
    run(["git", "init", "-q"], repo, env)
    run([str(BIN / "dvc"), "init", "-q"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "tiny"], repo, env)

    first = run([str(BIN / "dvc"), "repro"], repo, env)
    assert f"Running stage '{STAGE}'" in first and "4 to run" in first, first[-3000:]
    assert "Data and pipelines are up to date" in run([str(BIN / "dvc"), "status"], repo, env)
    second = run([str(BIN / "dvc"), "repro"], repo, env)
    assert "Running stage" not in second, second[-3000:]
    before = {p.name: p.stat().st_mtime_ns for p in (repo / "metrics/sweep").glob("*.json")}

    write_params(repo, seeds=[0, 2])
    third = run([str(BIN / "dvc"), "repro"], repo, env)
    assert f"Running stage '{STAGE}'" in third and "2 reused from earlier runs, 2 to run" in third, third[-3000:]
    after = {p.name: p.stat().st_mtime_ns for p in (repo / "metrics/sweep").glob("*.json")}
    assert sorted(after) == ["real_r0.0_s0.json", "real_r0.0_s2.json", "synthetic_r0.5_s0.json", "synthetic_r0.5_s2.json"]
    assert all(after[name] == before[name] for name in ("real_r0.0_s0.json", "synthetic_r0.5_s0.json"))  # reused, untouched
    assert "Data and pipelines are up to date" in run([str(BIN / "dvc"), "status"], repo, env)
