"""One item of the sweep, tracked in MLflow under one parent run per sweep.

An item is one (arm, ratio, seed): a classifier trained on the arm's training set and measured on
the real test split. `ctsynth.classifier.executor` runs many items (in worker processes or as Ray
tasks); this module does one, and names what identifies it:

- sweep_id = sha256 of the classifier params and the content of every image the sweep may read
  (prepared + synthetic + oracle manifests and files). The parent MLflow run carries it as a tag, so items
  run in other processes or on other machines find the same parent. Changing the params or the
  data makes a new sweep id, hence a new parent; adding a seed, a ratio or an arm does not.
- cache_key = sha256 of the sweep id, the item and the training code. An item's details file
  (metrics/sweep/details/<name>.json) records it; a later run reuses the item when the key is
  unchanged and its weights, details and flat metrics files are all there.
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

from ctsynth.paths import resolve
from ctsynth import tracking
from ctsynth.classifier.evaluate import METRIC_NAMES, item_files, plot_confusion_matrix, predictions_record, write_item_result
from ctsynth.classifier.train import TrainResult, train_classifier
from ctsynth.config import Params
from ctsynth.data.manifest import read_generator_record
from ctsynth.data.mixing import count_by_class_and_source, load_arm_data, real_split, training_set
from ctsynth.device import record_device, resolve_device

log = logging.getLogger(__name__)

STAGE = "train_classifier"
PARENT_ROLE_TAG = "sweep_role"
SWEEP_ID_TAG = "sweep_id"
ITEM_TAG = "item"
BASELINE_ARM = "real"  # ratio 0: real images only, the same for every arm
SYNTHETIC_ONLY_ARM = "synthetic_only"  # trained on synthetic images only: one item per seed, ratio 1.0

# The files whose content decides an item's result. Editing one of them invalidates every cached
# item; editing the executor, the statistics or the report does not.
TRAINING_CODE = (
    "classifier/backbones.py", "classifier/evaluate.py", "classifier/features.py", "classifier/heads.py",
    "classifier/precision.py", "classifier/train.py", "classifier/sweep.py", "data/mixing.py", "data/preprocess.py",
)


def ratio_label(ratio: float) -> str:
    """A ratio as it appears in item names: Python's str of the float (0.0, 0.25, 1.0)."""
    return str(float(ratio))


@dataclass(frozen=True)
class SweepItem:
    """One classifier run of the sweep."""

    arm: str
    ratio: float
    seed: int

    @property
    def name(self) -> str:
        """File and MLflow run name: {arm}_r{ratio}_s{seed}, e.g. synthetic_r0.5_s3, real_r0.0_s0."""
        return f"{self.arm}_r{ratio_label(self.ratio)}_s{self.seed}"


def sweep_items(params: Params) -> list[SweepItem]:
    """Every item of the sweep: sweep.arms x sweep.ratios x sweep.seeds, where ratio 0 is one real-only
    baseline per seed (whatever the arm) and `synthetic_only` runs once per seed at ratio 1.0."""
    items: list[SweepItem] = []
    for arm in params.sweep.arms:
        ratios = [1.0] if arm == SYNTHETIC_ONLY_ARM else params.sweep.ratios
        for ratio in ratios:
            for seed in params.sweep.seeds:
                item = SweepItem(BASELINE_ARM, 0.0, seed) if ratio == 0 else SweepItem(arm, float(ratio), seed)
                if item not in items:
                    items.append(item)
    return items


def data_fingerprint(*folders: Path | None) -> str:
    """sha256 over the manifests and the bytes of every file they list (None: an absent folder)."""
    digest = hashlib.sha256()
    for folder in folders:
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
    # The device enters as where the items train, not as the setting: "auto" and "cpu" on a machine
    # without CUDA give bit-identical results and the same id (the id of CPU sweeps from before the
    # setting existed); a GPU's results differ in the last bits, so a GPU sweep is its own sweep.
    identity = {"classifier": params.classifier.model_dump(exclude={"device"}), "classes": params.data.classes, "data": data_hash}
    device_type = resolve_device(params.classifier.device).type
    if device_type != "cpu":
        identity["device"] = device_type
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def sweep_data_fingerprint(params: Params, root: Path) -> str:
    """data_fingerprint of the folders this sweep reads (synthetic and oracle only if they have a manifest)."""
    optional = [resolve(folder, root) for folder in (params.sweep.synthetic, params.sweep.oracle)]
    return data_fingerprint(resolve(params.data.prepared, root), *[f if (f / "manifest.csv").exists() else None for f in optional])


def training_code_fingerprint() -> str:
    """sha256 over the source of the modules that decide an item's result (TRAINING_CODE)."""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for relative in TRAINING_CODE:
        digest.update(relative.encode())
        digest.update((package / relative).read_bytes())
    return digest.hexdigest()


# sweep fields that say how or where items run, or which items exist (the item itself is in the
# key), but not what one item computes; every other sweep field (and all of `data`) is in the key.
EXECUTION_FIELDS = {"arms", "ratios", "seeds", "metrics_dir", "runs_dir", "executor", "workers", "threads_per_item", "retries", "ray"}


def item_cache_key(sweep: str, code: str, item: SweepItem, params: Params) -> str:
    """What an item's result depends on: the sweep id (classifier params + data content), the
    training code, the data and sweep settings (a sweep field added later counts by default), the item."""
    identity = {"sweep_id": sweep, "code": code, "arm": item.arm, "ratio": float(item.ratio), "seed": item.seed,
                "data": params.data.model_dump(mode="json"), "sweep": params.sweep.model_dump(mode="json", exclude=EXECUTION_FIELDS)}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def item_paths(params: Params, root: Path, item: SweepItem) -> tuple[Path, Path, Path]:
    """(details file, weights file, flat metrics file) of an item: metrics/sweep/details/<name>.json,
    models/classifier/runs/<name>.pt, metrics/sweep/<name>.json. The details file is the item's
    record (cache key, MLflow run, per-test-image predictions); the flat file is what DVC shows."""
    metrics_path, details_path = item_files(resolve(params.sweep.metrics_dir, root), item.name)
    return details_path, resolve(params.sweep.runs_dir, root) / f"{item.name}.pt", metrics_path


def cached_result(params: Params, root: Path, item: SweepItem, cache_key: str) -> dict | None:
    """The item's details record if it was written under `cache_key` and its other files are there."""
    details_path, state_path, metrics_path = item_paths(params, root, item)
    if not (details_path.is_file() and state_path.is_file() and metrics_path.is_file()):
        return None
    try:
        record = json.loads(details_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # a torn or foreign file: the item runs again and overwrites it
    return record if isinstance(record, dict) and record.get("cache_key") == cache_key else None


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


@dataclass(frozen=True)
class SweepItemOutputs:
    metrics_path: Path
    details_path: Path
    state_dict_path: Path
    run_id: str
    parent_run_id: str


def run_sweep_item(
    params: Params,
    item: SweepItem,
    root: Path,
    progress: bool = True,
    parent_run_id: str | None = None,
    sweep: str | None = None,
    cache_key: str | None = None,
) -> SweepItemOutputs:
    """Build the arm's training set, train, evaluate and log one MLflow child run; write
    runs/<name>.pt, metrics/sweep/details/<name>.json and (last, so a file there means a finished
    item) the flat metrics/sweep/<name>.json.

    `sweep`, `parent_run_id` and `cache_key` are computed here unless the executor passes them
    (it computes them once per sweep instead of once per item)."""
    name = item.name
    label = ratio_label(item.ratio)
    classes = params.data.classes
    prepared_dir = resolve(params.data.prepared, root)
    synthetic_dir = resolve(params.sweep.synthetic, root)
    valid_items = real_split(prepared_dir, "valid", classes)
    test_items = real_split(prepared_dir, "test", classes)
    real_train, pools = load_arm_data(item.arm, prepared_dir, synthetic_dir, resolve(params.sweep.oracle, root), classes)
    train_items = training_set(item.arm, real_train, pools, item.ratio, item.seed, classes, params.sweep.classic_augmentation)
    counts = count_by_class_and_source(train_items)

    sweep = sweep or sweep_id(params, sweep_data_fingerprint(params, root))
    parent_run_id = parent_run_id or find_or_create_parent_run(sweep, params, root)
    cache_key = cache_key or item_cache_key(sweep, training_code_fingerprint(), item, params)
    stage = os.environ.get("DVC_STAGE", STAGE)
    details_path, state_path, metrics_path = item_paths(params, root, item)
    tags = {"arm": item.arm, "ratio": label, "seed": item.seed, "stage": stage, SWEEP_ID_TAG: sweep, ITEM_TAG: name}

    with tracking.start_run(tracking.EXPERIMENT_CLASSIFIER, name, tags=tags, parent_run_id=parent_run_id, root=root) as run:
        import mlflow

        mlflow.log_params({**_flat(params.classifier.model_dump(), "classifier."), "arm": item.arm, "ratio": label, "seed": item.seed,
                           "n_train": len(train_items), "n_valid": len(valid_items), "n_test": len(test_items),
                           "train_counts": json.dumps(counts)})
        # lineage: the data versions this item read, as MLflow dataset inputs digested by DVC's hash
        read = [params.data.prepared] + [params.sweep.synthetic] * (item.arm in ("synthetic", "synthetic_only")) \
            + [params.sweep.oracle] * (item.arm == "oracle")
        tracking.log_lineage(read, context="training", root=root)
        if params.sweep.synthetic in read:
            mlflow.set_tags(generator_tags(synthetic_dir))
        record_device(params.classifier.device, resolve_device(params.classifier.device))
        result = train_classifier(params.classifier, train_items, valid_items, test_items, classes, item.seed, progress=progress)
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
        record = _item_record(result, params, item, counts, state_path, root, run.info.run_id, parent_run_id, sweep, cache_key)
        record["test_predictions"] = predictions_record(result.test_labels, result.test_probabilities)
        write_item_result(metrics_path.parent, item.name, record, classes)
        mlflow.log_artifact(str(metrics_path))
        mlflow.log_artifact(str(details_path), artifact_path="details")
    return SweepItemOutputs(metrics_path, details_path, state_path, run.info.run_id, parent_run_id)


def generator_tags(synthetic_dir: Path) -> dict[str, str]:
    """The md5 of the network(s) that made the synthetic images (generate's generator.json), as the
    tag `ctsynth.registry.lineage` follows to the `ctsynth-generator` version."""
    record = read_generator_record(synthetic_dir)
    if record is None:
        return {}
    md5s = sorted({entry["network_md5"] for entry in record["classes"].values()})
    return {f"generator.{tracking.GENERATOR_MD5_TAG}": ",".join(md5s), "generator.snapshot": record["snapshot"]}


def _item_record(result: TrainResult, params: Params, item: SweepItem, counts, state_path, root, run_id, parent_run_id, sweep, cache_key) -> dict:
    return {
        "name": item.name,
        "arm": item.arm,
        "ratio": float(item.ratio),
        "ratio_label": ratio_label(item.ratio),
        "seed": item.seed,
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
        "cache_key": cache_key,
    }


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)
