"""A `ctsynth` command and the DVC stage script of the same stage do the same thing.

On the tiny repository copy (tests/e2e/test_pipeline.py builds it), the stage scripts of prepare,
validate, generate and validate_synthetic run first, each as `dvc.yaml`'s cmd runs it, into one
MLflow store; their outputs are hashed and removed; then the `ctsynth` commands of the same stages
run with the options that name the same folders, into a second store. Both rounds run in the same
folder, so that outputs which record a path (the synthetic manifest names its network file) can be
compared byte for byte. The GAN that `generate` samples is trained once, before both rounds.

Compared: the set of output files and their sha256 (the Great Expectations Data Docs and the raw
GX results carry the run's time and id: their file count and the checks are compared instead), and
the MLflow experiments, run names, tag keys, params and metrics of every run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest

from test_pipeline import init_tiny_repository, pipeline_env, run  # tests/e2e/test_pipeline.py

pytestmark = pytest.mark.e2e

PYTHON = sys.executable
OUTPUTS = ("data/prepared", "reports/validation", "data/synthetic", "reports/synthetic")
# GX names its Data Docs pages by the validation run's time, and its raw results hold the run id.
DATA_DOCS = "reports/validation/data_docs/"
GX_RESULTS = "reports/validation/results.json"


def stage_round(repo: Path, env: dict[str, str]) -> None:
    for script in ("prepare", "validate", "generate", "validate_synthetic"):
        run([PYTHON, f"pipelines/{script}.py"], repo, env)


def cli_round(repo: Path, env: dict[str, str]) -> None:
    cli = [PYTHON, "-m", "ctsynth.cli"]
    run([*cli, "prepare", "--raw", "data/raw", "--out", "data/prepared", "--resolution", "32"], repo, env)
    run([*cli, "validate", "--raw", "data/raw", "--prepared", "data/prepared", "--report", "reports/validation"], repo, env)
    run([*cli, "generate", "--network", "models/gan", "--out", "data/synthetic", "--per-class", "16"], repo, env)
    run([*cli, "validate-synthetic", "--synthetic", "data/synthetic", "--prepared", "data/prepared",
         "--report", "reports/synthetic"], repo, env)


def outputs(repo: Path) -> dict[str, str]:
    """sha256 of every output file, by path; Data Docs pages by count, GX results by their checks."""
    found: dict[str, str] = {}
    for folder in OUTPUTS:
        for path in sorted((repo / folder).rglob("*")):
            name = path.relative_to(repo).as_posix()
            if not path.is_file() or name.startswith(DATA_DOCS):
                continue
            data = path.read_bytes()
            if name == GX_RESULTS:
                data = json.dumps(json.loads(data)["checks"], sort_keys=True).encode()
            found[name] = hashlib.sha256(data).hexdigest()
    docs = [p for p in (repo / DATA_DOCS).rglob("*") if p.is_file()]
    found[DATA_DOCS + "(files)"] = str(len(docs))
    found[DATA_DOCS + "index.html exists"] = str((repo / DATA_DOCS / "index.html").is_file())
    return found


def remove_outputs(repo: Path) -> None:
    for folder in OUTPUTS:
        shutil.rmtree(repo / folder)


def mlflow_runs(store: Path) -> list[tuple]:
    """(experiment, run name, tag keys, params, metric keys) of every run, sorted; and the metrics."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    rows = []
    for experiment in client.search_experiments():
        for found in client.search_runs([experiment.experiment_id]):
            data = found.data
            rows.append((experiment.name, found.info.run_name, tuple(sorted(data.tags)), tuple(sorted(data.params.items())),
                         tuple(sorted(data.metrics.items()))))
    return sorted(rows)


@pytest.fixture(scope="module")
def rounds(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    stores = {name: tmp_path_factory.mktemp(f"mlflow-{name}") for name in ("gan", "stage", "cli")}
    init_tiny_repository(repo, pipeline_env(repo, stores["gan"]))
    run([PYTHON, "pipelines/prepare.py"], repo, pipeline_env(repo, stores["gan"]))
    run([PYTHON, "pipelines/train_gan.py"], repo, pipeline_env(repo, stores["gan"]))
    shutil.rmtree(repo / "data/prepared")
    stage_round(repo, pipeline_env(repo, stores["stage"]))
    by_stage = outputs(repo)
    remove_outputs(repo)
    cli_round(repo, pipeline_env(repo, stores["cli"]))
    return by_stage, outputs(repo), mlflow_runs(stores["stage"]), mlflow_runs(stores["cli"])


def test_the_commands_write_the_files_the_stages_write(rounds):
    by_stage, by_cli, _, _ = rounds
    assert len(by_stage) > 50 and "data/synthetic/manifest.csv" in by_stage and "reports/synthetic/metrics.json" in by_stage
    assert sorted(by_cli) == sorted(by_stage), "the command and the stage write different files"
    differing = sorted(name for name in by_stage if by_cli[name] != by_stage[name])
    assert not differing, f"the command and the stage wrote different content: {differing}"


def test_the_commands_log_the_runs_the_stages_log(rounds):
    _, _, stage_runs, cli_runs = rounds
    names = [(experiment, name) for experiment, name, *_ in stage_runs]
    assert names == [("ctsynth-data", "prepare"), ("ctsynth-data", "validate"), ("ctsynth-gan", "validate_synthetic")]
    assert [(e, n) for e, n, *_ in cli_runs] == names
    for stage_run, cli_run in zip(stage_runs, cli_runs):
        experiment, name, tag_keys, params, metrics = stage_run
        assert cli_run[2] == tag_keys, f"{name}: tag keys differ"
        assert cli_run[3] == params, f"{name}: params differ"
        assert [key for key, _ in cli_run[4]] == [key for key, _ in metrics], f"{name}: metric keys differ"
        assert [value for _, value in cli_run[4]] == pytest.approx([value for _, value in metrics], nan_ok=True), f"{name}: metrics differ"
