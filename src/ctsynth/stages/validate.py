"""Stage `validate`: Great Expectations checks of data/raw + data/prepared.

Reads params `data` and `validate`; writes reports/validation/summary.json (the few numbers DVC
compares), details.json, results.json and the GX Data Docs under reports/validation/data_docs/;
logs the result of every check to MLflow (experiment ctsynth-data, run `validate`) with data/raw
and data/prepared as dataset inputs and the report folder as artifacts. Exits 1, after an ERROR log
that names every offending file, when a check listed in validate.fail_on fails.
"""

from __future__ import annotations

from pathlib import Path

from ctsynth.config import Params
from ctsynth.paths import resolve
from ctsynth.tracking import EXPERIMENT_DATA, log_lineage, start_run
from ctsynth.validation.suite import ValidationResult, validate_dataset

STAGE = "validate"


def run(params: Params, root: Path) -> ValidationResult:
    data, checks = params.data, params.validation
    report = resolve(checks.report, root)
    result = validate_dataset(resolve(data.raw, root), resolve(data.prepared, root), report, data, checks)
    with start_run(EXPERIMENT_DATA, STAGE, tags={"stage": STAGE, "success": result.success}, root=root):
        import mlflow

        log_lineage([data.raw, data.prepared], context="evaluation", root=root)
        mlflow.log_params({"near_duplicate_max_hamming": checks.near_duplicate_max_hamming,
                           "near_duplicate_min_correlation": checks.near_duplicate_min_correlation,
                           "blank_max_std": checks.blank_max_std,
                           "fail_on": ",".join(checks.fail_on)})
        metrics = {"success": int(result.success), "n_failures": len(result.failures), "n_warnings": len(result.warnings)}
        for check in result.checks:
            metrics[f"check/{check.name}/success"] = int(check.success)
            metrics[f"check/{check.name}/n_offending"] = len(check.offending)
        mlflow.log_metrics(metrics)
        mlflow.log_artifacts(str(report), artifact_path="validation")
    return result


def exit_code(result: ValidationResult) -> int:
    return 0 if result.success else 1
