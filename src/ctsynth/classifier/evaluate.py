"""Metrics of a classifier on one split, computed from labels and predicted probabilities.

Cancer is the positive class: every class other than `normal` (or, when no class is called
`normal`, every class other than the first). Sensitivity is cancer recall, specificity is normal
recall, F1 and ROC AUC are those of the cancer-vs-normal problem (AUC scores an image by its total
cancer probability). Accuracy, balanced accuracy and the confusion matrix use all classes.
A metric that is undefined on the split (e.g. AUC with one class present) is NaN, never a guess.
"""

from __future__ import annotations

import math

import numpy as np

NEGATIVE_CLASS = "normal"
METRIC_NAMES = ("accuracy", "balanced_accuracy", "roc_auc", "sensitivity", "specificity", "f1")


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
