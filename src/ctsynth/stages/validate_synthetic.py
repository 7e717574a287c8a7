"""Stage `validate_synthetic`: the validate suite on the synthetic manifest + quality metrics.

Reads params `data`, `synthetic` (and `validate`, whose Great Expectations suite runs on the
synthetic manifest); writes reports/synthetic/metrics.json (the headline numbers DVC compares),
details.json (everything) and nearest_neighbours.png; logs to MLflow (experiment ctsynth-gan, run
`validate_synthetic`) with data/prepared and data/synthetic as dataset inputs. Exits 1 when a check
listed in synthetic.fail_on fails. The numbers come from ctsynth.metrics.synthetic.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctsynth.config import DataParams, Params, SyntheticParams, ValidateParams
from ctsynth.data.manifest import STATUS_OK, read_manifest
from ctsynth.device import record_device, resolve_device
from ctsynth.jsonable import jsonable
from ctsynth.metrics import synthetic as measures
from ctsynth.paths import resolve
from ctsynth.tracking import EXPERIMENT_GAN, log_lineage, start_run

log = logging.getLogger(__name__)

STAGE = "validate_synthetic"
METRICS_FILE = "metrics.json"  # DVC metrics: the headline numbers only (see headline_metrics)
DETAILS_FILE = "details.json"  # everything: per class, floors' spreads, checks with offending files
FIGURE_FILE = "nearest_neighbours.png"


@dataclass
class SyntheticValidationResult:
    success: bool
    metrics: dict[str, Any]
    failures: list[str]
    metrics_path: Path
    figure_path: Path | None


def run(params: Params, root: Path, log_to_mlflow: bool = True) -> SyntheticValidationResult:
    """The stage on params' folders; `log_to_mlflow=False` (`ctsynth validate-synthetic --no-mlflow`)
    writes the same files without an MLflow run."""
    return validate_synthetic(
        resolve(params.synthetic.synthetic, root), resolve(params.data.prepared, root), resolve(params.synthetic.report, root),
        params.data, params.synthetic, validate_params=params.validation, log_to_mlflow=log_to_mlflow,
    )


def exit_code(result: SyntheticValidationResult) -> int:
    return 0 if result.success else 1


def validate_synthetic(
    synthetic_dir: Path,
    prepared_dir: Path,
    report_dir: Path,
    data_params: DataParams,
    params: SyntheticParams,
    validate_params: ValidateParams | None = None,
    log_to_mlflow: bool = True,
) -> SyntheticValidationResult:
    """Run the manifest checks and the quality metrics; write metrics.json (headline numbers),
    details.json (everything) and the figure; log to MLflow.

    `validate_params` (the validate stage's section) runs its Great Expectations suite on the
    synthetic manifest; None skips the suite and keeps only the metric checks.
    """
    synthetic_dir, prepared_dir, report_dir = Path(synthetic_dir), Path(prepared_dir), Path(report_dir)
    device = resolve_device(params.device)
    classes = list(data_params.classes)
    resolution = data_params.resolution

    synthetic_manifest = measures.read_synthetic_manifest(synthetic_dir)
    unknown = sorted(set(synthetic_manifest["label"]) - set(classes))
    if unknown:
        log.warning("synthetic manifest has labels %s outside data.classes %s; those rows are left out of the metrics", unknown, classes)
    known = synthetic_manifest[synthetic_manifest["label"].isin(classes)]
    prepared = read_manifest(prepared_dir)
    prepared = prepared[prepared["status"] == STATUS_OK]
    train_rows = prepared[prepared["split"] == "train"]
    valid_rows = prepared[prepared["split"] == "valid"]
    if len(train_rows) < 4:
        raise ValueError(f"{prepared_dir}: only {len(train_rows)} readable train images; the metrics need real images to compare with")

    synthetic = measures.load_images(synthetic_dir, known["path"].tolist(), known["label"].tolist(), resolution, "synthetic images")
    train = measures.load_images(prepared_dir, train_rows["path"].tolist(), train_rows["label"].tolist(), resolution, "train images")
    valid = measures.load_images(prepared_dir, valid_rows["path"].tolist(), valid_rows["label"].tolist(), resolution, "valid images")
    if len(synthetic.images) == 0:
        raise ValueError(f"{synthetic_dir}: none of the {len(synthetic_manifest)} synthetic images could be read")

    checks: dict[str, dict[str, Any]] = {}
    if validate_params is not None:
        checks.update(measures.suite_checks(synthetic_manifest, synthetic_dir, train_rows, prepared_dir, data_params, validate_params, params))

    memo, overall_memo = measures.memorisation_metrics(train, synthetic, valid, classes, params)
    metrics: dict[str, Any] = {
        "n": {
            "synthetic_rows": int(len(synthetic_manifest)),
            "synthetic_read": int(len(synthetic.images)),
            "synthetic_unreadable": synthetic.unreadable,
            "synthetic_unknown_labels": unknown,
            "synthetic_per_class": {c: int((synthetic.labels == c).sum()) for c in classes},
            "train_per_class": {c: int((train.labels == c).sum()) for c in classes},
            "valid": int(len(valid.images)),
        },
        "quality": measures.quality_metrics(train, synthetic, classes, params, device),
        "memorisation": memo,
    }
    checks.update(measures.quality_checks(metrics, params))
    for name, check in checks.items():
        check["fails_stage"] = name in params.fail_on
    failures = [name for name, check in checks.items() if not check["success"] and check["fails_stage"]]
    warnings = [name for name, check in checks.items() if not check["success"] and not check["fails_stage"]]
    metrics["checks"] = checks
    metrics["failures"] = failures
    metrics["success"] = not failures
    for name in warnings:
        log.warning("check %s failed (warning only): %s", name, checks[name].get("detail", ""))
    for name in failures:
        log.error("check %s failed: %s", name, checks[name].get("detail", ""))

    report_dir.mkdir(parents=True, exist_ok=True)
    metrics_path, details_path = report_dir / METRICS_FILE, report_dir / DETAILS_FILE
    metrics_path.write_text(json.dumps(measures.headline_metrics(metrics, params), indent=2) + "\n", encoding="utf-8")
    details_path.write_text(json.dumps(jsonable(metrics, nan_as_null=False), indent=2, sort_keys=False) + "\n", encoding="utf-8")
    figure_path = measures.nearest_neighbour_figure(synthetic, train, overall_memo, params.nearest_neighbour_rows, report_dir / FIGURE_FILE)
    log.info("wrote %s, %s and %s", metrics_path, details_path, figure_path)

    if log_to_mlflow:
        log_run(metrics, params, [metrics_path, details_path, figure_path], lineage=[prepared_dir, synthetic_dir], device=device)
    return SyntheticValidationResult(not failures, metrics, failures, metrics_path, figure_path)


def log_run(metrics: dict[str, Any], params: SyntheticParams, files: list[Path], lineage: list[Path], device) -> None:
    """The stage's MLflow run (experiment ctsynth-gan, beside the GAN it judges): every synthetic
    param, the flat metrics, the data read and the files written."""
    with start_run(EXPERIMENT_GAN, STAGE, tags={"stage": STAGE}) as run:
        import mlflow

        mlflow.log_params({f"synthetic.{k}": v for k, v in params.model_dump().items()})
        mlflow.log_metrics(measures.flat_metrics(metrics))
        log_lineage(lineage, context="evaluation")
        record_device(params.device, device)
        for file in files:
            mlflow.log_artifact(str(file), artifact_path="synthetic")
        log.info("logged validate_synthetic to MLflow run %s", run.info.run_id)
