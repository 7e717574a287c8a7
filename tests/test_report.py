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
    signal_text,
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


def _study():
    ci = {"estimate": 0.7, "low": 0.6, "high": 0.8}
    arm = lambda name, ratio: {"arm": name, "ratio": ratio, "n_train": 303, "seeds": [0, 1], "balanced_accuracy": ci,  # noqa: E731
                               "test_accuracy": {"mean": 0.7, "low": 0.6, "high": 0.8}, "test_roc_auc": {"mean": 0.8, "low": 0.7, "high": 0.9}}
    comparison = {"arm": "synthetic", "other": "duplicate", "ratio": 0.5, "difference": 0.012, "low": -0.03, "high": 0.05,
                  "p_value": 0.3, "p_holm": 0.61, "mde": 0.07, "significant": False}
    return {"metric": "balanced_accuracy", "confidence": 0.95, "alpha": 0.05, "power": 0.8, "n_items": 6, "n_test": 144,
            "arms": {"real_r0.0": arm("real", 0.0), "synthetic_r0.5": arm("synthetic", 0.5)}, "comparisons": [comparison],
            "verdicts": ["synthetic 50% vs duplicate 50%: +0.012 balanced accuracy [-0.030, +0.050], p 0.61 after Holm correction: not significant"],
            "gan_test": {"n_images": 400, "balanced_accuracy": {"estimate": 0.9, "low": 0.85, "high": 0.95}},
            "train_synthetic_test_real": {"synthetic_only": ci, "real": ci}}


def test_sweep_section_has_every_arm_the_comparisons_and_the_verdicts():
    html = sweep_section(_study(), b"\x89PNG fake")
    assert "<td>synthetic</td><td>0.5</td><td>303</td>" in html and "<td>real</td><td>0</td>" in html
    assert "+0.012 [-0.030, +0.050]" in html and "<td>0.610</td>" in html
    assert "not significant" in html and "Holm over 1" in html
    embedded = re.search(r"base64,([A-Za-z0-9+/=]+)", html).group(1)
    assert base64.b64decode(embedded) == b"\x89PNG fake"
    assert "GAN-test" in signal_text(_study()) and "0.900 [0.850, 0.950]" in signal_text(_study())


def test_missing_stage_outputs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"reports/validation/details\.json.*dvc repro"):
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
    assert "missing" in caplog.text and "reports/validation/details.json" in caplog.text
