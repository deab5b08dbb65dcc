"""Confidence intervals for evaluation scores: Wilson for a rate, percentile bootstrap for a mean.

    wilson_interval(87, 100)                   # (0.7902..., 0.9224...) at 95%
    bootstrap_interval(per_item_cider)         # 95% interval of the mean, same answer on every call

Both are deterministic (the bootstrap draws from numpy's PCG64 seeded with `seed`).
"""
import statistics

import numpy as np


def _two_sided_z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence} must lie strictly between 0 and 1 (e.g. 0.95)")
    return statistics.NormalDist().inv_cdf(0.5 + confidence / 2.0)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval (Wilson 1927) for a binomial rate successes/n.

    Unlike the normal approximation it stays inside [0, 1] and is sound at rates near 0 or 1 and at small
    n, which is where an eval set of a few dozen items sits. n == 0 carries no information: (0, 1).
    """
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    z = _two_sided_z(confidence)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # At p = 0 (or 1) the formula's bound is exactly 0 (or 1); floating point leaves ~1e-17 there.
    low = 0.0 if successes == 0 else float(centre - half)
    high = 1.0 if successes == n else float(centre + half)
    return low, high


def bootstrap_interval(per_item_values, confidence: float = 0.95, resamples: int = 10_000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-item values (resampling items with replacement).

    For CIDEr this treats the per-item scores as fixed; the idf weights, which depend on the whole corpus,
    are not recomputed per resample (the usual practice, and cheap).
    """
    values = np.asarray(per_item_values, np.float64).ravel()
    if values.size == 0:
        raise ValueError("bootstrap_interval needs at least one value")
    if np.isnan(values).any():
        raise ValueError("per-item values contain NaN; drop the items without a score first")
    if resamples < 1:
        raise ValueError(f"resamples={resamples} must be at least 1 (10,000 is the usual choice)")
    alpha = (1.0 - confidence) / 2.0
    _two_sided_z(confidence)  # validates confidence
    rng = np.random.default_rng(seed)
    # Resample in chunks so a large eval set never needs a resamples x n index array at once.
    means = np.empty(resamples)
    chunk = max(1, 2**22 // values.size)
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        idx = rng.integers(0, values.size, size=(stop - start, values.size))
        means[start:stop] = values[idx].mean(axis=1)
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)
