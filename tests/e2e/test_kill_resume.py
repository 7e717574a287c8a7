"""A `dvc repro` killed with SIGKILL in the middle of a stage, then run again, ends with the same
outputs as an uninterrupted run and leaves no MLflow run RUNNING.

Kept short: the tiny repository copy (tests/e2e/params_tiny.yaml) and only the stages up to
`validate` (prepare, validate), which log MLflow runs. The kill lands while a stage's MLflow run is
open (the store is polled for a RUNNING run), the worst moment for the store.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from test_pipeline import BIN, init_tiny_repository, pipeline_env, run  # tests/e2e/test_pipeline.py

pytestmark = pytest.mark.e2e

TARGET = "validate"
KILL_WAIT_S = 600


def _running_runs(db: Path) -> list[tuple[str, str]]:
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as connection:
            return connection.execute("SELECT run_uuid, name FROM runs WHERE status = 'RUNNING'").fetchall()
    except sqlite3.OperationalError:  # tables not created yet, or the writer holds the lock
        return []


# Great Expectations writes its run time and run id into results.json and the Data Docs, so those
# differ between any two runs; every other output of the two stages is deterministic.
UNREPEATABLE = {"reports/validation/results.json", "reports/validation/data_docs"}


def _outputs(repo: Path) -> dict[str, str]:
    """DVC's md5 of every repeatable output of the reproduced stages, from dvc.lock."""
    stages = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    outputs = {out["path"]: out["md5"] for name in ("prepare", TARGET) for out in stages[name]["outs"]}
    assert {"data/prepared", "reports/validation/summary.json", "reports/validation/details.json"} <= set(outputs)
    return {path: md5 for path, md5 in outputs.items() if path not in UNREPEATABLE}


def test_killed_repro_then_repro_matches_an_uninterrupted_run(tmp_path):
    repo, store = tmp_path / "repo", tmp_path / "store"
    repo.mkdir()
    store.mkdir()
    env = pipeline_env(repo, store)
    init_tiny_repository(repo, env)
    db = store / "mlflow.db"

    # 1. kill the whole `dvc repro` process group while a stage has an MLflow run open
    process = subprocess.Popen([str(BIN / "dvc"), "repro", TARGET], cwd=repo, env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + KILL_WAIT_S
    while not _running_runs(db):
        assert process.poll() is None, "`dvc repro` ended before any MLflow run was seen open"
        assert time.monotonic() < deadline, "no MLflow run opened in time"
        time.sleep(0.05)
    killed = _running_runs(db)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert _running_runs(db), "the killed run should still read RUNNING before the next start"

    # 2. the next `dvc repro` finishes and ends the killed run
    run([str(BIN / "dvc"), "repro", TARGET], repo, env)
    assert _running_runs(db) == []
    with sqlite3.connect(db) as connection:
        statuses = dict(connection.execute("SELECT run_uuid, status FROM runs").fetchall())
    assert {statuses[run_id] for run_id, _ in killed} == {"KILLED"}
    after_kill = _outputs(repo)

    # 3. an uninterrupted run of the same stages writes the same outputs
    run([str(BIN / "dvc"), "repro", "--force", TARGET], repo, env)
    assert _outputs(repo) == after_kill
    status = run([str(BIN / "dvc"), "status", TARGET], repo, env).stdout
    assert "changed" not in status, status


def test_dvc_exp_show_only_changed_is_readable_after_two_experiments(tmp_path):
    """Two experiments differing in the blank-image rule: `dvc exp show --only-changed` shows the
    changed parameter and the metric it changed (the validate summary's `warnings`), and fits a
    terminal."""
    repo, store = tmp_path / "repo", tmp_path / "store"
    repo.mkdir()
    store.mkdir()
    env = pipeline_env(repo, store)
    init_tiny_repository(repo, env)
    run([str(BIN / "dvc"), "repro", TARGET], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "baseline"], repo, env)
    warn_only = "validate.fail_on=[readable,complete,labels,size,mode,class_counts,leakage_exact,leakage_near]"
    experiments = {"strict": ["-S", "validate.blank_max_std=0.005"],
                   "warns": ["-S", "validate.blank_max_std=0.26", "-S", warn_only]}  # phantom slices: std ~0.25
    for name, settings in experiments.items():
        run([str(BIN / "dvc"), "exp", "run", "-n", name, *settings, TARGET], repo, env)
    shown = run([str(BIN / "dvc"), "exp", "show", "--only-changed", "--no-pager"], repo, env | {"COLUMNS": "200"}).stdout
    assert all(word in shown for word in ("blank_max_std", "warnings", "strict", "warns")), shown
    assert "images_train" not in shown, shown  # unchanged columns are hidden
    assert max(len(line) for line in shown.splitlines()) <= 200, shown
