"""Streaming range observers: constant memory in the number of samples, order-independent results.

The histogram grid is anchored at zero with a power-of-two half-width that only depends on the largest |x| seen,
so merging batches in any order gives the same counts as one pass over all the data.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class MinMaxObserver:
    """Running min and max."""

    low: float = math.inf
    high: float = -math.inf

    def update(self, x: np.ndarray) -> None:
        if x.size:
            self.low = min(self.low, float(x.min()))
            self.high = max(self.high, float(x.max()))

    def range(self) -> tuple[float, float]:
        return (self.low, self.high) if self.low <= self.high else (0.0, 0.0)


@dataclass
class HistogramObserver:
    """A signed histogram over [-R, R], R a power of two that grows (with exact re-binning) as data arrives.

    >>> obs = HistogramObserver(bins=8)
    >>> obs.update(np.array([-1.0, 0.5, 3.0]))
    >>> obs.half_width, int(obs.counts.sum())
    (4.0, 3)
    """

    bins: int = 2048
    half_width: float = 0.0
    counts: np.ndarray = field(default=None)  # type: ignore[assignment]
    minmax: MinMaxObserver = field(default_factory=MinMaxObserver)

    def __post_init__(self) -> None:
        if self.bins % 2:
            raise ValueError("bins must be even so that zero is a bin edge")
        if self.counts is None:
            self.counts = np.zeros(self.bins, np.int64)

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float32).ravel()
        if not x.size:
            return
        self.minmax.update(x)
        self._grow_to(max(abs(self.minmax.low), abs(self.minmax.high)))
        # bins / (2R) is a power of two times an integer, so this float32 arithmetic is exact up to x + R rounding.
        index = ((x + np.float32(self.half_width)) * np.float32(self.bins / (2 * self.half_width))).astype(np.int32)
        np.clip(index, 0, self.bins - 1, out=index)
        self.counts += np.bincount(index, minlength=self.bins)

    def _grow_to(self, absmax: float) -> None:
        needed = 2.0 ** math.ceil(math.log2(max(absmax, 2.0**-24)))
        if needed <= self.half_width:
            return
        if self.half_width == 0.0 or not self.counts.any():
            self.half_width = needed
            return
        factor = int(round(needed / self.half_width))
        # Old bin i covers [-R + i w, ...); in the new grid (width f w over [-fR, fR]) it falls in bin (i + (f-1) B/2) / f.
        old = np.arange(self.bins)
        new_index = (old + (factor - 1) * self.bins // 2) // factor
        self.counts = np.bincount(new_index, weights=self.counts, minlength=self.bins).astype(np.int64)
        self.half_width = needed

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(-self.half_width, self.half_width, self.bins + 1)

    def percentile_range(self, percentile: float) -> tuple[float, float]:
        """The (100-p)th and p-th percentiles of the signed values, never beyond the observed min and max."""
        total = self.counts.sum()
        if total == 0:
            return 0.0, 0.0
        cdf = np.cumsum(self.counts) / total
        tail = 1.0 - percentile / 100.0
        edges = self.edges
        low_bin = int(np.searchsorted(cdf, tail, side="right"))
        high_bin = int(np.searchsorted(cdf, 1.0 - tail, side="left"))
        low = max(float(edges[low_bin]), self.minmax.low)
        high = min(float(edges[min(high_bin + 1, self.bins)]), self.minmax.high)
        return low, high
