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

    def update(self, x: np.ndarray, bounds: tuple[float, float] | None = None) -> None:
        if x.size:
            low, high = bounds if bounds is not None else (float(x.min()), float(x.max()))
            self.low = min(self.low, low)
            self.high = max(self.high, high)

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

    def update(self, x: np.ndarray, bounds: tuple[float, float] | None = None) -> None:
        """Add values; `bounds` (their min and max) saves two passes when the caller already has them."""
        x = np.asarray(x, np.float32).ravel()
        if not x.size:
            return
        low, high = bounds if bounds is not None else (float(x.min()), float(x.max()))
        self.minmax.low, self.minmax.high = min(self.minmax.low, low), max(self.minmax.high, high)
        self._grow_to(max(abs(self.minmax.low), abs(self.minmax.high)))
        # Scaling by bins / (2R), a power of two, is exact in float32, so a value's bin never depends on R (x + R would
        # round, and then batches binned under a smaller R disagree with one pass); adding bins/2 to the floored value
        # is exact too (integers up to `bins`). Only underflow loses information: a tiny negative value that scales to
        # -0.0 still belongs just below zero, and only a factor below 1 can underflow.
        factor = np.float32(self.bins / (2 * self.half_width))
        scaled = np.multiply(x, factor)
        below_zero = np.flatnonzero((scaled == 0) & (x < 0)) if factor < 1 and low < 0 else None
        np.floor(scaled, out=scaled)
        scaled += np.float32(self.bins // 2)
        index = scaled.astype(np.intp)
        if below_zero is not None and below_zero.size:
            index[below_zero] -= 1
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


    def entropy_range(self, quantized_bins: int | None = None) -> tuple[float, float]:
        """TensorRT's KL-divergence threshold over |x|: the clipping threshold T whose quantization of the clipped
        distribution (outliers folded into the last bin) into `quantized_bins` levels loses the least information.

        As NVIDIA's pytorch-quantization does: 128 levels for signed data and 256 for one-sided data (the levels a
        signed or unsigned 8-bit type has on that side), and the zero bin counted like its neighbour, so that the
        spike of exact zeros after a ReLU does not decide the threshold. Every candidate threshold is scored at once
        (a thresholds × bins matrix), not in a Python loop per threshold. The range never extends beyond the
        observed min and max.

        >>> obs = HistogramObserver()
        >>> obs.update(np.concatenate([np.random.default_rng(0).normal(size=100_000), [40.0]]).astype(np.float32))
        >>> low, high = obs.entropy_range()
        >>> bool(high < 40.0), low == obs.minmax.low
        (True, True)
        """
        low, high = self.minmax.range()
        if self.counts.sum() == 0 or low == high:
            return low, high
        half = self.bins // 2
        folded = (self.counts[half:] + self.counts[:half][::-1]).astype(np.float64)  # |x| histogram over [0, R]
        folded[0] = folded[1]
        levels = quantized_bins or (256 if low >= 0 else 128)
        threshold = _kl_threshold(folded, levels) * (self.half_width / half)
        return max(low, -threshold), min(high, threshold)


# Threshold search: a coarse grid of candidates, then finer grids around the best few (the KL curve of real
# activations has several dips), down to single bins.
COARSE_CANDIDATES, REFINE_FACTOR, REFINED_MINIMA = 48, 4, 6


def _kl_threshold(hist: np.ndarray, quantized_bins: int, exhaustive: bool = False) -> int:
    """Number of histogram bins T that minimises KL(P_T || Q_T) (TensorRT / MXNet's calibration, vectorised).

    P_T: the first T bins, everything beyond added to bin T-1. Q_T: P_T's first T bins merged into `quantized_bins`
    groups (T // quantized_bins bins each, the remainder in the last group), each group's mass spread evenly over its
    non-empty bins. Both are smoothed (zeros get eps, taken from the non-zeros) as the reference implementations do.
    Unless `exhaustive`, a coarse grid of about 48 candidates is refined around its 6 best on grids 4× finer, down
    to single bins: 6× fewer candidates than every bin on PP-OCR det's 329 activations, where it finds the
    exhaustive minimum for 325 (the other 4 within 3.1% of its KL; refining only around the single best missed 23).
    """
    used = int(np.flatnonzero(hist)[-1]) + 1
    if used <= quantized_bins:
        return used
    candidates = np.arange(quantized_bins, used + 1)
    tables = (np.concatenate([[0.0], np.cumsum(hist)]), np.concatenate([[0], np.cumsum(hist > 0)]))
    stride = 1 if exhaustive else max(1, -(-len(candidates) // COARSE_CANDIDATES))
    coarse = np.unique(np.append(candidates[::stride], used))
    scores = dict(zip(coarse.tolist(), _kl_scores(hist, quantized_bins, coarse, tables).tolist()))
    while stride > 1:  # around the best few, a finer grid, down to every bin
        finer = max(1, stride // REFINE_FACTOR)
        near = set()
        for best in sorted(scores, key=scores.get)[:REFINED_MINIMA]:
            near.update(range(max(quantized_bins, best - stride), min(used, best + stride) + 1, finer))
        fine = np.array(sorted(near - scores.keys()), dtype=np.int64)
        if len(fine):
            scores.update(zip(fine.tolist(), _kl_scores(hist, quantized_bins, fine, tables).tolist()))
        stride = finer
    return min(scores, key=lambda t: (scores[t], t))


def _kl_scores(hist: np.ndarray, quantized_bins: int, candidates: np.ndarray, tables, chunk: int = 24) -> np.ndarray:
    """KL(P_T || Q_T) for each candidate T (ascending), a chunk of candidates × bins at a time. Bins at or beyond a
    chunk's largest T are outside every P_T of the chunk, so a chunk only spans that many bins (half the work of
    spanning all `used` bins on a uniform grid of candidates)."""
    cumsum, nonzero_cum = tables
    total = cumsum[-1]
    out = np.empty(len(candidates))
    for start in range(0, len(candidates), chunk):
        t = candidates[start:start + chunk, None]                       # (k, 1)
        width = int(t.max())
        b = np.arange(width)[None, :]                                   # (1, width)
        inside = b < t
        merged = t // quantized_bins
        group = np.minimum(b // merged, quantized_bins - 1)             # (k, width)
        group_lo = np.arange(quantized_bins)[None, :] * merged          # (k, q)
        group_hi = np.where(np.arange(quantized_bins)[None, :] == quantized_bins - 1, t, group_lo + merged)
        mass = cumsum[group_hi] - cumsum[group_lo]                      # Q's groups hold the unclipped bins only
        p = np.where(inside, hist[None, :width], 0.0)
        last = t[:, 0] - 1
        tail = total - cumsum[t[:, 0]]
        p[np.arange(len(t)), last] += tail                              # the clipped tail lands in P's last bin
        filled = (nonzero_cum[group_hi] - nonzero_cum[group_lo]).astype(np.float64)
        filled[:, -1] += (hist[last] == 0) & (tail > 0)                 # ... which makes that bin non-empty
        per_bin = np.where(filled > 0, mass / np.maximum(filled, 1), 0.0)
        q = np.where(p > 0, np.take_along_axis(per_bin, group, axis=1), 0.0)
        out[start:start + len(t)] = _smoothed_kl(p, q, inside)
    return out


def _smoothed_kl(p: np.ndarray, q: np.ndarray, inside: np.ndarray, eps: float = 1e-4) -> np.ndarray:
    """Row-wise KL(p || q) over the `inside` bins after MXNet/ONNX Runtime's smoothing of zero bins."""
    def smooth(d: np.ndarray) -> np.ndarray:
        zeros = inside & (d == 0)
        n_zero = zeros.sum(axis=1, keepdims=True)
        n_nonzero = inside.sum(axis=1, keepdims=True) - n_zero
        eps1 = eps * n_zero / np.maximum(n_nonzero, 1)
        out = np.where(zeros, eps, d - eps1 * (inside & (d != 0)))
        return np.where(inside, out, 0.0)

    ps, qs = smooth(p), smooth(q)
    ps /= ps.sum(axis=1, keepdims=True)
    qs /= np.maximum(qs.sum(axis=1, keepdims=True), 1e-300)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(inside & (ps > 0), ps * np.log(ps / np.where(qs > 0, qs, 1e-300)), 0.0)
    return terms.sum(axis=1)


def _expected_errors(values: np.ndarray, weights: np.ndarray, lows: np.ndarray, highs: np.ndarray, levels: int) -> np.ndarray:
    """Weighted squared error of quantizing `values` into each candidate range (candidates × values, chunked)."""
    out = np.empty(len(lows))
    chunk = max(1, 400_000 // max(len(values), 1))  # bounded temporaries (~3 MB each), whatever the histogram
    for start in range(0, len(lows), chunk):
        lo, hi = lows[start:start + chunk, None], highs[start:start + chunk, None]
        step = np.maximum(hi - lo, 1e-12) / (levels - 1)
        clipped = np.clip(values[None, :], lo, hi)
        error = (values[None, :] - clipped) ** 2 + step**2 / 12
        out[start:start + chunk] = error @ weights
    return out


def _channels_first(x: np.ndarray, axis: int) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)


@dataclass
class ChannelMinMaxObserver:
    """Running min and max per channel along `axis` (e.g. 1 for NCHW activations, -1 for a transformer's hidden size).

    >>> obs = ChannelMinMaxObserver(axis=1)
    >>> obs.update(np.array([[1.0, -2.0], [3.0, 0.5]]))
    >>> obs.low.tolist(), obs.high.tolist()
    ([1.0, -2.0], [3.0, 0.5])
    """

    axis: int = 1
    low: np.ndarray | None = None
    high: np.ndarray | None = None

    def update(self, x: np.ndarray) -> None:
        flat = _channels_first(x, self.axis)
        if not flat.size:
            return
        low, high = flat.min(axis=1).astype(np.float64), flat.max(axis=1).astype(np.float64)
        if self.low is not None and len(self.low) != len(low):
            raise ValueError(f"channel count changed from {len(self.low)} to {len(low)} along axis {self.axis}")
        self.low = low if self.low is None else np.minimum(self.low, low)
        self.high = high if self.high is None else np.maximum(self.high, high)

    def range(self) -> tuple[np.ndarray, np.ndarray]:
        if self.low is None:
            return np.zeros(0), np.zeros(0)
        return self.low.copy(), self.high.copy()


@dataclass
class ChannelHistogramObserver:
    """One `HistogramObserver` per channel along `axis`, updated in one vectorised pass per batch (one bincount over
    channels × bins). Each channel keeps its own power-of-two grid, so streaming equals one shot per channel too.

    >>> obs = ChannelHistogramObserver(axis=0, bins=8)
    >>> obs.update(np.array([[0.5, -0.25], [3.0, 1.0]]))
    >>> [c.half_width for c in obs.channels]
    [1.0, 4.0]
    """

    axis: int = 1
    bins: int = 2048
    channels: list[HistogramObserver] = field(default_factory=list)

    def update(self, x: np.ndarray) -> None:
        flat = _channels_first(x, self.axis)
        if not flat.size:
            return
        if not self.channels:
            self.channels = [HistogramObserver(bins=self.bins) for _ in range(len(flat))]
        if len(self.channels) != len(flat):
            raise ValueError(f"channel count changed from {len(self.channels)} to {len(flat)} along axis {self.axis}")
        lows, highs = flat.min(axis=1), flat.max(axis=1)
        for obs, lo, hi in zip(self.channels, lows, highs):
            obs.minmax.low, obs.minmax.high = min(obs.minmax.low, float(lo)), max(obs.minmax.high, float(hi))
            obs._grow_to(max(abs(obs.minmax.low), abs(obs.minmax.high)))
        factors = np.array([self.bins / (2 * obs.half_width) for obs in self.channels], np.float32)
        scaled = flat * factors[:, None]
        index = np.floor(scaled).astype(np.int64) + self.bins // 2
        index -= (scaled == 0) & (flat < 0)
        index += (np.arange(len(flat)) * self.bins)[:, None]
        counts = np.bincount(index.ravel(), minlength=len(flat) * self.bins).reshape(len(flat), self.bins)
        for obs, c in zip(self.channels, counts):
            obs.counts += c

    def ranges(self, method: str, **options) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel (low, high) arrays by `method` (minmax, percentile, entropy, mse)."""
        pairs = [range_of(obs, method, **options) for obs in self.channels]
        return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])


def range_of(obs: HistogramObserver | MinMaxObserver, method: str, *, percentile: float = 99.99, symmetric: bool = False,
             levels: int = 256) -> tuple[float, float]:
    """The range of one observer by method name: the single switch that calibrate() and `auto` share. `symmetric`
    only changes the mse search (the quantizer makes a symmetric activation range of whatever range it gets)."""
    if isinstance(obs, MinMaxObserver) or method == "minmax":
        return (obs if isinstance(obs, MinMaxObserver) else obs.minmax).range()
    if method == "percentile":
        return obs.percentile_range(percentile)
    if method == "entropy":
        return obs.entropy_range()
    if method == "mse":
        return obs.mse_range(levels=levels, symmetric=symmetric)
    raise ValueError(f"unknown method {method!r}")
