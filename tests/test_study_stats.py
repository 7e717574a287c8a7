"""The study's statistics: bootstrap against direct computation, coverage on a simulated case,
a planted effect found, no effect invented, Holm and the MDE by hand."""

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats
from scipy.special import expit

from ctsynth.classifier.evaluate import classification_metrics
from ctsynth.classifier.stats import (
    BOOTSTRAP_METRICS,
    holm,
    item_bootstrap,
    mean_bootstrap,
    metric_replicates,
    minimum_detectable_effect,
    paired_bootstrap,
)

CLASSES = ["normal", "squamous"]


def _probabilities(correct: np.ndarray, y: np.ndarray, rng=None) -> np.ndarray:
    """Two-class probabilities whose arg-max is right where `correct` is (graded, so AUC varies)."""
    rng = rng or np.random.default_rng(0)
    confidence = 0.55 + 0.4 * rng.random(len(y))
    pred = np.where(correct, y, 1 - y)
    p = np.empty((len(y), 2))
    p[np.arange(len(y)), pred] = confidence
    p[np.arange(len(y)), 1 - pred] = 1 - confidence
    return p


@pytest.mark.parametrize("metric", BOOTSTRAP_METRICS)
def test_replicates_equal_the_metric_on_the_resampled_images(metric):
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 40)
    p = _probabilities(rng.random(40) < 0.7, y, rng)
    indices = rng.integers(0, 40, (5, 40))
    got = metric_replicates(metric, y, p, CLASSES, indices)
    want = [classification_metrics(y[row], p[row], CLASSES)[metric] for row in indices]
    assert got == pytest.approx(want, abs=1e-12, nan_ok=True)


def test_item_bootstrap_covers_the_true_accuracy_at_about_the_nominal_rate():
    rng = np.random.default_rng(0)
    true, hits, trials = 0.7, 0, 150
    for trial in range(trials):
        y = rng.integers(0, 2, 144)
        ci = item_bootstrap("accuracy", y, _probabilities(rng.random(144) < true, y, rng), CLASSES, replicates=400, seed=trial)
        hits += ci.low <= true <= ci.high
    # nominal 95 %: the binomial spread of 150 trials is about +-3.6 points
    assert 0.88 <= hits / trials <= 0.995


def _simulated_arm(rng, difficulty, y, shift, seeds=5, seed_sd=0.3):
    """Per seed: image i is right with probability expit(difficulty_i + shift + seed effect)."""
    return {s: _probabilities(rng.random(len(y)) < expit(difficulty + shift + rng.normal(0, seed_sd)), y, rng) for s in range(seeds)}


def test_paired_two_level_bootstrap_covers_the_true_difference():
    """Images of varying difficulty, a seed effect per run: the population difference is known by
    simulation. The two-level bootstrap is conservative (docs/study.md), never anti-conservative."""
    rng = np.random.default_rng(2)
    a, b = 1.2, 0.7
    population = rng.normal(0, 3, 400_000)
    true = float(expit(population[:200_000] + a + rng.normal(0, 0.3, 200_000)).mean()
                 - expit(population[200_000:] + b + rng.normal(0, 0.3, 200_000)).mean())
    hits, trials = 0, 80
    for trial in range(trials):
        difficulty, y = rng.normal(0, 3, 144), rng.integers(0, 2, 144)
        result = paired_bootstrap("accuracy", y, _simulated_arm(rng, difficulty, y, a), _simulated_arm(rng, difficulty, y, b),
                                  CLASSES, replicates=300, seed=trial)
        hits += result.low <= true <= result.high
    assert hits / trials >= 0.88


def test_a_planted_effect_is_found_and_no_effect_is_not_invented():
    rng = np.random.default_rng(3)
    difficulty, y = rng.normal(0, 2, 144), rng.integers(0, 2, 144)
    better = paired_bootstrap("balanced_accuracy", y, _simulated_arm(rng, difficulty, y, 2.5), _simulated_arm(rng, difficulty, y, 0.0),
                              CLASSES, replicates=1000)
    assert better.difference > 0.1 and better.low > 0 and better.p_value < 0.01
    false_positives = 0
    for trial in range(20):
        same = paired_bootstrap("balanced_accuracy", y, _simulated_arm(rng, difficulty, y, 0.5), _simulated_arm(rng, difficulty, y, 0.5),
                                CLASSES, replicates=300, seed=trial)
        false_positives += same.p_value < 0.05
    assert false_positives <= 3  # 5 % expected; the conservative bootstrap gives fewer


def test_identical_arms_differ_by_exactly_zero_with_p_one():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 50)
    arm = {s: _probabilities(rng.random(50) < 0.8, y, rng) for s in range(3)}
    result = paired_bootstrap("balanced_accuracy", y, arm, dict(arm), CLASSES, replicates=200)
    assert (result.difference, result.low, result.high, result.p_value) == (0.0, 0.0, 0.0, 1.0)
    mean = mean_bootstrap("accuracy", y, arm, CLASSES, replicates=200)
    assert mean.estimate == pytest.approx(np.mean([classification_metrics(y, p, CLASSES)["accuracy"] for p in arm.values()]))
    assert mean.low <= mean.estimate <= mean.high


def test_holm_by_hand():
    # sorted 0.01, 0.02, 0.04 with m = 3: 0.03, max(0.03, 0.04), max(0.04, 0.04)
    assert holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    adjusted = holm([0.01, math.nan])
    assert adjusted[0] == pytest.approx(0.01) and math.isnan(adjusted[1])


def test_minimum_detectable_effect_formula():
    z = scipy_stats.norm.ppf(1 - 0.05 / (2 * 4)) + scipy_stats.norm.ppf(0.8)
    assert minimum_detectable_effect(0.02, 0.05, 4, 0.8) == pytest.approx(z * 0.02)
    assert math.isnan(minimum_detectable_effect(math.nan, 0.05, 4, 0.8))
