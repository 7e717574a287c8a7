"""DVC stage `validate`: Great Expectations checks of data/raw + data/prepared.

Reads params.yaml (data, validate), writes reports/validation/summary.json (the few numbers DVC
compares), details.json and results.json and the GX Data Docs under reports/validation/data_docs/,
logs the result of every check to MLflow (experiment ctsynth-data) with data/raw and data/prepared
as dataset inputs and the report folder as artifacts. Exits 1, after an ERROR log that
names every offending file, when a check listed in validate.fail_on fails.
"""

from __future__ import annotations

import sys

from ctsynth.config import load_params
from ctsynth.logs import setup_logging
from ctsynth.paths import repo_root
from ctsynth.tracking import EXPERIMENT_DATA, log_lineage, start_run
from ctsynth.validation.suite import validate_dataset


def main() -> int:
    setup_logging()
    params = load_params()
    root = repo_root()
    report = root / params.validation.report
    result = validate_dataset(root / params.data.raw, root / params.data.prepared, report, params.data, params.validation)
    with start_run(EXPERIMENT_DATA, "validate", tags={"stage": "validate", "success": result.success}):
        import mlflow

        log_lineage([params.data.raw, params.data.prepared], context="evaluation", root=root)
        mlflow.log_params({"near_duplicate_max_hamming": params.validation.near_duplicate_max_hamming,
                           "near_duplicate_min_correlation": params.validation.near_duplicate_min_correlation,
                           "blank_max_std": params.validation.blank_max_std,
                           "fail_on": ",".join(params.validation.fail_on)})
        metrics = {"success": int(result.success), "n_failures": len(result.failures), "n_warnings": len(result.warnings)}
        for check in result.checks:
            metrics[f"check/{check.name}/success"] = int(check.success)
            metrics[f"check/{check.name}/n_offending"] = len(check.offending)
        mlflow.log_metrics(metrics)
        mlflow.log_artifacts(str(report), artifact_path="validation")
    return 0 if result.success else 1


if __name__ == "__main__":
    sys.exit(main())
