"""Metrics of a classifier on one split, computed from labels and predicted probabilities.

Cancer is the positive class: every class other than `normal` (or, when no class is called
`normal`, every class other than the first). Sensitivity is cancer recall, specificity is normal
recall, F1 and ROC AUC are those of the cancer-vs-normal problem (AUC scores an image by its total
cancer probability). Accuracy, balanced accuracy and the confusion matrix use all classes.
A metric that is undefined on the split (e.g. AUC with one class present) is NaN, never a guess.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ctsynth.config import METRICS
from ctsynth.jsonable import jsonable

NEGATIVE_CLASS = "normal"
METRIC_NAMES = METRICS  # config.Metric: the metrics select may choose and compare by


def positive_class_ids(classes: list[str]) -> list[int]:
    negative = classes.index(NEGATIVE_CLASS) if NEGATIVE_CLASS in classes else 0
    return [i for i in range(len(classes)) if i != negative]


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.nan


def roc_auc(is_positive: np.ndarray, score: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counting one half."""
    positives, negatives = score[is_positive], score[~is_positive]
    if len(positives) == 0 or len(negatives) == 0:
        return math.nan
    greater = (positives[:, None] > negatives[None, :]).sum()
    ties = (positives[:, None] == negatives[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(positives) * len(negatives)))


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Rows: true class, columns: predicted class."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (y_true, y_pred), 1)
    return matrix


def classification_metrics(y_true: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> dict:
    """accuracy, balanced accuracy, ROC AUC, sensitivity, specificity, F1, confusion matrix, n."""
    y_true = np.asarray(y_true, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.shape != (len(y_true), len(classes)):
        raise ValueError(f"probabilities have shape {probabilities.shape}; expected ({len(y_true)}, {len(classes)})")
    y_pred = probabilities.argmax(axis=1)
    matrix = confusion_matrix(y_true, y_pred, len(classes))
    recalls = [matrix[c, c] / matrix[c].sum() for c in range(len(classes)) if matrix[c].sum() > 0]
    positive = np.array(positive_class_ids(classes))
    true_cancer = np.isin(y_true, positive)
    pred_cancer = np.isin(y_pred, positive)
    tp = int((true_cancer & pred_cancer).sum())
    fn = int((true_cancer & ~pred_cancer).sum())
    tn = int((~true_cancer & ~pred_cancer).sum())
    fp = int((~true_cancer & pred_cancer).sum())
    cancer_score = probabilities[:, positive].sum(axis=1)
    return {
        "accuracy": _ratio(float((y_pred == y_true).sum()), len(y_true)),
        "balanced_accuracy": float(np.mean(recalls)) if recalls else math.nan,
        "roc_auc": roc_auc(true_cancer, cancer_score),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "confusion_matrix": matrix.tolist(),
        "n": int(len(y_true)),
    }


def cross_entropy(y_true: np.ndarray, probabilities: np.ndarray) -> float:
    picked = np.asarray(probabilities, dtype=np.float64)[np.arange(len(y_true)), np.asarray(y_true)]
    return float(-np.mean(np.log(np.clip(picked, 1e-12, 1.0))))


def plot_confusion_matrix(matrix: list[list[int]], classes: list[str], title: str):
    """A matplotlib figure of the confusion matrix with counts in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = np.asarray(matrix)
    figure, axes = plt.subplots(figsize=(2.2 + 0.9 * len(classes), 1.8 + 0.9 * len(classes)))
    axes.imshow(data, cmap="Blues")
    axes.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    axes.set_yticks(range(len(classes)), classes)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    for (row, col), value in np.ndenumerate(data):
        axes.text(col, row, str(value), ha="center", va="center", color="white" if value > data.max() / 2 else "black")
    figure.tight_layout()
    return figure


# ------------------------------------------------------------------------------------------------
# One sweep item's result files. The declared DVC metrics file holds flat numbers only (what is
# worth comparing across experiments: `dvc metrics show` stays one readable row); everything else
# (arm name, history, counts, per-test-image predictions for the study's bootstrap) goes to a
# details JSON next to it that `select` reads.

DETAILS_DIR = "details"
# ~11 columns: `dvc metrics show` prints one item's file within ~200 terminal columns
FLAT_METRICS = (("test", "balanced_accuracy"), ("test", "roc_auc"), ("valid", "balanced_accuracy"))
FLAT_KEYS: tuple[str, ...] = ()  # details hold best_epoch, epochs_run, history


def item_files(metrics_dir: Path, name: str) -> tuple[Path, Path]:
    """(metrics file, details file) of the sweep item `name`: metrics/sweep/<name>.json and
    metrics/sweep/details/<name>.json."""
    metrics_dir = Path(metrics_dir)
    return metrics_dir / f"{name}.json", metrics_dir / DETAILS_DIR / f"{name}.json"


def predictions_record(labels, probabilities) -> dict:
    """Per-test-image labels and class probabilities (6 decimals: arg-max and AUC unchanged)."""
    labels = np.asarray(labels, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.shape[0] != len(labels):
        raise ValueError(f"{len(labels)} labels but {probabilities.shape[0]} rows of probabilities")
    return {"labels": labels.tolist(), "probabilities": np.round(probabilities, 6).tolist()}


def flat_item_metrics(record: dict, classes: list[str], confidence: float = 0.95, replicates: int = 2000) -> dict:
    """The few numbers of one item worth comparing: ratio, seed, test balanced accuracy with its
    bootstrap CI over test images (test_ci_low/high), test ROC AUC, validation balanced accuracy,
    training-set size."""
    from ctsynth.classifier.stats import item_bootstrap

    flat: dict = {"ratio": float(record["ratio"]), "seed": int(record["seed"])}
    for split, metric in FLAT_METRICS:
        value = record[split].get(metric)
        flat[f"{split}_{metric}"] = None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)
    predictions = record.get("test_predictions")
    if predictions:
        ci = item_bootstrap("balanced_accuracy", predictions["labels"], predictions["probabilities"], classes, replicates, confidence)
        # the bootstrap CI over test images of test_balanced_accuracy (short keys: dvc metrics show's width)
        flat["test_ci_low"], flat["test_ci_high"] = _finite(ci.low), _finite(ci.high)
    flat["n_train"] = int(sum(sum(per_source.values()) for per_source in record.get("train_counts", {}).values()))
    for key in FLAT_KEYS:
        if record.get(key) is not None:
            flat[key] = int(record[key])
    return flat


def _finite(value: float):
    return None if value is None or math.isnan(value) else float(value)


def write_item_result(metrics_dir: Path, name: str, record: dict, classes: list[str]) -> tuple[Path, Path]:
    """Write the item's flat metrics file and its details file; returns both paths.

    `record`: what the item measured (arm, ratio, seed, valid, test, history, train_counts, ...)
    with `test_predictions` = predictions_record(...). NaN is written as null (JSON has no NaN).
    """
    metrics_path, details_path = item_files(metrics_dir, name)
    details_path.parent.mkdir(parents=True, exist_ok=True)
    details_path.write_text(json.dumps(jsonable({**record, "name": name}), indent=1) + "\n")
    metrics_path.write_text(json.dumps(flat_item_metrics(record, classes), indent=2) + "\n")
    return metrics_path, details_path


def read_item_details(metrics_dir: Path, name: str) -> dict:
    """The details record of item `name` (clear errors for a missing or foreign file)."""
    _, details_path = item_files(metrics_dir, name)
    if not details_path.is_file():
        raise FileNotFoundError(f"sweep item {name}: {details_path} does not exist; run the train_classifier stage")
    try:
        record = json.loads(details_path.read_text())
        record["ratio"], record["seed"], record["valid"], record["test"]  # noqa: B018 (schema check)
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{details_path} is not a train_classifier details file ({exc!r})") from exc
    return record

