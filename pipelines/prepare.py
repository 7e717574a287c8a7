"""DVC stage `prepare`: data/raw (Kaggle layout) -> data/prepared/{split}/{class}/*.png + manifest.csv.

Reads params.yaml (data), logs the per-split, per-class counts to MLflow (experiment ctsynth-data)
with data/raw (DVC's hash of it) as the run's dataset input.
Unreadable files and unknown class folders are manifest rows that `validate` fails on; only a
missing raw or split folder, or an unsafe output folder (inside the raw data, outside the
repository, holding files no earlier run wrote), stops this stage.
"""

from __future__ import annotations

import sys

from ctsynth.config import load_params
from ctsynth.data.ingest import prepare_dataset
from ctsynth.logs import setup_logging
from ctsynth.paths import repo_root
from ctsynth.tracking import EXPERIMENT_DATA, log_lineage, start_run


def main() -> int:
    setup_logging()
    params = load_params()
    root = repo_root()
    result = prepare_dataset(root / params.data.raw, root / params.data.prepared, params.data, repository=root)
    with start_run(EXPERIMENT_DATA, "prepare", tags={"stage": "prepare"}):
        import mlflow

        log_lineage([params.data.raw], context="source", root=root)
        mlflow.log_params({"resolution": params.data.resolution, "classes": ",".join(params.data.classes), "raw": params.data.raw})
        metrics = {f"count/{split}/{label}": n for split, per_class in result.counts.items() for label, n in per_class.items()}
        metrics.update({"unreadable": len(result.unreadable), "unknown_class": len(result.unknown_class), "ok": int(result.ok)})
        mlflow.log_metrics(metrics)
        if result.manifest_path is not None:
            mlflow.log_artifact(str(result.manifest_path))
        if result.errors:
            mlflow.set_tag("error", "; ".join(result.errors))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
