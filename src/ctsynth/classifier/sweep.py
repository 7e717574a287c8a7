"""One item of the synthetic-ratio sweep, tracked in MLflow under one parent run per sweep.

Each (ratio, seed) is a separate process (a DVC `matrix:` stage item), so the parent run cannot be
handed down in memory. It is found by tag instead: sweep_id = sha256 of the classifier params and
the content of every image the sweep may read (prepared + synthetic manifests and files). The first
item to run creates the parent, later ones find it; a file lock serialises find-or-create between
items running at the same time on one machine. Changing the params or the data makes a new sweep
id, hence a new parent; adding a seed or a ratio to the matrix does not.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ctsynth import tracking
from ctsynth.classifier.evaluate import METRIC_NAMES, item_files, plot_confusion_matrix, predictions_record, write_item_result
from ctsynth.classifier.train import TrainResult, train_classifier
from ctsynth.config import Params
from ctsynth.data.mixing import count_by_class_and_source, load_arm_data, real_split, training_set

log = logging.getLogger(__name__)

STAGE = "train_classifier"
PARENT_ROLE_TAG = "sweep_role"
SWEEP_ID_TAG = "sweep_id"


@dataclass(frozen=True)
class SweepItem:
    """One item of the study: an arm at a ratio with a seed (ratio 0: the shared `real` baseline)."""

    arm: str
    ratio: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.arm}_r{ratio_label(self.ratio)}_s{self.seed}"


def sweep_items(params: Params) -> list[SweepItem]:
    """Every item of the current matrix: real_r0.0 per seed, each arm at each ratio > 0 per seed,
    synthetic_only at ratio 1.0 per seed."""
    sweep = params.sweep
    items = [SweepItem("real", 0.0, seed) for seed in sweep.seeds if 0.0 in sweep.ratios]
    for arm in sweep.arms:
        ratios = [1.0] if arm == "synthetic_only" else [float(r) for r in sweep.ratios if r > 0]
        items += [SweepItem(arm, ratio, seed) for ratio in ratios for seed in sweep.seeds]
    return items


def item_name(ratio_label: str, seed: int) -> str:
    """File and run name of a sweep item: r{ratio}_s{seed}, ratio written as in dvc.yaml's matrix."""
    return f"r{ratio_label}_s{seed}"


def ratio_label(ratio: float) -> str:
    """How DVC templates a float from params.yaml (Python's str): 0.0, 0.25, 1.0."""
    return str(float(ratio))


def data_fingerprint(prepared_dir: Path, synthetic_dir: Path | None) -> str:
    """sha256 over the manifests and the bytes of every file they list."""
    digest = hashlib.sha256()
    for folder in (prepared_dir, synthetic_dir):
        if folder is None or not (folder / "manifest.csv").exists():
            digest.update(b"absent")
            continue
        manifest = folder / "manifest.csv"
        digest.update(manifest.read_bytes())
        for path in sorted(p for p in folder.rglob("*.png")):
            digest.update(path.relative_to(folder).as_posix().encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def sweep_id(params: Params, data_hash: str) -> str:
    identity = {"classifier": params.classifier.model_dump(), "classes": params.data.classes, "data": data_hash}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def find_or_create_parent_run(sweep: str, params: Params, root: Path) -> str:
    """Run id of the sweep's parent run in the classifier experiment (created if absent)."""
    from mlflow import MlflowClient

    tracking.configure(root)
    experiment_id = tracking.ensure_experiment(tracking.EXPERIMENT_CLASSIFIER, root)
    client = MlflowClient()
    query = f"tags.{SWEEP_ID_TAG} = '{sweep}' and tags.{PARENT_ROLE_TAG} = 'parent'"
    with _file_lock(root / ".cache" / "mlflow-sweep-parent.lock"):
        found = client.search_runs([experiment_id], filter_string=query, order_by=["attributes.start_time ASC"], max_results=1)
        if found:
            return found[0].info.run_id
        tags = {**tracking.standard_tags(root), SWEEP_ID_TAG: sweep, PARENT_ROLE_TAG: "parent", "stage": "sweep"}
        run = client.create_run(experiment_id, run_name=f"sweep-{sweep[:8]}", tags=tags)
        for key, value in _flat(params.classifier.model_dump(), "classifier.").items():
            client.log_param(run.info.run_id, key, value)
        client.log_param(run.info.run_id, "data.classes", json.dumps(params.data.classes))
        log.info("created sweep parent run %s (sweep_id %s)", run.info.run_id, sweep)
        return run.info.run_id


def _flat(values: dict, prefix: str = "") -> dict[str, str]:
    return {f"{prefix}{k}": v if isinstance(v, str) else json.dumps(v) for k, v in values.items()}


def _jsonable(value):
    """NaN (an undefined metric) becomes null: JSON has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


@dataclass(frozen=True)
class SweepItemOutputs:
    metrics_path: Path
    state_dict_path: Path
    run_id: str
    parent_run_id: str


def run_sweep_item(params: Params, ratio: float, seed: int, root: Path, label: str | None = None, progress: bool = True,
                   arm: str | None = None) -> SweepItemOutputs:
    """Build the arm's training set, train, evaluate and log one (arm, ratio, seed); write
    metrics/sweep/<name>.json (flat metrics) and metrics/sweep/details/<name>.json."""
    label = label or ratio_label(ratio)
    arm = arm or ("real" if ratio == 0 else "synthetic")
    name = SweepItem(arm, ratio, seed).name
    classes = params.data.classes
    prepared_dir = _under(root, params.data.prepared)
    synthetic_dir = _under(root, params.sweep.synthetic)
    valid_items = real_split(prepared_dir, "valid", classes)
    test_items = real_split(prepared_dir, "test", classes)
    real_train, pools = load_arm_data(arm, prepared_dir, synthetic_dir, _under(root, params.sweep.oracle), classes)
    train_items = training_set(arm, real_train, pools, ratio, seed, classes, params.sweep.classic_augmentation)
    counts = count_by_class_and_source(train_items)

    sweep = sweep_id(params, data_fingerprint(prepared_dir, synthetic_dir if (synthetic_dir / "manifest.csv").exists() else None))
    parent_run_id = find_or_create_parent_run(sweep, params, root)
    stage = os.environ.get("DVC_STAGE", STAGE)
    metrics_path, details_path = item_files(_under(root, params.sweep.metrics_dir), name)
    state_path = _under(root, params.sweep.runs_dir) / f"{name}.pt"
    tags = {"arm": arm, "ratio": label, "seed": seed, "stage": stage, SWEEP_ID_TAG: sweep}

    with tracking.start_run(tracking.EXPERIMENT_CLASSIFIER, name, tags=tags, parent_run_id=parent_run_id, root=root) as run:
        import mlflow

        mlflow.log_params({**_flat(params.classifier.model_dump(), "classifier."), "arm": arm, "ratio": label, "seed": seed,
                           "n_train": len(train_items), "n_valid": len(valid_items), "n_test": len(test_items),
                           "train_counts": json.dumps(counts)})
        result = train_classifier(params.classifier, train_items, valid_items, test_items, classes, seed, progress=progress)
        for record in result.history:
            # curve/... so the per-epoch series never mix with the final valid_/test_ values
            mlflow.log_metrics({f"curve/{k}": v for k, v in record.items() if k != "epoch" and not math.isnan(v)}, step=record["epoch"])
        final = {f"{split}_{metric}": getattr(result, split)[metric] for split in ("valid", "test") for metric in (*METRIC_NAMES, "loss")}
        mlflow.log_metrics({k: v for k, v in final.items() if not math.isnan(v)} | {"best_epoch": result.best_epoch})
        for split in ("test", "valid"):
            figure = plot_confusion_matrix(getattr(result, split)["confusion_matrix"], classes, f"{name} {split}")
            mlflow.log_figure(figure, f"confusion_matrix_{split}.png")
            import matplotlib.pyplot as plt

            plt.close(figure)
        state_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(result.model.state_dict(), state_path)
        mlflow.log_artifact(str(state_path), artifact_path="model")
        record = _item_record(result, params, label, ratio, seed, counts, state_path, root, run.info.run_id, parent_run_id, sweep)
        record.update(arm=arm, test_predictions=predictions_record(result.test_labels, result.test_probabilities))
        write_item_result(metrics_path.parent, name, record, classes)
        mlflow.log_artifact(str(metrics_path))
        mlflow.log_artifact(str(details_path), artifact_path="details")
    return SweepItemOutputs(metrics_path, state_path, run.info.run_id, parent_run_id)


def _item_record(result: TrainResult, params: Params, label, ratio, seed, counts, state_path, root, run_id, parent_run_id, sweep) -> dict:
    return {
        "ratio": float(ratio),
        "ratio_label": label,
        "seed": seed,
        "valid": result.valid,
        "test": result.test,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "history": result.history,
        "train_counts": counts,
        "classes": params.data.classes,
        "n_parameters": result.n_parameters,
        "n_trainable": result.n_trainable,
        "precision": result.precision,
        "seconds": result.seconds,
        "state_dict": _relative(state_path, root),
        "mlflow": {"run_id": run_id, "parent_run_id": parent_run_id, "sweep_id": sweep, "experiment": tracking.EXPERIMENT_CLASSIFIER},
    }


def _under(root: Path, path: str) -> Path:
    candidate = Path(path)
    return candidate if candidate.is_absolute() else root / candidate


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)
