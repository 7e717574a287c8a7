"""Queued DVC experiments writing to one `mlflow server` (SQLite takes one writer at a time).

Two experiments that differ in a parameter are queued with `dvc exp run --queue -S ...` on the tiny
repository copy, run by `dvc queue start -j 2`, and both are then found in MLflow by the
dvc_exp_name tag that ctsynth.tracking sets from DVC_EXP_NAME. Only the `prepare` stage is queued
(it logs an MLflow run and is cheap): the point is the queue and the shared store, not the study.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from _mlflow_server import mlflow_server as start_mlflow_server  # tests/e2e/_mlflow_server.py
from test_pipeline import BIN, init_tiny_repository, pipeline_env, run  # tests/e2e/test_pipeline.py

pytestmark = pytest.mark.e2e

QUEUE_TIMEOUT_S = 600
EXPERIMENTS = {"tiny-res32": 32, "tiny-res24": 24}


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1 (SQLite backend, artifacts served from a folder): its URL."""
    with start_mlflow_server(f"sqlite:///{tmp_path / 'server.db'}", tmp_path) as url:
        yield url


def _queue_states(repo: Path, env: dict[str, str]) -> list[tuple[str, str]]:
    """(experiment name, status) rows of `dvc queue status`."""
    out = run([str(BIN / "dvc"), "queue", "status"], repo, env).stdout
    rows = []
    for line in out.splitlines()[1:]:
        fields = line.split()
        status = next((f for f in fields if f in ("Queued", "Running", "Success", "Failed")), None)
        if status and len(fields) >= 2:
            rows.append((fields[1], status))
    return rows


def queue_env(repo: Path, store: Path, tracking_uri: str) -> dict[str, str]:
    # PYTHONPATH relative: each queued experiment runs its stages in its own temporary copy (the cwd)
    return pipeline_env(repo, store) | {"MLFLOW_TRACKING_URI": tracking_uri, "PYTHONPATH": f"src{os.pathsep}."}


def test_two_queued_experiments_land_in_one_mlflow_server(tmp_path, mlflow_server):
    repo = tmp_path / "repo"
    repo.mkdir()
    env = queue_env(repo, tmp_path, mlflow_server)
    init_tiny_repository(repo, env)
    run_two_queued_experiments(repo, env, mlflow_server)


def run_two_queued_experiments(repo: Path, env: dict[str, str], tracking_uri: str) -> None:
    """Queue, run with 2 workers, and check DVC's and MLflow's records of both experiments."""
    from mlflow import MlflowClient

    mlflow_server = tracking_uri
    for name, resolution in EXPERIMENTS.items():
        run([str(BIN / "dvc"), "exp", "run", "--queue", "-n", name, "-S", f"data.resolution={resolution}", "prepare"], repo, env)
    assert {n for n, s in _queue_states(repo, env) if s == "Queued"} == set(EXPERIMENTS)

    run([str(BIN / "dvc"), "queue", "start", "-j", "2"], repo, env)
    deadline = time.monotonic() + QUEUE_TIMEOUT_S
    while True:
        states = dict(_queue_states(repo, env))
        if all(states.get(name) in ("Success", "Failed") for name in EXPERIMENTS):
            break
        assert time.monotonic() < deadline, f"queue not done after {QUEUE_TIMEOUT_S} s: {states}"
        time.sleep(3)
    failed = [name for name in EXPERIMENTS if states[name] != "Success"]
    if failed:
        logs = {name: run([str(BIN / "dvc"), "queue", "logs", name], repo, env, check=False).stdout[-3000:] for name in failed}
        raise AssertionError(f"queued experiments failed: {logs}")

    # both experiments' results are in the repository's experiment refs, with their own params
    shown = run([str(BIN / "dvc"), "exp", "show", "--json"], repo, env).stdout
    for name, resolution in EXPERIMENTS.items():
        assert name in shown
    # and both wrote to the one MLflow server, tagged with their experiment name
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("ctsynth-data")
    assert experiment is not None, "no ctsynth-data experiment on the server"
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.dvc_exp_name != ''")
    by_name = {r.data.tags["dvc_exp_name"]: r for r in runs}
    assert set(EXPERIMENTS) <= set(by_name), f"runs tagged {sorted(by_name)}"
    for name, resolution in EXPERIMENTS.items():
        assert by_name[name].data.params["resolution"] == str(resolution)
        assert by_name[name].data.tags.get("dvc_stage") == "prepare"
    assert yaml.safe_load((repo / "params.yaml").read_text())["data"]["resolution"] == 32  # workspace untouched


LOG_SAME_DATA = """
import sys, time
from pathlib import Path
from ctsynth import tracking
root, data, start_at = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
with tracking.start_run(tracking.EXPERIMENT_DATA, "same-data", root=root):
    time.sleep(max(0.0, start_at - time.time()))
    tracking.log_lineage([data], context="source", root=root)
"""


def test_runs_logging_the_same_data_at_the_same_moment_all_succeed(tmp_path, mlflow_server):
    """Two queued experiments prepare the same `data/raw` at once: the store's insert of the
    dataset races between them, and neither stage may fail for it."""
    import mlflow
    from mlflow import MlflowClient

    from ctsynth import tracking

    env = os.environ | {"MLFLOW_TRACKING_URI": mlflow_server, "PYTHONPATH": str(Path(tracking.__file__).parents[1])}
    rounds, processes_per_round = 4, 6
    for round_ in range(rounds):
        # a new dataset each round (a race needs one the store has not seen), logged by every
        # process at once, once each has its run
        start_at = time.time() + 15
        processes = [subprocess.Popen([sys.executable, "-c", LOG_SAME_DATA, str(tmp_path), f"data/raw-{round_}", str(start_at)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                     for _ in range(processes_per_round)]
        outputs = [p.communicate(timeout=180)[0] for p in processes]
        failed = [out[-2000:] for p, out in zip(processes, outputs) if p.returncode != 0]
        assert not failed, failed

    mlflow.set_tracking_uri(mlflow_server)
    experiment = MlflowClient().get_experiment_by_name(tracking.EXPERIMENT_DATA)
    runs = MlflowClient().search_runs([experiment.experiment_id])
    assert len(runs) == rounds * processes_per_round
    assert sorted(d.dataset.name for run in runs for d in run.inputs.dataset_inputs) == sorted(
        f"data/raw-{round_}" for round_ in range(rounds) for _ in range(processes_per_round))
