import math

import numpy as np
import pytest

from ctsynth.classifier.evaluate import classification_metrics, cross_entropy, positive_class_ids, roc_auc
from ctsynth.classifier.stats import mean_ci, paired_difference


def test_binary_metrics_match_hand_computed_values():
    # 4 normal (0), 6 squamous (1). Predictions by arg-max of the probabilities below.
    y_true = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    p_cancer = np.array([0.1, 0.4, 0.6, 0.3, 0.9, 0.8, 0.45, 0.7, 0.2, 0.6])
    probabilities = np.stack([1 - p_cancer, p_cancer], axis=1)
    m = classification_metrics(y_true, probabilities, ["normal", "squamous"])
    # predicted: 0 0 1 0 | 1 1 0 1 0 1 -> TN 3, FP 1, TP 4, FN 2
    assert m["confusion_matrix"] == [[3, 1], [2, 4]]
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["sensitivity"] == pytest.approx(4 / 6)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["balanced_accuracy"] == pytest.approx((4 / 6 + 3 / 4) / 2)
    assert m["f1"] == pytest.approx(2 * 4 / (2 * 4 + 1 + 2))
    # AUC: pairs (cancer score > normal score) over 6 x 4 = 24; 0.6 vs 0.6 is a tie (one half).
    # cancer scores 0.9 0.8 0.45 0.7 0.2 0.6 vs normal 0.1 0.4 0.6 0.3:
    # 0.9:4, 0.8:4, 0.45:3, 0.7:4, 0.2:1, 0.6:3 + 0.5 -> 19.5
    assert m["roc_auc"] == pytest.approx(19.5 / 24)
    assert m["n"] == 10


def test_multiclass_cancer_is_every_class_but_normal():
    classes = ["adenocarcinoma", "normal", "squamous"]
    assert positive_class_ids(classes) == [0, 2]
    assert positive_class_ids(["benign", "malignant"]) == [1]  # no `normal`: the first class is negative
    y_true = np.array([1, 0, 2, 2])
    probabilities = np.array([[0.2, 0.7, 0.1], [0.1, 0.3, 0.6], [0.5, 0.1, 0.4], [0.1, 0.8, 0.1]])
    m = classification_metrics(y_true, probabilities, classes)
    # predicted 1 2 0 1: cancer-vs-normal: TN 1 (row 0), TP 2 (rows 1, 2: wrong subtype still cancer), FN 1
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(1.0)
    assert m["accuracy"] == pytest.approx(1 / 4)  # only row 0 has the right class
    assert m["confusion_matrix"] == [[0, 0, 1], [0, 1, 0], [1, 1, 0]]


def test_undefined_metrics_are_nan_not_guesses():
    m = classification_metrics(np.array([1, 1]), np.array([[0.2, 0.8], [0.6, 0.4]]), ["normal", "squamous"])
    assert math.isnan(m["roc_auc"]) and math.isnan(m["specificity"])
    assert m["sensitivity"] == 0.5
    with pytest.raises(ValueError, match="shape"):
        classification_metrics(np.array([0, 1]), np.array([[1.0, 0.0]]), ["normal", "squamous"])


def test_roc_auc_and_cross_entropy_by_hand():
    assert roc_auc(np.array([True, False]), np.array([0.3, 0.3])) == 0.5
    assert roc_auc(np.array([True, True, False]), np.array([0.9, 0.1, 0.5])) == 0.5
    assert cross_entropy(np.array([0, 1]), np.array([[0.5, 0.5], [0.2, 0.8]])) == pytest.approx(-(math.log(0.5) + math.log(0.8)) / 2)


def test_mean_ci_uses_the_t_distribution():
    ci = mean_ci([1, 2, 3, 4, 5])
    # s = sqrt(2.5), se = s / sqrt(5), t(0.975, 4) = 2.776445
    half = 2.776445 * math.sqrt(2.5) / math.sqrt(5)
    assert ci.mean == 3 and ci.n == 5
    assert ci.half_width == pytest.approx(half, rel=1e-6)
    assert (ci.low, ci.high) == pytest.approx((3 - half, 3 + half), rel=1e-6)
    assert mean_ci([0.7, 0.9], confidence=0.90).half_width == pytest.approx(6.313752 * 0.1414214 / math.sqrt(2), rel=1e-6)
    single = mean_ci([0.8])
    assert single.mean == 0.8 and math.isnan(single.half_width)


def test_paired_difference_by_seed_matches_hand_computed_t_test():
    baseline = {0: 1.0, 1: 2.0, 2: 3.0, 7: 9.0}  # seed 7 has no partner: left out of the pairs
    other = {0: 2.0, 1: 4.0, 2: 3.0}
    d = paired_difference(baseline, other)
    # differences 1, 2, 0: mean 1, s 1, se 1/sqrt(3), t = sqrt(3), df 2
    assert d.seeds == [0, 1, 2] and d.n == 3
    assert d.mean == pytest.approx(1.0)
    assert d.half_width == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    t = math.sqrt(3)
    p = 2 * (1 - (0.5 + t / (2 * math.sqrt(2 + t * t))))  # Student t CDF with 2 degrees of freedom
    assert d.p_value == pytest.approx(p, rel=1e-6)
    same = paired_difference({0: 0.5, 1: 0.6}, {0: 0.5, 1: 0.6})
    assert same.mean == 0 and same.p_value == 1.0
