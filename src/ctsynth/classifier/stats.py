"""Honest statistics for the sweep: mean with a t-interval per ratio, and paired differences.

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
