"""Honest statistics for the study: test-set and seed uncertainty, paired comparisons, Holm.

1. Per item (one trained classifier): its test metric with a percentile bootstrap CI over test
   images (the sampling error of a 144-image test split is about +-6 points of accuracy).
2. Per comparison (arm A at ratio r vs arm B): a two-level bootstrap paired by seed AND by test
   image. Each replicate draws the seeds with replacement and, once for all seeds and both arms,
   the test images with replacement; the replicate's difference is the mean over the drawn seeds
   of metric_A(images) - metric_B(images). The observed difference is the mean over seeds on the
   whole test split. CI: the replicates' percentiles. p-value: the share of replicates, centred on
   the observed difference, at least as far from it as the observed difference is from 0 (the
   bootstrap test of "no difference"). Pairing by seed removes what both arms of a seed share
   (initialisation, data order); pairing by image removes how hard each test image is.
3. Holm's step-down correction over the family of comparisons (family-wise error <= alpha).
4. Minimum detectable effect of a comparison: (z_{1 - alpha/(2m)} + z_power) x its bootstrap
   standard error, m = family size (Holm's strictest step): the smallest true difference the
   design finds with the stated power.

Older helpers, kept for the per-arm tables: mean over seeds with a t-interval, and the paired
t-test by seed.

Every seed of every ratio counts (no run is dropped). With n seeds the 95 % interval of a mean is
mean +- t_{0.975, n-1} * s / sqrt(n) with s the sample standard deviation (ddof=1). Ratios are
compared with ratio 0 *paired by seed* (same seed = same initialisation, data order and real
images), which removes the seed-to-seed variation both share: the difference d_i = m_r,i - m_0,i
gets the same t-interval and a paired t-test (scipy.stats.ttest_rel) p-value.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class MeanCI:
    mean: float
    low: float
    high: float
    half_width: float
    std: float
    n: int

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PairedDifference:
    mean: float
    low: float
    high: float
    half_width: float
    p_value: float
    n: int
    seeds: list[int]

    def as_dict(self) -> dict:
        return asdict(self)


def mean_ci(values, confidence: float = 0.95) -> MeanCI:
    """Mean and two-sided t confidence interval; NaN interval for fewer than 2 values."""
    array = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    n = len(array)
    if n == 0:
        return MeanCI(math.nan, math.nan, math.nan, math.nan, math.nan, 0)
    mean = float(array.mean())
    if n < 2:
        return MeanCI(mean, math.nan, math.nan, math.nan, math.nan, 1)
    std = float(array.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * std / math.sqrt(n))
    return MeanCI(mean, mean - half, mean + half, half, std, n)


def paired_difference(baseline: dict[int, float], other: dict[int, float], confidence: float = 0.95) -> PairedDifference:
    """other - baseline over the seeds both have: mean, t-interval, paired t-test p-value.

    When every difference is identical the t statistic is undefined: p = 1 if they are all zero
    (nothing changed), NaN otherwise.
    """
    seeds = sorted(
        s for s in set(baseline) & set(other)
        if not (math.isnan(baseline[s]) or math.isnan(other[s]))
    )
    diffs = np.array([other[s] - baseline[s] for s in seeds], dtype=np.float64)
    interval = mean_ci(diffs, confidence)
    if len(seeds) < 2:
        p_value = math.nan
    elif np.allclose(diffs, diffs[0], rtol=0, atol=1e-15):
        p_value = 1.0 if abs(diffs[0]) <= 1e-15 else math.nan
    else:
        p_value = float(stats.ttest_rel([other[s] for s in seeds], [baseline[s] for s in seeds]).pvalue)
    return PairedDifference(interval.mean, interval.low, interval.high, interval.half_width, p_value, len(seeds), seeds)


# ------------------------------------------------------------------------------------------------
# Bootstrap over test images (and seeds)

BOOTSTRAP_METRICS = ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "f1", "roc_auc")


def resample_indices(n: int, replicates: int, rng: np.random.Generator) -> np.ndarray:
    """replicates x n indices into n test images, drawn with replacement."""
    return rng.integers(0, n, size=(replicates, n))


def metric_replicates(metric: str, y_true, probabilities, classes: list[str], indices: np.ndarray) -> np.ndarray:
    """`metric` of one classifier's test predictions on every resample (row) of `indices`.

    Same definitions as evaluate.classification_metrics (cancer = every class but normal); a
    class-conditional metric undefined on a resample (its class not drawn) is NaN there.
    """
    from ctsynth.classifier.evaluate import positive_class_ids, roc_auc

    if metric not in BOOTSTRAP_METRICS:
        raise ValueError(f"no bootstrap for metric {metric!r}; choose one of {list(BOOTSTRAP_METRICS)}")
    y_true = np.asarray(y_true, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    positive = np.array(positive_class_ids(classes))
    true_cancer = np.isin(y_true, positive)
    if metric == "roc_auc":
        score = probabilities[:, positive].sum(axis=1)
        return np.array([roc_auc(true_cancer[row], score[row]) for row in indices])
    y_pred = probabilities.argmax(axis=1)
    replicates, n = indices.shape
    weights = np.zeros((replicates, n))
    np.add.at(weights, (np.repeat(np.arange(replicates), n), indices.ravel()), 1.0)
    pred_cancer = np.isin(y_pred, positive)
    with np.errstate(invalid="ignore", divide="ignore"):
        if metric == "accuracy":
            return weights @ (y_pred == y_true) / n
        if metric == "balanced_accuracy":
            recalls = []
            for c in range(len(classes)):
                in_class = y_true == c
                if in_class.any():
                    recalls.append((weights @ (in_class & (y_pred == c))) / (weights @ in_class))
            return np.nanmean(np.stack(recalls), axis=0) if recalls else np.full(replicates, np.nan)
        tp = weights @ (true_cancer & pred_cancer)
        fn = weights @ (true_cancer & ~pred_cancer)
        tn = weights @ (~true_cancer & ~pred_cancer)
        fp = weights @ (~true_cancer & pred_cancer)
        if metric == "sensitivity":
            return tp / (tp + fn)
        if metric == "specificity":
            return tn / (tn + fp)
        return 2 * tp / (2 * tp + fp + fn)


@dataclass(frozen=True)
class BootstrapCI:
    estimate: float  # the metric on the whole test split
    low: float
    high: float
    std_error: float
    replicates: int

    def as_dict(self) -> dict:
        return asdict(self)


def item_bootstrap(metric: str, y_true, probabilities, classes: list[str], replicates: int = 2000,
                   confidence: float = 0.95, seed: int = 0) -> BootstrapCI:
    """One classifier's test metric with a percentile bootstrap CI over test images."""
    y_true = np.asarray(y_true)
    full = np.arange(len(y_true))[None, :]
    estimate = float(metric_replicates(metric, y_true, probabilities, classes, full)[0])
    draws = metric_replicates(metric, y_true, probabilities, classes, resample_indices(len(y_true), replicates, np.random.default_rng(seed)))
    draws = draws[~np.isnan(draws)]
    if len(draws) == 0:
        return BootstrapCI(estimate, math.nan, math.nan, math.nan, 0)
    tail = (1 - confidence) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    return BootstrapCI(estimate, float(low), float(high), float(draws.std(ddof=1)), int(len(draws)))


@dataclass(frozen=True)
class Comparison:
    """arm A minus arm B, paired by seed and test image (module docstring, item 2)."""

    difference: float
    low: float
    high: float
    std_error: float
    p_value: float
    seeds: list[int]
    replicates: int

    def as_dict(self) -> dict:
        return asdict(self)


def paired_bootstrap(
    metric: str,
    y_true,
    arm_a: dict[int, np.ndarray],
    arm_b: dict[int, np.ndarray],
    classes: list[str],
    replicates: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Comparison:
    """Two-level bootstrap of mean_seed[metric(A_seed) - metric(B_seed)] on one shared test split.

    arm_a / arm_b: seed -> test probabilities (n x classes), rows in the order of `y_true`. Only
    seeds both arms have are paired. With one seed only the test images are resampled.
    """
    y_true = np.asarray(y_true)
    seeds = sorted(set(arm_a) & set(arm_b))
    if not seeds:
        return Comparison(math.nan, math.nan, math.nan, math.nan, math.nan, [], 0)
    rng = np.random.default_rng(seed)
    full = np.arange(len(y_true))[None, :]
    observed = np.array([metric_replicates(metric, y_true, arm_a[s], classes, full)[0] - metric_replicates(metric, y_true, arm_b[s], classes, full)[0] for s in seeds])
    images = resample_indices(len(y_true), replicates, rng)
    # per seed and image-replicate: the difference on those images (same images for A and B)
    per_seed = np.stack([metric_replicates(metric, y_true, arm_a[s], classes, images) - metric_replicates(metric, y_true, arm_b[s], classes, images) for s in seeds])
    drawn_seeds = rng.integers(0, len(seeds), size=(replicates, len(seeds)))
    draws = np.nanmean(per_seed[drawn_seeds, np.arange(replicates)[:, None]], axis=1)
    draws = draws[~np.isnan(draws)]
    difference = float(np.nanmean(observed))
    if len(draws) == 0 or math.isnan(difference):
        return Comparison(difference, math.nan, math.nan, math.nan, math.nan, seeds, 0)
    tail = (1 - confidence) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    if np.allclose(draws, difference, rtol=0, atol=1e-12):
        p_value = 1.0 if abs(difference) <= 1e-12 else 0.0  # no variation at all: the difference is exact
    else:
        # centred replicates play the null distribution; the +1s keep p > 0 (Davison & Hinkley 4.4)
        extreme = np.abs(draws - difference) >= abs(difference) - 1e-12
        p_value = float((extreme.sum() + 1) / (len(draws) + 1))
    return Comparison(difference, float(low), float(high), float(draws.std(ddof=1)), p_value, seeds, int(len(draws)))


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order as given; NaN stays NaN, not counted)."""
    finite = [(p, i) for i, p in enumerate(p_values) if p is not None and not math.isnan(p)]
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    m = len(finite)
    for rank, (p, i) in enumerate(sorted(finite)):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def minimum_detectable_effect(std_error: float, alpha: float, family_size: int, power: float) -> float:
    """(z_{1 - alpha/(2m)} + z_power) x std_error: the true difference found with `power`."""
    if std_error is None or math.isnan(std_error) or family_size < 1:
        return math.nan
    return float((stats.norm.ppf(1 - alpha / (2 * family_size)) + stats.norm.ppf(power)) * std_error)


def mean_bootstrap(metric: str, y_true, arm: dict[int, np.ndarray], classes: list[str], replicates: int = 2000,
                   confidence: float = 0.95, seed: int = 0) -> BootstrapCI:
    """Mean over seeds of one arm's metric, with a two-level (seed x test image) bootstrap CI."""
    y_true = np.asarray(y_true)
    seeds = sorted(arm)
    if not seeds:
        return BootstrapCI(math.nan, math.nan, math.nan, math.nan, 0)
    rng = np.random.default_rng(seed)
    full = np.arange(len(y_true))[None, :]
    estimate = float(np.nanmean([metric_replicates(metric, y_true, arm[s], classes, full)[0] for s in seeds]))
    images = resample_indices(len(y_true), replicates, rng)
    per_seed = np.stack([metric_replicates(metric, y_true, arm[s], classes, images) for s in seeds])
    drawn = rng.integers(0, len(seeds), size=(replicates, len(seeds)))
    with np.errstate(invalid="ignore"):
        draws = np.nanmean(per_seed[drawn, np.arange(replicates)[:, None]], axis=1)
    draws = draws[~np.isnan(draws)]
    if len(draws) == 0:
        return BootstrapCI(estimate, math.nan, math.nan, math.nan, 0)
    tail = (1 - confidence) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    return BootstrapCI(estimate, float(low), float(high), float(draws.std(ddof=1)), int(len(draws)))
