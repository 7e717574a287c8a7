"""Stage `prepare`: data/raw (Kaggle layout) -> data/prepared/{split}/{class}/*.png + manifest.csv.

Reads params `data`, logs the per-split, per-class counts to MLflow (experiment ctsynth-data, run
`prepare`) with data/raw (DVC's hash of it) as the run's dataset input and the manifest as an
artifact. Unreadable files and unknown class folders are manifest rows that `validate` fails on;
only a missing raw or split folder, or an unsafe output folder (inside the raw data, outside the
repository unless data.allow_outside_repo, holding files no earlier run wrote), stops the stage.
"""

from __future__ import annotations

from pathlib import Path

from ctsynth.config import Params
from ctsynth.data.ingest import PrepareResult, prepare_dataset
from ctsynth.paths import resolve
from ctsynth.tracking import EXPERIMENT_DATA, log_lineage, start_run

STAGE = "prepare"


def run(params: Params, root: Path) -> PrepareResult:
    data = params.data
    result = prepare_dataset(resolve(data.raw, root), resolve(data.prepared, root), data,
                             repository=None if data.allow_outside_repo else root)
    with start_run(EXPERIMENT_DATA, STAGE, tags={"stage": STAGE}, root=root):
        import mlflow

        log_lineage([data.raw], context="source", root=root)
        mlflow.log_params({"resolution": data.resolution, "classes": ",".join(data.classes), "raw": data.raw})
        metrics = {f"count/{split}/{label}": n for split, per_class in result.counts.items() for label, n in per_class.items()}
        metrics.update({"unreadable": len(result.unreadable), "unknown_class": len(result.unknown_class), "ok": int(result.ok)})
        mlflow.log_metrics(metrics)
        if result.manifest_path is not None:
            mlflow.log_artifact(str(result.manifest_path))
        if result.errors:
            mlflow.set_tag("error", "; ".join(result.errors))
    return result


def exit_code(result: PrepareResult) -> int:
    return 0 if result.ok else 1
