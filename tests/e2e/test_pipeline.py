"""The whole study end to end on a tiny params variant (tests/e2e/params_tiny.yaml).

A temporary copy of the repository's tracked files becomes its own git + DVC repository with a tiny
phantom set in data/raw (`dvc add data/raw`, as a user does with the Kaggle data); then a real
`dvc repro` runs EVERY stage of dvc.yaml into a temporary MLflow SQLite store, a second `dvc repro`
must do nothing, the report is rendered, and a real `bentoml serve` of the registered champion
answers POST /predict.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TINY_PARAMS = Path(__file__).with_name("params_tiny.yaml")
# A few phantom slices per class: enough for 2 seeds x 2 ratios, a GAN tick and the statistics.
TINY_COUNTS = {"train": {"normal": 12, "squamous": 12}, "valid": {"normal": 4, "squamous": 4}, "test": {"normal": 6, "squamous": 6}}
REPRO_TIMEOUT_S = 1200


# Untracked files in these folders are copied too: in a shared working tree, a tracked module may
# already import a new, not yet committed one. A fresh clone has none, so CI copies exactly the clone.
CODE_FOLDERS = ("src/", "pipelines/", "serving/", "params/")


def tracked_files(repo: Path) -> list[str]:
    """The files a fresh clone would have (plus new code files), as they are in the working tree now."""
    def ls(*args: str) -> list[str]:
        out = subprocess.run(["git", "ls-files", "-z", *args], cwd=repo, capture_output=True, check=True).stdout
        return [name for name in out.decode().split("\0") if name and (repo / name).is_file()]

    new_code = [name for name in ls("--others", "--exclude-standard") if name.startswith(CODE_FOLDERS)]
    return sorted(set(ls()) | set(new_code))


def copy_repository(source: Path, target: Path) -> None:
    for name in tracked_files(source):
        destination = target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / name, destination)


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}\n--- stdout\n{result.stdout[-6000:]}\n--- stderr\n{result.stderr[-6000:]}")
    return result


def pipeline_env(repo: Path, store: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_", "CTSYNTH_", "BENTOML_"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # dvc.yaml's `python` is this venv's
        PYTHONPATH=f"{repo / 'src'}{os.pathsep}{repo}",  # the copy's code, not the editable install's
        MLFLOW_TRACKING_URI=f"sqlite:///{store / 'mlflow.db'}",
        OMP_NUM_THREADS="1",
        GIT_AUTHOR_NAME="ctsynth e2e", GIT_AUTHOR_EMAIL="e2e@ctsynth.invalid",
        GIT_COMMITTER_NAME="ctsynth e2e", GIT_COMMITTER_EMAIL="e2e@ctsynth.invalid",
    )
    return env


def init_tiny_repository(repo: Path, env: dict[str, str]) -> None:
    from ctsynth.data.phantom import write_phantom_dataset

    copy_repository(REPO, repo)
    shutil.copy(TINY_PARAMS, repo / "params.yaml")
    write_phantom_dataset(repo / "data" / "raw", seed=0, workers=1, counts=TINY_COUNTS)
    run(["git", "init", "-q"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "tiny copy"], repo, env)
    run([str(BIN / "dvc"), "add", "data/raw"], repo, env)  # the README's step for the Kaggle data
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "tiny data"], repo, env)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """(repository copy, environment, first repro's output, its seconds) after one full `dvc repro`."""
    repo = tmp_path_factory.mktemp("repo")
    store = tmp_path_factory.mktemp("mlflow")
    env = pipeline_env(repo, store)
    init_tiny_repository(repo, env)
    started = time.monotonic()
    result = run([str(BIN / "dvc"), "repro"], repo, env, timeout=REPRO_TIMEOUT_S)
    seconds = time.monotonic() - started
    print(f"\n`dvc repro` of the tiny study took {seconds:.0f} s")
    return repo, env, result.stdout + result.stderr, seconds


def test_every_stage_ran_and_wrote_its_outputs(study):
    repo, _, output, _ = study
    stages = list(yaml.safe_load((repo / "dvc.yaml").read_text())["stages"])
    for stage in stages:
        assert f"Running stage '{stage}" in output, f"stage {stage} did not run:\n{output[-4000:]}"
    params = yaml.safe_load(TINY_PARAMS.read_text())
    expected = [
        "data/prepared/manifest.csv",
        "reports/validation/summary.json",
        "models/gan/network-final.pt",
        "reports/gan/real_vs_synthetic.png",
        "reports/gan/losses.png",
        "reports/gan/ada_p.png",
        "data/synthetic/manifest.csv",
        "reports/synthetic/metrics.json",
        "reports/synthetic/nearest_neighbours.png",
        "reports/sweep.csv",
        "plots/ratio_vs_metric.png",
        "models/classifier/model.onnx",
        "metrics/summary.json",
        "reports/summary.html",
    ]
    from ctsynth.classifier.sweep import sweep_items
    from ctsynth.config import load_params

    expected += [f"metrics/sweep/{item.name}.json" for item in sweep_items(load_params(TINY_PARAMS))]
    missing = [name for name in expected if not (repo / name).is_file()]
    assert not missing, f"missing outputs: {missing}"
    assert json.loads((repo / "reports/validation/summary.json").read_text())["success"] == 1  # DVC metrics: numbers only
    synthetic_pngs = list((repo / "data/synthetic").rglob("*.png"))
    assert len(synthetic_pngs) == params["generate"]["per_class"] * len(params["data"]["classes"])


def test_sweep_summary_and_registered_champion(study):
    repo, env, _, _ = study
    from mlflow import MlflowClient

    from ctsynth.classifier.sweep import sweep_items
    from ctsynth.config import load_params

    params = yaml.safe_load(TINY_PARAMS.read_text())
    summary = json.loads((repo / "metrics/summary.json").read_text())
    assert summary and all(isinstance(v, (int, float)) for v in summary.values())  # DVC metrics: numbers only
    assert {"real", "synthetic", "duplicate", "gan_test", "champion_test"} <= set(summary)
    details = json.loads((repo / "reports/study.json").read_text())
    assert details["n_items"] == len(sweep_items(load_params(TINY_PARAMS)))  # every arm x ratio x seed
    assert {c["arm"] for c in details["comparisons"]} >= {"synthetic", "oracle"} and details["verdicts"]
    champion = details["champion"]
    registered = champion["registered"]
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"], registry_uri=env["MLFLOW_TRACKING_URI"])
    version = client.get_model_version_by_alias("ctsynth-classifier", "champion")
    assert registered["name"] == "ctsynth-classifier" and str(version.version) == str(registered["version"])
    assert version.tags.get("source_run_id") == champion["run_id"] and version.tags.get("arm") == champion["arm"]
    # the exported ONNX file over the prepared test split (the report's path) gives the champion's test metrics
    from ctsynth.report import evaluate_onnx_on_split

    evaluation = evaluate_onnx_on_split(repo / "models/classifier/model.onnx", repo / "data/prepared", "test", params["data"]["classes"])
    for metric in ("accuracy", "balanced_accuracy", "roc_auc"):
        assert evaluation.metrics[metric] == pytest.approx(champion["test"][metric], abs=1e-6), metric


def _locked_md5(repo: Path, stage: str, path: str) -> str:
    """DVC's hash of an output of `stage`, as dvc.lock records it."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return next(out["md5"] for out in lock["stages"][stage]["outs"] if out["path"] == path)


def test_the_champion_walks_back_to_its_data_and_the_generator_behind_synthetic_images(study, monkeypatch):
    repo, env, _, _ = study
    from mlflow import MlflowClient

    from ctsynth import tracking
    from ctsynth.paths import file_md5
    from ctsynth.registry import GENERATOR_MODEL, lineage, run_lineage

    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    prepared, synthetic = _locked_md5(repo, "prepare", "data/prepared"), _locked_md5(repo, "generate", "data/synthetic")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()

    champion = lineage(root=repo)
    study_details = json.loads((repo / "reports/study.json").read_text())["champion"]
    assert champion["run"]["id"] == study_details["run_id"] and champion["run"]["git_commit"] == commit
    assert {d["path"]: d["digest"] for d in champion["data"]}["data/prepared"] == prepared

    # an item that trained on synthetic images leads to the registered generator that made them
    client = MlflowClient()
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT_CLASSIFIER)
    synthetic_runs = client.search_runs([experiment.experiment_id], "tags.arm = 'synthetic' and tags.ratio != '0.0'")
    assert synthetic_runs
    walked = run_lineage(synthetic_runs[0].info.run_id)
    assert {d["path"]: d["digest"] for d in walked["data"]} == {"data/prepared": prepared, "data/synthetic": synthetic}
    [generator] = walked["generators"]
    latest = client.get_model_version_by_alias(GENERATOR_MODEL, "latest")
    assert generator["network_md5"] == file_md5(repo / "models/gan/network-final.pt")
    assert generator["version"] == str(latest.version) and generator["git_commit"] == commit
    assert {d["path"]: d["digest"] for d in generator["data"]}["data/prepared"] == prepared
    # the command a user types prints the same walk
    printed = run([str(BIN / "ctsynth"), "lineage"], repo, env).stdout
    assert json.loads(printed) == champion


def test_report_is_self_contained_and_logged_to_the_sweep_parent_run(study):
    repo, env, _, _ = study
    from mlflow import MlflowClient

    page = (repo / "reports/summary.html").read_text()
    for heading in ("Data validation", "GAN training", "Synthetic-data quality", "The study: arms x ratios x seeds", "Champion classifier"):
        assert heading in page
    # 3 GAN figures, nearest neighbours, class-signal plot, arms plot, confusion, ROC
    assert page.count("data:image/png;base64,") == 8
    assert "src=\"http" not in page and "href=\"http" not in page  # nothing to fetch
    parent = json.loads((repo / "reports/study.json").read_text())["champion"]["run_id"]
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    parent_run_id = client.get_run(parent).data.tags["mlflow.parentRunId"]
    logged = [a.path for a in client.list_artifacts(parent_run_id, "report")]
    assert "report/summary.html" in logged


def test_second_repro_does_nothing(study):
    repo, env, _, _ = study
    status = run([str(BIN / "dvc"), "status"], repo, env)
    assert "Data and pipelines are up to date" in status.stdout, status.stdout
    again = run([str(BIN / "dvc"), "repro"], repo, env)
    assert "Running stage" not in again.stdout, again.stdout[-4000:]


def test_served_champion_answers_predict(study, tmp_path):
    repo, env, _, _ = study
    from test_service import GOOD_PNG, Server  # tests/e2e/test_service.py: the serving tests' real server

    server_env = {k: v for k, v in env.items() if k != "PYTHONPATH"} | {
        "DVC_ROOT": str(repo),
        "CTSYNTH_ORT_DEVICE": "cpu",
        "BENTOML_HOME": str(tmp_path / "bentoml"),
        "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}",
    }
    server = Server(server_env, tmp_path / "server.log")
    try:
        server.wait_ready()
        response = server.predict(files={"image": GOOD_PNG})
        assert response.status_code == 200, response.text
        body = response.json()
        classes = yaml.safe_load(TINY_PARAMS.read_text())["data"]["classes"]
        assert body["label"] in classes
        assert list(body["probabilities"]) == classes
        assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        registered = json.loads((repo / "reports/study.json").read_text())["champion"]["registered"]
        assert body["model"] == {"name": "ctsynth-classifier", "version": str(registered["version"])}
    finally:
        server.stop()


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="headless Chromium not installed (Debian: apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(study, tmp_path):
    """The page opens in a real browser with no network, and the screenshot is not blank."""
    import numpy as np
    from PIL import Image

    repo, _, _, _ = study
    screenshot = tmp_path / "report.png"
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1280,2400", f"--screenshot={screenshot}", (repo / "reports/summary.html").as_uri(),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and screenshot.is_file(), f"chromium exited {result.returncode}:\n{result.stderr[-3000:]}"
    pixels = np.asarray(Image.open(screenshot).convert("L"), dtype=np.float64)
    assert pixels.shape[:2] == (2400, 1280)
    # A blank (all white) or failed page has ~zero variance; text, tables and figures do not.
    assert pixels.std() > 10, f"screenshot looks blank (std {pixels.std():.2f})"
    # the figures are drawn: a good share of the page is neither white nor near-white
    assert (pixels < 200).mean() > 0.02


def test_dvc_shows_metrics_and_plots(study):
    """`dvc metrics show` / `dvc plots diff` / `dvc exp show` (the README's comparison commands) read the outputs."""
    repo, env, _, _ = study
    metrics = run([str(BIN / "dvc"), "metrics", "show", "--json"], repo, env).stdout
    assert "metrics/summary.json" in metrics and "reports/synthetic/metrics.json" in metrics
    plots = run([str(BIN / "dvc"), "plots", "diff", "--json"], repo, env).stdout
    assert "plots/ratio_vs_metric.csv" in plots and "reports/gan/training_log.csv" in plots
    shown = json.loads(run([str(BIN / "dvc"), "exp", "show", "--json"], repo, env).stdout)
    assert shown, "dvc exp show listed nothing"


def test_dvc_exp_run_with_a_changed_param_is_tracked_under_its_name(study):
    """`dvc exp run -S` in the workspace: only the stages the param feeds rerun, and their MLflow run is
    tagged with the experiment's name. Runs last: it changes the workspace's params.yaml."""
    repo, env, _, _ = study
    from mlflow import MlflowClient

    result = run([str(BIN / "dvc"), "exp", "run", "-n", "blank02", "-S", "validate.blank_max_std=0.02", "validate"], repo, env)
    assert "Running stage 'validate'" in result.stdout and "Running stage 'prepare'" not in result.stdout
    assert yaml.safe_load((repo / "params.yaml").read_text())["validate"]["blank_max_std"] == 0.02
    assert "blank02" in run([str(BIN / "dvc"), "exp", "show", "--json"], repo, env).stdout
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("ctsynth-data")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.dvc_exp_name = 'blank02'")
    assert [r.data.tags.get("dvc_stage") for r in runs] == ["validate"]
    assert runs[0].data.params["blank_max_std"] == "0.02"
