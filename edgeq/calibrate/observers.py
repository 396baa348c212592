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
        # Scaling by bins / (2R), a power of two, is exact in float32, so a value's bin never depends on R (x + R would
        # round, and then batches binned under a smaller R disagree with one pass). Only underflow loses information:
        # a tiny negative value that scales to -0.0 still belongs just below zero.
        scaled = x * np.float32(self.bins / (2 * self.half_width))
        index = np.floor(scaled).astype(np.int32) + self.bins // 2
        index -= (scaled == 0) & (x < 0)
        self.counts += np.bincount(index, minlength=self.bins)

    def _grow_to(self, absmax: float) -> None:
        # The smallest power of two strictly above |x|: x = R would fall outside the last bin.
        needed = math.ldexp(1.0, math.frexp(max(absmax, 2.0**-24))[1])
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

    def mse_range(self, levels: int = 256, symmetric: bool = False, steps: int = 48) -> tuple[float, float]:
        """The clipping range that minimises the expected squared quantization error over the histogram.

        Inside the range a value costs the rounding noise step²/12; outside it costs its distance to the clip edge
        squared. Candidate ranges shrink each end of [min, max] on a grid (one end at a time for symmetric ranges).
        """
        total = self.counts.sum()
        low, high = self.minmax.range()
        if total == 0 or low == high:
            return low, high
        centres = (self.edges[:-1] + self.edges[1:]) / 2
        used = self.counts > 0
        centres, weights = centres[used], self.counts[used].astype(np.float64)
        fractions = np.linspace(1.0 / steps, 1.0, steps)
        if symmetric:
            absmax = max(abs(low), abs(high))
            lows, highs = -absmax * fractions, absmax * fractions
        else:
            grid_low, grid_high = np.meshgrid(min(low, 0.0) * fractions, max(high, 0.0) * fractions, indexing="ij")
            lows, highs = grid_low.ravel(), grid_high.ravel()
        errors = _expected_errors(centres, weights, np.minimum(lows, 0.0), np.maximum(highs, 0.0), levels)
        best = int(np.argmin(errors))
        return float(max(lows[best], low)), float(min(highs[best], high))


def _expected_errors(values: np.ndarray, weights: np.ndarray, lows: np.ndarray, highs: np.ndarray, levels: int) -> np.ndarray:
    """Weighted squared error of quantizing `values` into each candidate range (candidates × values, chunked)."""
    out = np.empty(len(lows))
    chunk = max(1, 2_000_000 // max(len(values), 1))
    for start in range(0, len(lows), chunk):
        lo, hi = lows[start:start + chunk, None], highs[start:start + chunk, None]
        step = np.maximum(hi - lo, 1e-12) / (levels - 1)
        clipped = np.clip(values[None, :], lo, hi)
        error = (values[None, :] - clipped) ** 2 + step**2 / 12
        out[start:start + chunk] = error @ weights
    return out
