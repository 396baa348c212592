"""Estimates with 95% intervals: Wilson proportions, bootstrap means, SQNR; JSON-safe numbers."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeq.sqnr import sqnr_db

Z95 = 1.959963984540054
# Fixed seed and resample count: the same inputs give the same interval, run after run and machine to machine.
BOOTSTRAP_SEED = 20_240_917
BOOTSTRAP_RESAMPLES = 2000


@dataclass(frozen=True)
class Estimate:
    """A metric value and its 95% confidence interval."""

    value: float
    ci95: tuple[float, float]

    def to_dict(self) -> dict:
        return {"value": json_number(self.value), "ci95": [json_number(self.ci95[0]), json_number(self.ci95[1])]}


def proportion(flags: np.ndarray) -> Estimate:
    """Percentage of true flags with its Wilson 95% interval (sound near 0% and 100%, unlike the normal one).

    >>> est = proportion(np.array([True] * 90 + [False] * 10))
    >>> est.value, [round(v, 1) for v in est.ci95]
    (90.0, [82.6, 94.5])
    """
    n, k = len(flags), int(np.sum(flags))
    if n == 0:
        return Estimate(math.nan, (math.nan, math.nan))
    p = k / n
    denom = 1 + Z95 ** 2 / n
    centre = (p + Z95 ** 2 / (2 * n)) / denom
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95 ** 2 / (4 * n * n)) / denom
    return contain(Estimate(100 * p, (100 * (centre - half), 100 * (centre + half))))


def mean_estimate(values: np.ndarray) -> Estimate:
    """Mean of the finite values with a percentile-bootstrap 95% interval (fixed seed: deterministic).

    >>> mean_estimate(np.array([1.0, 2.0, 3.0])).value
    2.0
    """
    x = finite(values)
    value = float(x.mean()) if len(x) else math.nan
    return contain(Estimate(value, bootstrap_ci(lambda s: s.mean(axis=1), x)))


def sqnr_estimate(signal: np.ndarray, noise: np.ndarray) -> Estimate:
    """10·log10(Σ signal energy / Σ noise energy) over finite samples (`edgeq.sqnr`: 200 dB for identical outputs).

    The bootstrap runs on the noise-to-signal ratio, which stays finite when some resamples carry no noise.
    """
    keep = np.isfinite(signal) & np.isfinite(noise)
    s, e = signal[keep], noise[keep]
    if not len(s) or s.sum() <= 0:
        return Estimate(math.nan, (math.nan, math.nan))
    lo, hi = bootstrap_ci(lambda ss, ee: ee.sum(axis=1) / np.maximum(ss.sum(axis=1), np.finfo(float).tiny), s, e)
    return contain(Estimate(_db(e.sum() / s.sum()), (_db(hi), _db(lo))))


def _db(noise_to_signal: float) -> float:
    return sqnr_db(1.0, noise_to_signal) + 0.0  # + 0.0: no -0.0 dB


def bootstrap_ci(stat: Callable[..., np.ndarray], *arrays: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[float, float]:
    """Percentile-bootstrap 95% interval of `stat`, resampling samples (rows shared by all arrays: paired).

    `stat` maps arrays of shape (resamples, n) to (resamples,). Resamples go in blocks to bound memory.

    >>> bootstrap_ci(lambda s: s.mean(axis=1), np.zeros(10))
    (0.0, 0.0)
    """
    n = len(arrays[0]) if arrays else 0
    if n == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    block = max(1, 4_000_000 // n)
    stats = []
    for start in range(0, resamples, block):
        idx = rng.integers(0, n, size=(min(block, resamples - start), n))
        stats.append(stat(*(a[idx] for a in arrays)))
    lo, hi = np.percentile(np.concatenate(stats), [2.5, 97.5])
    return float(lo), float(hi)


def contain(est: Estimate) -> Estimate:
    """Widen an interval to hold its own estimate: nearly constant values can miss it by a rounding error."""
    lo, hi = est.ci95
    if not (math.isfinite(est.value) and math.isfinite(lo) and math.isfinite(hi)):
        return est
    return Estimate(float(est.value), (min(lo, est.value), max(hi, est.value)))


def finite(values: np.ndarray) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    return x[np.isfinite(x)]


def json_number(v: Any) -> Any:
    """JSON-safe number: bools as 0/1, NaN/inf as null."""
    if isinstance(v, (bool, np.bool_)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(v) else None
    return v
