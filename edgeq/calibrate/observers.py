"""Streaming range observers: constant memory in the number of samples, order-independent results.

The histogram grid is anchored at zero with a power-of-two half-width that only depends on the largest |x| seen,
so merging batches in any order gives the same counts as one pass over all the data.
"""
from __future__ import annotations

import math
import threading
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


# Histogram updates bin CHUNK values at a time in work arrays reused per thread: bounded memory whatever the tensor,
# and no fresh multi-MB temporary per tensor and batch, whose page faults and unmapping stall the other core (two
# binning threads ran 3× slower with temporaries than with reused arrays).
CHUNK = 1 << 18
_SCRATCH = threading.local()


def _work_arrays() -> tuple[np.ndarray, np.ndarray]:
    """This thread's float32 and index arrays of CHUNK values."""
    arrays = getattr(_SCRATCH, "arrays", None)
    if arrays is None or len(arrays[0]) != CHUNK:
        arrays = _SCRATCH.arrays = np.empty(CHUNK, np.float32), np.empty(CHUNK, np.intp)
    return arrays


def release_scratch() -> None:
    """Free this thread's work arrays (calibration calls it when its pass ends)."""
    _SCRATCH.__dict__.pop("arrays", None)


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
        work_scaled, work_index = _work_arrays()
        for start in range(0, x.size, CHUNK):
            part = x[start:start + CHUNK]
            scaled, index = work_scaled[:part.size], work_index[:part.size]
            np.multiply(part, factor, out=scaled)
            below_zero = np.flatnonzero((scaled == 0) & (part < 0)) if factor < 1 and low < 0 else None
            np.floor(scaled, out=scaled)
            scaled += np.float32(self.bins // 2)
            np.copyto(index, scaled, casting="unsafe")
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
        spike of exact zeros after a ReLU does not decide the threshold. Candidate thresholds are scored in
        batches from prefix sums, not in a Python loop per threshold. The range never extends beyond the observed
        min and max.

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
    """Number of histogram bins T that minimises KL(P_T || Q_T) (TensorRT / MXNet's calibration, from prefix sums).

    P_T: the first T bins, everything beyond added to bin T-1. Q_T: P_T's first T bins merged into `quantized_bins`
    groups (T // quantized_bins bins each, the remainder in the last group), each group's mass spread evenly over its
    non-empty bins. Both are smoothed (zeros get eps, taken from the non-zeros) as the reference implementations do.
    `hist` holds counts (every non-empty bin at least 1). Unless `exhaustive`, a coarse grid of about 48 candidates is
    refined around its 6 best on grids 4× finer, down to single bins: 6× fewer candidates than every bin on PP-OCR
    det's 329 activations, where it finds the exhaustive minimum for 325 (the other 4 within 3.1% of its KL;
    refining only around the single best missed 23).
    """
    used = int(np.flatnonzero(hist)[-1]) + 1
    if used <= quantized_bins:
        return used
    tables = _KLTables(hist[:used], quantized_bins)
    candidates = np.arange(quantized_bins, used + 1)
    stride = 1 if exhaustive else max(1, -(-len(candidates) // COARSE_CANDIDATES))
    coarse = candidates[::stride] if candidates[::stride][-1] == used else np.append(candidates[::stride], used)
    scores = dict(zip(coarse.tolist(), tables.scores(coarse).tolist()))
    while stride > 1:  # around the best few, a finer grid, down to every bin
        finer = max(1, stride // REFINE_FACTOR)
        near = set()
        for best in sorted(scores, key=scores.get)[:REFINED_MINIMA]:
            near.update(range(max(quantized_bins, best - stride), min(used, best + stride) + 1, finer))
        fine = np.array(sorted(near - scores.keys()), dtype=np.int64)
        if len(fine):
            scores.update(zip(fine.tolist(), tables.scores(fine).tolist()))
        stride = finer
    return min(scores, key=lambda t: (scores[t], t))


class _KLTables:
    """Prefix sums over a histogram that score any candidate T in O(quantized_bins) instead of O(T).

    With e = eps · zeros / non-zeros (the smoothing taken from each non-empty bin), KL(P_T || Q_T) · total splits
    into Σ (p - e) log(p - e) over P's non-empty bins, minus Σ over Q's groups of their smoothed mass times
    log(per-bin value - e_Q), plus closed forms for the smoothed empty bins. Only the first sum depends on every bin
    and on e, which changes with T; a Taylor series in e, (x - e) log(x - e) = x log x - e (log x + 1) +
    Σₖ eᵏ / (k (k-1) xᵏ⁻¹), turns it into prefix sums of x log x, log x and x¹⁻ᵏ (e ≤ eps · T ≪ 1 ≤ x, so a few terms
    reach float64 precision). The last bin of P_T (which takes the clipped tail) is scored exactly.
    """

    def __init__(self, hist: np.ndarray, quantized_bins: int, eps: float = 1e-4) -> None:
        self.hist, self.levels, self.eps = hist.astype(np.float64), quantized_bins, eps
        self.total = float(self.hist.sum())
        nonzero = self.hist > 0
        x = np.where(nonzero, self.hist, 1.0)
        self.counts, self.filled = _prefix(self.hist), _prefix(nonzero.astype(np.float64))
        t = np.arange(quantized_bins, len(x) + 1)   # the largest e / x any candidate T can see
        ratio = eps * float(np.max((t - self.filled[t]) / np.maximum(self.filled[t], 1))) / x[nonzero].min()
        terms = max(2, math.ceil(-37.0 / math.log(min(max(ratio, 1e-300), 0.5))))  # ratioᵗᵉʳᵐˢ < 1e-16
        series = [x * np.log(x), np.log(x) + 1.0] + [x ** (1 - k) for k in range(2, terms + 1)]
        self.series = [_prefix(np.where(nonzero, s, 0.0)) for s in series]
        self.coefficients = [1.0, -1.0] + [1.0 / (k * (k - 1)) for k in range(2, terms + 1)]

    def scores(self, candidates: np.ndarray) -> np.ndarray:
        """KL(P_T || Q_T) for each candidate T."""
        t = candidates.astype(np.int64)
        eps, levels, total = self.eps, self.levels, self.total
        last_count = self.hist[t - 1]
        tail = total - self.counts[t]
        tail_fills_last = (last_count == 0) & (tail > 0)              # the clipped tail makes P's last bin non-empty
        p_nonzero = self.filled[t] + tail_fills_last
        p_zeros = t - p_nonzero
        e_p = eps * p_zeros / np.maximum(p_nonzero, 1)
        # Q's groups: bins [edge j, edge j+1), the last one up to T; mass from the unclipped bins only
        edges = np.arange(levels + 1)[None, :] * (t // levels)[:, None]
        edges[:, -1] = t
        mass = np.diff(self.counts[edges], axis=1)
        filled = np.diff(self.filled[edges], axis=1)
        filled[:, -1] += tail_fills_last
        tail_only = (mass[:, -1] == 0) & (tail > 0)                   # Q's last group is empty: its one P bin has q = 0
        q_zeros = p_zeros + tail_only
        q_nonzero = t - q_zeros
        e_q = eps * q_zeros / np.maximum(q_nonzero, 1)
        q_total = self.counts[t] - e_q * q_nonzero + eps * q_zeros    # Σ of smoothed Q (P's is `total`)
        log_ratio = np.log(q_total / total)
        # Σ (p - e_p) log(p - e_p) over P's non-empty bins: the first T-1 from the series, the last one exactly
        powers = e_p[None, :] ** np.arange(len(self.series))[:, None]
        head = sum(c * pw * s[t - 1] for c, pw, s in zip(self.coefficients, powers, self.series))
        last = np.where(tail_only, 0.0, last_count + tail - e_p)
        head += np.where(last > 0, last * np.log(np.where(last > 0, last, 1.0)), 0.0)
        # Σ over Q's non-empty groups of their smoothed P mass (the tail in the last) × log(smoothed per-bin q)
        counted = mass > 0
        per_bin = np.divide(mass, filled, out=np.zeros_like(mass), where=counted)
        log_q = np.log(per_bin - e_q[:, None], out=per_bin, where=counted)
        cross = ((mass - e_p[:, None] * filled) * log_q).sum(axis=1) + tail * log_q[:, -1]
        matched = total - e_p * p_nonzero - np.where(tail_only, tail - e_p, 0.0)  # Σ smoothed p where q is non-zero
        kl = head - cross + log_ratio * (matched + eps * p_zeros)
        lone = tail - e_p                                              # P's tail bin facing an empty Q bin (smoothed to eps)
        kl += np.where(tail_only, lone * (np.log(np.where(tail_only, lone, 1.0)) - math.log(eps) + log_ratio), 0.0)
        return kl / total


def _prefix(values: np.ndarray) -> np.ndarray:
    return np.concatenate([[0.0], np.cumsum(values)])


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
