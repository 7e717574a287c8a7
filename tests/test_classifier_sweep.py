"""End to end on tiny data: sweep items (MLflow children under one parent), then select."""

import json

import pytest
from _classifier_data import CLASSES, write_prepared, write_synthetic

from ctsynth.config import Params



@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    write_prepared(root, {"train": (12, 12), "valid": (4, 4), "test": (5, 5)}, size=16)
    write_synthetic(root, per_class=8, size=16)
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
    params = Params.model_validate({
        "data": {"resolution": 16},
        "classifier": {"resolution": 16, "epochs": 3, "patience": 2, "batch_size": 8, "feature_cache": str(root / "cache")},
        "sweep": {"arms": ["synthetic"], "ratios": [0.0, 0.5], "seeds": [0, 1]},
    })
    from ctsynth.classifier.sweep import run_sweep_item, sweep_items

    outputs = {(item.ratio, item.seed): run_sweep_item(params, item, root, progress=False) for item in sweep_items(params)}
    yield root, params, outputs
    mp.undo()


def test_each_item_writes_metrics_and_weights_and_is_a_child_of_one_parent(sweep):
    from mlflow import MlflowClient

    root, _, outputs = sweep
    assert {o.metrics_path.name for o in outputs.values()} == {"real_r0.0_s0.json", "real_r0.0_s1.json", "synthetic_r0.5_s0.json", "synthetic_r0.5_s1.json"}
    record = json.loads((root / "metrics/sweep/details/synthetic_r0.5_s1.json").read_text())
    assert record["train_counts"] == {"normal": {"real": 12, "synthetic": 6}, "squamous": {"real": 12, "synthetic": 6}}
    assert record["test"]["n"] == 10 and record["valid"]["n"] == 8
    assert 1 <= record["best_epoch"] <= record["epochs_run"] == len(record["history"])
    assert (root / record["state_dict"]).is_file()

    parents = {o.parent_run_id for o in outputs.values()}
    assert len(parents) == 1  # found by sweep_id tag across separate calls
    client = MlflowClient()
    parent = client.get_run(parents.pop())
    assert parent.data.tags["sweep_role"] == "parent"
    child = client.get_run(outputs[(0.5, 1)].run_id)
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert (child.data.tags["arm"], child.data.tags["ratio"], child.data.tags["seed"], child.data.tags["stage"]) == ("synthetic", "0.5", "1", "train_classifier")
    assert (child.data.params["arm"], child.data.params["ratio"], child.data.params["seed"]) == ("synthetic", "0.5", "1")
    curve = client.get_metric_history(child.info.run_id, "curve/valid_loss")
    assert [m.step for m in curve] == list(range(1, record["epochs_run"] + 1))
    assert child.data.metrics["test_accuracy"] == pytest.approx(record["test"]["accuracy"])
    artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
    assert {"confusion_matrix_test.png", "model", "synthetic_r0.5_s1.json", "details"} <= artifacts
    # lineage: the item's data folders are its dataset inputs (no DVC record here, so "untracked")
    read = {d.dataset.name: d.dataset.digest for d in child.inputs.dataset_inputs}
    assert read == {"data/prepared": "untracked", "data/synthetic": "untracked"}
    baseline = client.get_run(outputs[(0.0, 1)].run_id)
    assert {d.dataset.name for d in baseline.inputs.dataset_inputs} == {"data/prepared"}

def test_sweep_items_cross_arms_ratios_seeds_with_one_baseline_per_seed():
    from ctsynth.classifier.sweep import SweepItem, sweep_items

    params = Params.model_validate({"sweep": {"arms": ["synthetic", "duplicate", "synthetic_only"], "ratios": [0.0, 0.5], "seeds": [3, 4]}})
    names = [item.name for item in sweep_items(params)]
    assert names == ["real_r0.0_s3", "real_r0.0_s4", "synthetic_r0.5_s3", "synthetic_r0.5_s4",
                     "duplicate_r0.5_s3", "duplicate_r0.5_s4", "synthetic_only_r1.0_s3", "synthetic_only_r1.0_s4"]
    assert SweepItem("synthetic", 0.25, 0).name == "synthetic_r0.25_s0"
    with pytest.raises(ValueError, match="sweep.arms"):
        Params.model_validate({"sweep": {"arms": ["synthetic", "synthetic"]}})


def test_select_writes_statistics_exports_onnx_and_registers_the_champion(sweep):
    import pandas as pd
    from mlflow import MlflowClient

    from ctsynth.stages.select_champion import run as run_select
    from ctsynth.export import read_onnx_info

    root, params, outputs = sweep
    study = run_select(params.model_copy(update={"sweep": params.sweep.model_copy(update={"arms": ["synthetic"]}),
                                                 "select": params.select.model_copy(update={"bootstrap": 200})}), root)
    table = pd.read_csv(root / "reports/sweep.csv")
    assert len(table) == 4  # no run dropped
    assert study["arms"]["synthetic_r0.5"]["test_accuracy"]["n"] == 2
    expected_mean = table[table.ratio == 0.5]["test_accuracy"].mean()
    assert study["arms"]["synthetic_r0.5"]["test_accuracy"]["mean"] == pytest.approx(expected_mean, abs=1e-6)
    assert [c["other"] for c in study["comparisons"]] == ["real"]
    assert (root / "plots/ratio_vs_metric.png").stat().st_size > 10_000
    champion = study["champion"]
    best_valid = table.groupby(["arm", "ratio"])["valid_balanced_accuracy"].mean().max()
    assert table.groupby(["arm", "ratio"])["valid_balanced_accuracy"].mean()[(champion["arm"], champion["ratio"])] == pytest.approx(best_valid)
    assert champion["onnx"]["parity_max_abs_logit_diff"] <= 1e-4
    assert read_onnx_info(root / "models/classifier/model.onnx").classes == CLASSES
    version = MlflowClient().get_model_version_by_alias("ctsynth-classifier", "champion")
    assert str(version.version) == str(champion["registered"]["version"])
    assert version.tags["source_run_id"] == champion["run_id"]


def test_predict_cli_answers_from_the_champion_and_from_an_onnx_file(sweep, capsys):
    from ctsynth.cli import main

    root, _, _ = sweep
    image = root / "data/prepared/test/squamous/squamous_000.png"
    bad = root / "data/prepared/manifest.csv"
    assert main(["predict", str(image)]) == 0  # champion from the registry (MLFLOW_TRACKING_URI)
    from_registry = json.loads(capsys.readouterr().out.strip())
    assert from_registry["label"] in CLASSES and sum(from_registry["probabilities"].values()) == pytest.approx(1.0)
    assert from_registry["model"]["name"] == "ctsynth-classifier"
    assert main(["predict", "--onnx", str(root / "models/classifier/model.onnx"), str(image), str(bad)]) == 1
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert lines[0]["probabilities"] == pytest.approx(from_registry["probabilities"], abs=1e-6)
    assert "not a PNG, JPEG or DICOM" in lines[1]["error"]
