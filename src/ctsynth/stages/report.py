"""Stage `report`: reports/summary.html, one self-contained page (images embedded) of the study.

Data validation, GAN curves and real-vs-synthetic grids, synthetic quality and memorisation, the
ratio sweep with its CIs and paired differences, and the champion's confusion matrix and ROC curve
(its exported ONNX model run over the prepared test split); ctsynth.report renders it. The page is
logged to the sweep's MLflow parent run (artifact report/). A missing stage output is named in one
ERROR line (exit 1).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd

from ctsynth import tracking
from ctsynth.config import Params
from ctsynth.report import ReportInputs, render_report

log = logging.getLogger(__name__)

OUT = "reports/summary.html"  # dvc.yaml's out; `ctsynth report --out` writes elsewhere
EXPECTED_ERRORS = (FileNotFoundError,)


def run(params: Params, root: Path, out: str | Path = OUT) -> Path:
    """Write the page (`out` relative to the repository root) and log it to the sweep's parent run."""
    page = write_report(params, root, root / out)
    inputs = ReportInputs.from_params(params, root)
    log_report_to_parent_run(page, inputs.study, inputs.sweep_table, root)
    return page


def write_report(params: Params, root: Path, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_report(params, root), encoding="utf-8")
    log.info("report written to %s (%.1f kB)", out, out.stat().st_size / 1024)
    return out


def sweep_parent_run_id(sweep_table: Path, champion_run_id: str | None) -> str | None:
    """The sweep's MLflow parent run: the champion row's parent_run_id in reports/sweep.csv."""
    table = pd.read_csv(sweep_table, dtype={"run_id": str, "parent_run_id": str})
    rows = table[table["run_id"] == champion_run_id] if champion_run_id else table
    parents = rows["parent_run_id"].dropna()
    return str(parents.iloc[0]) if len(parents) else None


def log_report_to_parent_run(report: Path, study: Path, sweep_table: Path, root: Path) -> str | None:
    """Attach the HTML to the sweep's parent run (artifact path report/); returns the run id."""
    from mlflow import MlflowClient

    champion = json.loads(study.read_text()).get("champion", {})
    parent = sweep_parent_run_id(sweep_table, champion.get("run_id"))
    if not parent:
        log.warning("no sweep parent run in %s: the report is not logged to MLflow", sweep_table)
        return None
    tracking.configure(root)
    MlflowClient().log_artifact(parent, str(report), artifact_path="report")
    log.info("report logged to MLflow run %s (artifact report/%s)", parent, report.name)
    return parent
