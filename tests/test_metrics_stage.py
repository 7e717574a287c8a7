"""validate_synthetic on tiny tmp data: the floors are written, copies fail the stage, a blurred
"generator" scores worse than the real floor, MLflow gets the run, bad input names the file."""

from __future__ import annotations

import json
import sqlite3

import pandas as pd
import pytest
from _synthetic_data import write_prepared, write_synthetic

from ctsynth.cli import main as cli_main
from ctsynth.config import DataParams, SyntheticParams, ValidateParams
from ctsynth.stages.validate_synthetic import validate_synthetic

DATA = DataParams(resolution=32)
PARAMS = SyntheticParams(kid_subsets=20, nearest_neighbour_rows=4)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return write_prepared(tmp_path_factory.mktemp("prepared"))


def _run(tmp_path, prepared, **synthetic_kwargs):
    synthetic = write_synthetic(tmp_path / "synthetic", prepared, **synthetic_kwargs)
    return validate_synthetic(synthetic, prepared, tmp_path / "report", DATA, PARAMS, ValidateParams(), log_to_mlflow=False)


def test_stage_writes_metrics_with_floors_and_passes_fresh_images(tmp_path, prepared):
    result = _run(tmp_path, prepared)
    written = json.loads((tmp_path / "report" / "details.json").read_text())
    assert written["success"] is True and result.success
    # metrics.json (DVC metrics) holds the headline numbers only, flat, each beside its floor
    headline = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert set(headline) == {"failed_checks", "copies", "memo", "memo_floor",
                             *(f"{k}{s}" for k in ("kid", "fd", "prec", "recall") for s in ("", "_floor"))}
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in headline.values())
    assert headline["kid"] == pytest.approx(written["quality"]["overall"]["synthetic"]["kid"], rel=1e-3)
    assert headline["fd_floor"] == pytest.approx(written["quality"]["overall"]["floor"]["frechet"], rel=1e-3)
    assert headline["recall_floor"] == pytest.approx(written["quality"]["overall"]["floor"]["recall"], rel=1e-3)
    assert headline["failed_checks"] == 0 and headline["copies"] == 0
    assert (tmp_path / "report" / "nearest_neighbours.png").stat().st_size > 1000
    overall = written["quality"]["overall"]
    for key in ("kid", "kid_std", "frechet", "precision", "recall", "density", "coverage"):
        assert isinstance(overall["synthetic"][key], float)
        assert isinstance(overall["floor"][key], float)
    # Floor and synthetic use the same reference half and the same n.
    assert overall["synthetic"]["n_candidate"] == overall["floor"]["n_candidate"] == 40
    assert set(written["quality"]["per_class"]) == {"normal", "squamous"}
    assert overall["fid_inception"]["synthetic"] is None and "never downloaded" in overall["fid_inception"]["reason"]
    memo = written["memorisation"]["overall"]
    assert memo["synthetic"]["exact_copies"] == 0 and memo["floor"]["exact_copies"] == 0
    assert set(memo["floor"]["fraction_below"]) == {"p1", "p5"}
    assert written["checks"]["memorisation"]["success"] and written["checks"]["exact_copies"]["success"]
    # The validate stage's GX suite ran on the synthetic manifest.
    for name in ("readable", "labels", "size", "mode", "class_counts", "leakage_exact", "leakage_near", "blank"):
        assert written["checks"][name]["success"], (name, written["checks"][name])


def test_copies_of_training_images_fail_the_stage_and_are_named(tmp_path, prepared):
    result = _run(tmp_path, prepared, copies=3)
    assert not result.success
    assert {"exact_copies", "memorisation", "leakage_exact"} <= set(result.failures)
    headline = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert headline["copies"] == 6 and headline["failed_checks"] == len(result.failures)
    # The GX suite names the copied bytes with their training twin.
    offending = " ".join(result.metrics["checks"]["leakage_exact"]["offending"])
    assert "normal/00000.png" in offending and "normal_000.png" in offending
    memo = result.metrics["memorisation"]["overall"]["synthetic"]
    assert memo["exact_copies"] == 6  # 3 per class
    # All copies are named even though the figure shows only nearest_neighbour_rows = 4 pairs.
    closest = {(pair["image"], pair["nearest_train"]) for pair in memo["closest_pairs"] if pair["distance"] == 0.0}
    assert len(closest) == 6
    assert ("normal/00000.png", "train/normal/normal_000.png") in closest
    assert ("squamous/00002.png", "train/squamous/squamous_002.png") in closest


def test_a_blurring_generator_scores_clearly_worse_than_the_real_floor(tmp_path, prepared):
    result = _run(tmp_path, prepared, blur=True)
    overall = result.metrics["quality"]["overall"]
    synthetic, floor = overall["synthetic"], overall["floor"]
    assert synthetic["kid"] > 10 * (abs(floor["kid"]) + floor["kid_std"])
    assert synthetic["frechet"] > 3 * floor["frechet"]
    assert synthetic["recall"] < floor["recall"] - 0.3
    assert result.metrics["checks"]["kid"]["success"] is False
    assert result.success  # kid is not in fail_on by default: it warns


def test_cli_logs_the_run_to_mlflow(tmp_path, prepared, monkeypatch):
    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    params_file = tmp_path / "params.yaml"
    params_file.write_text("data:\n  resolution: 32\nsynthetic:\n  kid_subsets: 10\n")
    synthetic = write_synthetic(tmp_path / "synthetic", prepared)
    code = cli_main(
        ["--params", str(params_file), "validate-synthetic", "--synthetic", str(synthetic),
         "--prepared", str(prepared), "--report", str(tmp_path / "report")]
    )
    assert code == 0
    with sqlite3.connect(db) as connection:
        runs = connection.execute(
            "SELECT r.name FROM runs r JOIN experiments e ON r.experiment_id = e.experiment_id WHERE e.name = 'ctsynth-gan'"
        ).fetchall()
        metric_keys = {row[0] for row in connection.execute("SELECT key FROM metrics").fetchall()}
    assert runs == [("validate_synthetic",)]
    assert {"overall.kid", "overall.kid_floor", "class.normal.precision_floor", "memorisation.fraction_below_p1"} <= metric_keys


def test_missing_manifest_columns_name_the_file(tmp_path, prepared):
    synthetic = write_synthetic(tmp_path / "synthetic", prepared, per_class=5)
    pd.read_csv(synthetic / "manifest.csv").drop(columns=["seed"]).to_csv(synthetic / "manifest.csv", index=False)
    with pytest.raises(ValueError, match=r"manifest\.csv lacks columns \['seed'\]"):
        validate_synthetic(synthetic, prepared, tmp_path / "report", DATA, PARAMS, log_to_mlflow=False)
    with pytest.raises(FileNotFoundError, match="ctsynth generate"):
        validate_synthetic(tmp_path / "nowhere", prepared, tmp_path / "report", DATA, PARAMS, log_to_mlflow=False)


def test_unreadable_synthetic_image_is_reported_by_name(tmp_path, prepared):
    synthetic = write_synthetic(tmp_path / "synthetic", prepared, per_class=12)
    (synthetic / "normal" / "00004.png").write_bytes(b"not a png")
    result = validate_synthetic(synthetic, prepared, tmp_path / "report", DATA, PARAMS, log_to_mlflow=False)
    unreadable = result.metrics["n"]["synthetic_unreadable"]
    assert [entry["path"] for entry in unreadable] == ["normal/00004.png"]
    assert result.metrics["n"]["synthetic_read"] == 23


@pytest.mark.slow
def test_inception_fid_is_computed_when_a_local_weights_file_is_given(tmp_path, prepared):
    # A randomly initialised state dict stands in for the real file: this checks the loading and
    # feature path, not the value (the real weights are never downloaded).
    import torch
    from torchvision.models import inception_v3

    weights = tmp_path / "inception_v3_google-test.pth"
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), weights)
    # Inception at 299 px costs seconds per image on a shared CPU: 4 train images per class, 2 synthetic.
    prepared = write_prepared(tmp_path / "prepared", per_class={"train": 4, "valid": 1})
    synthetic = write_synthetic(tmp_path / "synthetic", prepared, per_class=2)
    params = PARAMS.model_copy(update={"inception_weights": str(weights), "pr_k": 1, "pca_components": 2})
    result = validate_synthetic(synthetic, prepared, tmp_path / "report", DATA, params, log_to_mlflow=False)
    fid = result.metrics["quality"]["overall"]["fid_inception"]
    assert isinstance(fid["synthetic"], float) and isinstance(fid["floor"], float)
    assert "estimation noise" in fid["reason"]


def test_dvc_metrics_show_of_the_metrics_file_fits_a_terminal(tmp_path, prepared):
    from test_tracking import assert_readable_in_dvc

    # the blurring generator: KID and Fréchet distance far above their floors, the widest numbers
    _run(tmp_path, prepared, blur=True)
    assert_readable_in_dvc({"reports/synthetic/metrics.json": tmp_path / "report" / "metrics.json"}, tmp_path)
