"""How sure a measurement is: 95% confidence intervals by bootstrap, paired and unpaired differences.

Per-token values (KL, top-1 agreement, log-probabilities) are correlated along a sequence, so the bootstrap
resamples blocks of consecutive tokens (BLOCK), not single tokens, and uses the BCa interval (bias-corrected
and accelerated: Efron 1987) on the block means, which keeps close to nominal coverage for skewed quantities
such as KL. Seeded: the same values give the same interval.
"""
from __future__ import annotations

from statistics import NormalDist

import numpy as np

BLOCK = 8  # tokens per resampled block
RESAMPLES = 2000
LEVEL = 0.95
_NORMAL = NormalDist()


def _block_means(values: np.ndarray, block: int) -> np.ndarray:
    n = len(values) // block
    if n < 2:  # too few tokens for blocks: single tokens
        return np.asarray(values, dtype=np.float64)
    return np.asarray(values[: n * block], dtype=np.float64).reshape(n, block).mean(1)


def _bca(units: np.ndarray, stat, seed: int, resamples: int, level: float) -> tuple[float, float]:
    n = len(units)
    theta = float(stat(units))
    if n < 2 or np.all(units == units[0]):
        return theta, theta
    rng = np.random.default_rng(seed)
    boot = np.array([stat(units[idx]) for idx in rng.integers(0, n, size=(resamples, n))])
    below = min(max(float((boot < theta).mean()), 1.0 / resamples), 1.0 - 1.0 / resamples)
    z0 = _NORMAL.inv_cdf(below)
    jack = np.array([stat(np.delete(units, i)) for i in range(n)]) if n <= 2000 else None
    if jack is not None:
        d = jack.mean() - jack
        denom = 6.0 * float((d ** 2).sum()) ** 1.5
        accel = float((d ** 3).sum()) / denom if denom > 0 else 0.0
    else:
        accel = 0.0
    bounds = []
    for q in ((1 - level) / 2, (1 + level) / 2):
        z = _NORMAL.inv_cdf(q)
        p = _NORMAL.cdf(z0 + (z0 + z) / (1 - accel * (z0 + z)))
        bounds.append(float(np.quantile(boot, min(max(p, 0.0), 1.0))))
    return bounds[0], bounds[1]


def mean_interval(values, seed: int = 0, block: int = BLOCK, resamples: int = RESAMPLES, level: float = LEVEL) -> tuple[float, float]:
    """95% interval of the mean of per-token `values`."""
    return _bca(_block_means(np.asarray(values, dtype=np.float64), block), np.mean, seed, resamples, level)


def interval(values, stat, seed: int = 0, block: int = BLOCK, resamples: int = RESAMPLES) -> tuple[float, float]:
    """95% percentile interval of any statistic of per-token values (quantiles, ratios), by block bootstrap."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values) // block
    if n < 2:
        v = float(stat(values))
        return v, v
    blocks = values[: n * block].reshape(n, block)
    rng = np.random.default_rng(seed)
    boot = [stat(blocks[idx].reshape(-1)) for idx in rng.integers(0, n, size=(resamples, n))]
    return float(np.quantile(boot, (1 - LEVEL) / 2)), float(np.quantile(boot, (1 + LEVEL) / 2))


def paired_difference(new, old, seed: int = 0) -> tuple[float, float, float]:
    """(mean difference, low, high) of new - old, token by token (the same evaluation tokens in both)."""
    d = np.asarray(new, dtype=np.float64) - np.asarray(old, dtype=np.float64)
    lo, hi = mean_interval(d, seed)
    return float(d.mean()), lo, hi
