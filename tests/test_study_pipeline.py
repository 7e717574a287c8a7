"""A tiny study end to end: every arm's items (MLflow children), select's statistics, verdicts,
GAN-test, stale files ignored, and @champion promoted only when better. Real MLflow store."""

import json
import shutil

import pandas as pd
import pytest
from _classifier_data import CLASSES, write_prepared, write_synthetic

from ctsynth.config import Params


def _oracle(root, n=12):
    """A prepared-layout oracle pool of NEW images (other seed than the data set)."""
    made = write_prepared(root / "oracle_tmp", {"train": (n, n)}, size=16, seed=7)
    shutil.move(str(made), root / "data" / "oracle")
    return root / "data" / "oracle"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    write_prepared(root, {"train": (12, 12), "valid": (4, 4), "test": (6, 6)}, size=16)
    write_synthetic(root, per_class=12, size=16)
    _oracle(root)
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
    mp.setenv("DVC_ROOT", str(root))
    params = Params.model_validate({
        "data": {"resolution": 16},
        "classifier": {"resolution": 16, "epochs": 2, "patience": 2, "batch_size": 8, "feature_cache": str(root / "cache")},
        "sweep": {"ratios": [0.0, 0.5], "seeds": [0, 1]},
        "select": {"bootstrap": 200},
    })
    from ctsynth.classifier.sweep import run_sweep_item, sweep_items

    items = sweep_items(params)
    outputs = {item.name: run_sweep_item(params, item, root, progress=False) for item in items}
    yield root, params, items, outputs
    mp.undo()


def test_the_matrix_has_every_arm_and_one_shared_baseline(study):
    _, _, items, _ = study
    names = [item.name for item in items]
    assert names[:2] == ["real_r0.0_s0", "real_r0.0_s1"]
    assert {"synthetic_r0.5_s1", "duplicate_r0.5_s0", "classic_r0.5_s1", "oracle_r0.5_s0", "synthetic_only_r1.0_s1"} <= set(names)
    assert len(names) == 2 + 4 * 2 + 2


def test_item_files_are_flat_metrics_plus_details_and_children_carry_arm_ratio_seed(study):
    from mlflow import MlflowClient

    root, _, _, outputs = study
    out = outputs["classic_r0.5_s1"]
    flat = json.loads(out.metrics_path.read_text())
    assert all(isinstance(v, (int, float)) or v is None for v in flat.values())  # no strings, no nesting
    assert flat["n_train"] == 24 + 12 and flat["seed"] == 1
    assert flat["test_ci_low"] <= flat["test_balanced_accuracy"] <= flat["test_ci_high"]
    details = json.loads((root / "metrics/sweep/details/classic_r0.5_s1.json").read_text())
    assert details["arm"] == "classic" and details["train_counts"]["normal"] == {"real": 12, "synthetic": 0, "classic": 6}
    assert len(details["test_predictions"]["labels"]) == 12
    child = MlflowClient().get_run(out.run_id)
    assert (child.data.params["arm"], child.data.params["ratio"], child.data.params["seed"]) == ("classic", "0.5", "1")


def test_select_compares_arms_writes_verdicts_and_ignores_stale_files(study, caplog):
    from mlflow import MlflowClient

    from ctsynth.stages.select_champion import run as run_select

    root, params, items, outputs = study
    stale = root / "metrics/sweep/r0.25_s0.json"
    stale.write_text(json.dumps({"ratio": 0.25, "seed": 0, "test_balanced_accuracy": 1.0}))
    study_record = run_select(params, root)
    assert "r0.25_s0.json" in caplog.text and "not items of the current sweep matrix" in caplog.text
    assert study_record["n_items"] == len(items)  # the stale file is not counted
    table = pd.read_csv(root / "reports/sweep.csv")
    assert len(table) == len(items) and set(table["arm"]) == {"real", "synthetic", "duplicate", "classic", "oracle", "synthetic_only"}
    pairs = {(c["arm"], c["other"]) for c in study_record["comparisons"]}
    assert pairs == {("synthetic", "duplicate"), ("synthetic", "classic"), ("synthetic", "real"), ("oracle", "duplicate")}
    assert all(c["p_value"] <= c["p_holm"] <= 1 for c in study_record["comparisons"])
    assert all(v.startswith(("synthetic 50% vs", "oracle 50% vs")) for v in study_record["verdicts"])
    assert study_record["gan_test"]["n_images"] == 24 and 0 <= study_record["gan_test"]["accuracy"]["estimate"] <= 1
    summary = json.loads((root / "metrics/summary.json").read_text())
    assert len(summary) <= 14 and all(isinstance(v, (int, float)) or v is None for v in summary.values())
    champion = study_record["champion"]
    assert champion["arm"] in set(table["arm"]) and champion["registered"]["promoted"]  # the first champion
    parent = MlflowClient().get_run(outputs[champion["name"]].parent_run_id)
    assert parent.data.tags["verdicts"].splitlines() == study_record["verdicts"]
    artifacts = {a.path for a in MlflowClient().list_artifacts(parent.info.run_id, "study")}
    assert {"study/comparisons.csv", "study/verdicts.txt"} <= artifacts
    for plot in ("plots/ratio_vs_metric.png", "plots/class_signal.png"):
        assert (root / plot).stat().st_size > 10_000
    from ctsynth.report import study_summary_text

    text = study_summary_text(params, root)
    assert "Verdicts" in text and all(v in text for v in study_record["verdicts"]) and "Champion: arm" in text
    assert "synthetic_only  1" in text and "GAN-test" in text
    # a missing item of the matrix is an error that names it
    (root / "metrics/sweep/oracle_r0.5_s1.json").rename(root / "moved.json")
    with pytest.raises(FileNotFoundError, match="oracle_r0.5_s1"):
        run_select(params, root)
    (root / "moved.json").rename(root / "metrics/sweep/oracle_r0.5_s1.json")


def test_dvc_metrics_show_reads_one_item_and_the_summary_within_200_columns(study, tmp_path):
    """Real DVC on copies of the metrics files: each declared metrics file prints narrowly."""
    import subprocess

    root, params, _, _ = study
    if not (root / "metrics/summary.json").is_file():
        from ctsynth.stages.select_champion import run as run_select

        run_select(params, root)
    repo = tmp_path / "repo"
    (repo / "metrics/sweep").mkdir(parents=True)
    shutil.copy(root / "metrics/summary.json", repo / "metrics/summary.json")
    shutil.copy(root / "metrics/sweep/synthetic_only_r1.0_s1.json", repo / "metrics/sweep/synthetic_only_r1.0_s1.json")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["dvc", "init", "-q"], cwd=repo, check=True)
    (repo / "dvc.yaml").write_text("metrics:\n  - metrics/summary.json\n  - metrics/sweep/synthetic_only_r1.0_s1.json\n")
    for path in ("metrics/summary.json", "metrics/sweep/synthetic_only_r1.0_s1.json"):
        shown = subprocess.run(["dvc", "metrics", "show", path], cwd=repo, check=True, capture_output=True, text=True).stdout
        lines = [line for line in shown.splitlines() if line.strip()]
        assert len(lines) == 2 and max(map(len, lines)) <= 200, shown  # one header row, one value row
