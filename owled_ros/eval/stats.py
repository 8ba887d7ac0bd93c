"""Bootstrap 95 % intervals over frame sets, and paired comparisons of two models on the same frame sets
(scipy.stats.bootstrap, percentile method: robust when every value is the same)."""
import math

import numpy as np
from scipy.stats import bootstrap

CONFIDENCE = 0.95


def interval(values, n_resamples=2000, seed=0, confidence=CONFIDENCE):
    """(mean, low, high) of per-item values; NaN where there are none."""
    values = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if len(values) == 0:
        return math.nan, math.nan, math.nan
    if len(values) == 1 or np.all(values == values[0]):
        return float(values.mean()), float(values.mean()), float(values.mean())
    result = bootstrap((values,), np.mean, confidence_level=confidence, n_resamples=n_resamples, method="percentile",
                       rng=np.random.default_rng(seed))
    return float(values.mean()), float(result.confidence_interval.low), float(result.confidence_interval.high)


def corpus_interval(count, statistic, n_resamples=200, seed=0, confidence=CONFIDENCE):
    """(statistic of all, low, high) for a corpus-level statistic(indices) of `count` items (BLEU, CIDEr...);
    a statistic may return an array (several metrics from the same resamples)."""
    if count < 2:
        value = statistic(np.arange(count)) if count else math.nan
        return value, value, value
    result = bootstrap((np.arange(count),), statistic, vectorized=False, confidence_level=confidence,
                       n_resamples=n_resamples, method="percentile", rng=np.random.default_rng(seed))
    return statistic(np.arange(count)), result.confidence_interval.low, result.confidence_interval.high


def paired_difference(a, b, n_resamples=2000, seed=0, confidence=CONFIDENCE):
    """Mean of a - b over items both have, with its interval (paired bootstrap) and the verdict: +1 when the
    whole interval is above 0, -1 when below, 0 when it holds 0 (no difference shown)."""
    pairs = np.asarray([(x, y) for x, y in zip(a, b) if x is not None and y is not None
                        and not math.isnan(x) and not math.isnan(y)], dtype=np.float64).reshape(-1, 2)
    diff, low, high = interval(pairs[:, 0] - pairs[:, 1], n_resamples, seed, confidence)
    return diff, low, high, verdict(low, high)


def verdict(low, high):
    return int(low > 0) - int(high < 0)


def corrected(count, confidence=CONFIDENCE):
    """Bonferroni: the confidence of each of `count` intervals so that all hold together at `confidence`."""
    return 1 - (1 - confidence) / max(1, count)
