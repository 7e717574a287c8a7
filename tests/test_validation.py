"""validate: broken copies of a small prepared set are caught, each offending file named."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
import yaml
from _phantom_data import copy_tree, data_params, small_raw, validate_params
from PIL import Image

from ctsynth.cli import main as cli_main
from ctsynth.data.ingest import prepare_dataset
from ctsynth.validation.suite import validate_dataset


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    return small_raw(tmp_path_factory.mktemp("raw") / "raw")


def _prepare_and_validate(raw, tmp_path, **validate_update):
    prepare_dataset(raw, tmp_path / "prepared", data_params())
    return validate_dataset(raw, tmp_path / "prepared", tmp_path / "report", data_params(), validate_params(**validate_update))


def _check(result, name):
    return next(c for c in result.checks if c.name == name)


def test_clean_set_passes_and_writes_reports(raw, tmp_path):
    result = _prepare_and_validate(raw, tmp_path)
    assert result.success, result.failures
    assert all(c.success for c in result.checks)
    # summary.json is DVC metrics: flat numbers only; the details sit beside it
    summary = json.loads((tmp_path / "report/summary.json").read_text())
    assert summary == {"success": 1, "failed_checks": 0, "warnings": 0, "images_test": 5, "images_train": summary["images_train"],
                       "images_valid": summary["images_valid"]}
    assert all(type(v) is int for v in summary.values())
    details = json.loads((tmp_path / "report/details.json").read_text())
    assert details["success"] is True and set(details["checks"]) >= {"readable", "leakage_exact", "leakage_near", "blank"}
    assert details["counts"]["test"] == {"normal": 2, "squamous": 3}
    assert summary["images_train"] == sum(details["counts"]["train"].values()) > 0
    from test_tracking import assert_readable_in_dvc

    assert_readable_in_dvc({"reports/validation/summary.json": tmp_path / "report/summary.json"}, tmp_path)
    assert (tmp_path / "report/data_docs/index.html").is_file()
    assert "great_expectations" in json.loads((tmp_path / "report/results.json").read_text())


def test_each_broken_file_is_caught_and_named(raw, tmp_path):
    broken = copy_tree(raw, tmp_path / "raw")
    test_image = raw / "test/squamous.cell.carcinoma/phantom_0001.png"
    # 1. corrupt bytes, 2. truncated PNG
    (broken / "train/normal/corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    good = (raw / "train/normal/phantom_0002.png").read_bytes()
    (broken / "train/normal/truncated.png").write_bytes(good[: len(good) // 2])
    # 3. a test image copied into train (exact leakage)
    (broken / "train/squamous.cell.carcinoma_left.hilum_T1_N2_M0_IIIa/copied_from_test.png").write_bytes(test_image.read_bytes())
    # 4. a slightly altered copy of another test image (near leakage): re-encoded JPEG, brighter, smaller
    source = Image.open(raw / "test/normal/phantom_0000.png").convert("L")
    altered = source.resize((source.width * 9 // 10, source.height * 9 // 10)).point(lambda v: min(255, v + 4))
    buffer = io.BytesIO()
    altered.save(buffer, format="JPEG", quality=85)
    (broken / "valid/normal/altered_copy.jpg").write_bytes(buffer.getvalue())
    # 5. a blank image, 6. an unknown class folder
    Image.new("RGB", (300, 250), (0, 0, 0)).save(broken / "valid/normal/blank.png")
    (broken / "train/nromal").mkdir()
    (broken / "train/nromal/misfiled.png").write_bytes((raw / "train/normal/phantom_0003.png").read_bytes())

    result = _prepare_and_validate(broken, tmp_path)
    assert not result.success
    readable = _check(result, "readable")
    assert not readable.success
    assert any(o.startswith("train/normal/corrupt.png") for o in readable.offending)
    assert any(o.startswith("train/normal/truncated.png") and "truncated" in o for o in readable.offending)
    exact = " ".join(_check(result, "leakage_exact").offending)
    assert "copied_from_test.png" in exact and "test/squamous.cell.carcinoma/phantom_0001.png" in exact
    near = " ".join(_check(result, "leakage_near").offending)
    assert "valid/normal/altered_copy.jpg" in near and "test/normal/phantom_0000.png" in near
    assert any("valid/normal/blank.png" in o for o in _check(result, "blank").offending)
    labels = _check(result, "labels").offending
    assert any(o.startswith("train/nromal/misfiled.png") and "'nromal'" in o for o in labels)
    # Every one of them is in the failure list that the stage prints.
    failures = "\n".join(result.failures)
    for name in ("corrupt.png", "truncated.png", "copied_from_test.png", "altered_copy.jpg", "blank.png", "misfiled.png"):
        assert name in failures
    details = json.loads((tmp_path / "report/details.json").read_text())
    assert details["success"] is False and details["checks"]["blank"]["n_offending"] == 1
    summary = json.loads((tmp_path / "report/summary.json").read_text())
    assert summary["success"] == 0 and summary["failed_checks"] == sum(not c.success and c.severity == "fail" for c in result.checks) >= 4
    # Distinct phantom slices are not near duplicates of each other.
    assert len(_check(result, "leakage_near").offending) == 2  # the altered copy and its original


def test_copies_within_a_split_warn_but_do_not_fail(raw, tmp_path):
    broken = copy_tree(raw, tmp_path / "raw")
    (broken / "train/normal/10 - Copy.png").write_bytes((raw / "train/normal/phantom_0001.png").read_bytes())
    result = _prepare_and_validate(broken, tmp_path)
    within = _check(result, "duplicates_within_split")
    assert result.success and not within.success and within.severity == "warn"
    assert any("10 - Copy.png" in o for o in within.offending)
    # The same problem fails the stage once params say so.
    strict = _prepare_and_validate(broken, tmp_path, fail_on=["duplicates_within_split"])
    assert not strict.success and any("10 - Copy.png" in f for f in strict.failures)


def test_class_count_bounds_and_changed_raw_files(raw, tmp_path):
    result = _prepare_and_validate(raw, tmp_path, class_count_bounds={"train": [5, 100], "valid": [1, 100], "test": [1, 100]})
    assert any(o.startswith("train/normal: 4 images") for o in _check(result, "class_counts").offending)
    # A raw file edited after `prepare` no longer matches the manifest.
    changed = copy_tree(raw, tmp_path / "changed")
    prepare_dataset(changed, tmp_path / "prepared2", data_params())
    Image.new("L", (220, 200), 90).save(changed / "valid/normal/phantom_0000.png")
    (changed / "valid/normal/new_after_prepare.png").write_bytes((raw / "train/normal/phantom_0000.png").read_bytes())
    result = validate_dataset(changed, tmp_path / "prepared2", tmp_path / "report2", data_params(), validate_params())
    complete = " ".join(_check(result, "complete").offending)
    assert "valid/normal/phantom_0000.png" in complete and "new_after_prepare.png" in complete


def test_cli_exits_non_zero_and_logs_each_offending_file(raw, tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")  # the stages log their runs
    broken = copy_tree(raw, tmp_path / "raw")
    Image.fromarray(np.full((200, 300), 128, np.uint8)).save(broken / "test/normal/constant.png")
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump({"data": {"resolution": 32},
                                           "validate": {"class_count_bounds": {"train": [1, 99], "valid": [1, 99], "test": [1, 99]}}}))
    assert cli_main(["--params", str(params_file), "prepare", "--raw", str(broken), "--out", str(tmp_path / "prepared"), "--resolution", "32",
                     "--allow-outside-repo"]) == 0
    with caplog.at_level(logging.ERROR):
        code = cli_main(["--params", str(params_file), "validate", "--raw", str(broken), "--prepared", str(tmp_path / "prepared"),
                         "--report", str(tmp_path / "report")])
    assert code == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("blank" in e and "test/normal/constant.png" in e for e in errors)
