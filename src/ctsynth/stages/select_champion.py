"""Stage `select` (pipelines/select_champion.py: a script called select.py would shadow the stdlib
`select` module for every script in pipelines/).

Reads the items of the current sweep matrix (metrics/sweep/<item>.json + details/; any other file is
ignored with a warning), writes reports/sweep.csv, reports/study.json (per arm and ratio: mean and
two-level bootstrap CI; the paired comparisons with Holm-corrected p, MDE and a verdict; GAN-test;
train-synthetic-test-real), metrics/summary.json (a dozen flat numbers for `dvc metrics`) and the
arms and class-signal plots; picks the champion by VALIDATION metric over every arm, exports
models/classifier/model.onnx (fails when onnxruntime and PyTorch disagree by more than
select.parity_tolerance on the validation images), registers it as a new version of
ctsynth-classifier, and moves @champion only when it beats the current champion on the same
validation images (select.promote: better | always). The comparisons and verdicts go to the
sweep's MLflow parent run. The statistics are ctsynth.classifier.selection's; docs/study.md
explains them.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ctsynth import tracking
from ctsynth.classifier import selection
from ctsynth.classifier.evaluate import METRIC_NAMES
from ctsynth.classifier.train import build_classifier
from ctsynth.config import Params
from ctsynth.data.mixing import ImageDataset, real_split
from ctsynth.export import check_parity, export_onnx
from ctsynth.jsonable import jsonable
from ctsynth.paths import resolve
from ctsynth.registry import promote_if_better, register_champion

log = logging.getLogger(__name__)


def run(params: Params, root: Path) -> dict:
    """The whole `select` stage: table, statistics, verdicts, plots, champion, ONNX export + parity,
    registry (promoted only when better). Returns the study's details (reports/study.json)."""
    select = params.select
    records = selection.load_sweep_records(params, resolve(params.sweep.metrics_dir, root))
    table = selection.sweep_table(records)
    report = resolve(select.report, root)
    report.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(report, index=False, float_format="%.6f")

    classes = params.data.classes
    study = selection.study_statistics(records, classes, select)
    study["gan_test"] = selection.gan_test(params, records, root, select)
    for line in study["verdicts"]:
        log.info("verdict: %s", line)
    (arm, best_ratio), best, ranking = selection.choose_champion(table, select.metric, select.tie_breaker)
    study["champion"] = {
        "chosen_by": f"validation {select.metric} (tie: {select.tie_breaker}), over every arm",
        "arm": arm,
        "ratio": best_ratio,
        "seed": int(best["seed"]),
        "name": str(best["name"]),
        "run_id": best["run_id"],
        f"valid_{select.metric}": float(best[f"valid_{select.metric}"]),
        "test": {m: float(best[f"test_{m}"]) for m in METRIC_NAMES},
        "ranking": ranking.to_dict(orient="records"),
    }
    selection.plot_arms(table, study, resolve(select.plot, root))
    selection.plot_signal(study, study["gan_test"], resolve(select.signal_plot, root))
    selection.plot_rows(study).to_csv(resolve(select.plot_data, root), index=False, float_format="%.6f")

    # Rebuild the chosen run's model from its weights, export it and check onnxruntime against it.
    model = build_classifier(params.classifier, len(classes), structure_only=True)
    state_path = resolve(str(best["state_dict"]), root)
    model.load_state_dict(torch.load(state_path, map_location="cpu", weights_only=True))
    model.eval()
    onnx_path = export_onnx(model, params.classifier.resolution, classes, resolve(select.onnx, root),
                            extra_metadata={"arm": arm, "ratio": f"{best_ratio:g}", "seed": str(int(best["seed"])), "run_id": str(best["run_id"])})
    valid_items = real_split(resolve(params.data.prepared, root), "valid", classes)
    valid_inputs = ImageDataset(valid_items, params.classifier.resolution).inputs.numpy()
    max_diff = check_parity(model, onnx_path, valid_inputs, atol=select.parity_tolerance)
    study["champion"]["onnx"] = {"path": str(select.onnx), "parity_max_abs_logit_diff": max_diff, "tolerance": select.parity_tolerance, "n_images": int(len(valid_inputs))}

    summary_path, details_path = resolve(select.summary, root), resolve(select.details, root)
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    details_path.parent.mkdir(parents=True, exist_ok=True)

    def write() -> None:
        summary_path.write_text(json.dumps(jsonable(selection.flat_summary(study, study["champion"], study["gan_test"])), indent=2) + "\n")
        details_path.write_text(json.dumps(jsonable(study), indent=1) + "\n")

    write()
    if select.register_champion:
        parent = str(best["parent_run_id"]) or None
        if parent:
            _log_study_to_parent(parent, study, table, report, [resolve(select.plot, root), resolve(select.signal_plot, root)], root)
        champion_record = next(r for r in records if r["name"] == best["name"])
        valid_labels = np.array([item.label_id for item in valid_items])
        decision = promote_if_better(onnx_path, valid_inputs, valid_labels, classes, select.metric, select.promote, root=root)
        version = register_champion(
            onnx_path,
            state_path,
            metrics={"ratio": best_ratio, "seed": int(best["seed"]), **{f"valid_{m}": champion_record["valid"][m] for m in METRIC_NAMES},
                     **{f"test_{m}": champion_record["test"][m] for m in METRIC_NAMES}, "onnx_parity_max_abs_diff": max_diff},
            params={"classifier": params.classifier.model_dump(), "arm": arm, "ratio": best_ratio, "seed": int(best["seed"])},
            input_example=valid_inputs[:2],
            run_id=parent,
            artifacts={"summary": summary_path, "study": details_path, "sweep": report},
            tags={"source_run_id": str(best["run_id"]), "arm": arm, "ratio": f"{best_ratio:g}", "seed": str(int(best["seed"])), **decision.tags},
            root=root,
            move_alias=decision.promote,
            description=decision.reason,
        )
        study["champion"]["registered"] = {"name": "ctsynth-classifier", "version": version, "promoted": decision.promote, "reason": decision.reason}
        write()
    return study


def _log_study_to_parent(parent_run_id: str, study: dict, table: pd.DataFrame, report: Path, plots: list[Path], root: Path) -> None:
    """The comparisons table and the verdicts on the sweep's parent run (plus per-arm means as
    metrics, step = ratio x 100), so the MLflow UI shows the study's answer next to its children."""
    from mlflow import MlflowClient

    tracking.configure(root)
    client = MlflowClient()
    metric = study["metric"]
    for entry in study["arms"].values():
        value = entry[metric]["estimate"]
        if value is not None and not math.isnan(value):
            client.log_metric(parent_run_id, f"mean_test_{metric}/{entry['arm']}", value, step=int(round(entry["ratio"] * 100)))
    comparisons = pd.DataFrame([{k: c[k] for k in ("arm", "other", "ratio", "difference", "low", "high", "p_value", "p_holm", "mde", "significant")}
                                for c in study["comparisons"]])
    with tempfile.TemporaryDirectory() as tmp:
        table_path, verdict_path = Path(tmp) / "comparisons.csv", Path(tmp) / "verdicts.txt"
        comparisons.to_csv(table_path, index=False, float_format="%.6f")
        verdict_path.write_text("\n".join(study["verdicts"]) + "\n")
        for path in (table_path, verdict_path, report, *plots):
            client.log_artifact(parent_run_id, str(path), artifact_path="study")
    client.set_tag(parent_run_id, "verdicts", "\n".join(study["verdicts"])[:4900])
