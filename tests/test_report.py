"""The report's own computations and HTML pieces (the whole page is rendered by tests/e2e/test_pipeline.py)."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest

from ctsynth.classifier.evaluate import roc_auc
from ctsynth.config import Params
from ctsynth.report import (
    _interval,
    _number,
    render_report,
    roc_points,
    study_summary_text,
    sweep_section,
    validation_section,
)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_points_area_is_the_auc_with_ties(seed):
    rng = np.random.default_rng(seed)
    is_positive = rng.random(60) < 0.4
    score = np.round(rng.random(60) + 0.3 * is_positive, 1)  # rounded: many ties
    fpr, tpr = roc_points(is_positive, score)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    # trapezoids between distinct thresholds count ties as one half, like evaluate.roc_auc
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(is_positive, score), abs=1e-12)


def test_roc_points_perfect_separation():
    fpr, tpr = roc_points(np.array([True, True, False, False]), np.array([0.9, 0.8, 0.2, 0.1]))
    assert fpr.tolist() == [0.0, 0.0, 0.0, 0.5, 1.0] and tpr.tolist() == [0.0, 0.5, 1.0, 1.0, 1.0]


def test_numbers_stay_readable():
    assert _number(135081225.7979, 4) == "1.3508e+08" and _number(0.12345) == "0.123" and _number(None) == "n/a"
    assert _number(7) == "7" and _number(float("nan")) == "n/a"


def test_interval_text():
    assert _interval({"mean": 0.8, "low": 0.7, "high": 0.9}) == "0.800 [0.700, 0.900]"
    assert _interval({"mean": 0.05, "low": -0.01, "high": 0.11, "p_value": 0.08}) == "0.050 [-0.010, 0.110] (p 0.080)"
    assert _interval({"mean": None}) == "n/a" and _interval(None) == "n/a"


def test_validation_section_names_failures_and_escapes():
    summary = {
        "success": False, "n_failed_checks": 1, "n_warnings": 0, "counts": {"train": {"normal": 3, "squamous": 4}},
        "checks": {
            "leakage_exact": {"success": False, "severity": "fail", "n_offending": 1, "description": "no file in two splits",
                              "offending": ["train/normal/<a>.png == test/normal/b.png"]},
            "readable": {"success": True, "severity": "fail", "n_offending": 0, "description": "decodes", "offending": []},
            "duplicates_within_split": {"success": False, "severity": "warn", "n_offending": 2, "description": "repeats", "offending": ["x", "y"]},
        },
    }
    html = validation_section(summary)
    assert html.count("FAILED") == 2  # overall + the failing check; the warn-only check is a warning
    assert html.count(">warning<") == 1
    assert "&lt;a&gt;.png" in html and "<a>.png" not in html


def test_sweep_section_has_every_ratio_and_the_paired_differences():
    stat = {"mean": 0.7, "low": 0.6, "high": 0.8, "n": 2}
    summary = {"confidence": 0.95, "baseline_ratio": 0.0, "n_runs": 4, "ratios": {
        "0": {"n_seeds": 2, **{f"test_{m}": stat for m in ("accuracy", "balanced_accuracy", "roc_auc", "sensitivity", "specificity", "f1")}},
        "0.5": {"n_seeds": 2, "test_accuracy": {"mean": 0.75, "low": 0.7, "high": 0.8},
                "test_accuracy_minus_baseline": {"mean": 0.05, "low": -0.02, "high": 0.12, "p_value": 0.2}},
    }}
    html = sweep_section(summary, b"\x89PNG fake")
    assert "0.050 [-0.020, 0.120] (p 0.200)" in html
    assert "<td>0.5</td>" in html and "<td>0</td>" in html
    embedded = re.search(r"base64,([A-Za-z0-9+/=]+)", html).group(1)
    assert base64.b64decode(embedded) == b"\x89PNG fake"


def test_missing_stage_outputs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"reports/validation/summary\.json.*dvc repro"):
        render_report(Params(), tmp_path)


def test_summary_without_a_sweep_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics/summary.json does not exist: run `dvc repro`"):
        study_summary_text(Params(), tmp_path)


def test_cli_summary_and_report_without_a_study_exit_1_with_the_reason(tmp_path, monkeypatch, caplog):
    from ctsynth.cli import main

    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert main(["summary"]) == 1
    assert "metrics/summary.json does not exist" in caplog.text
    assert main(["report"]) == 1
    assert "missing" in caplog.text and "reports/validation/summary.json" in caplog.text
