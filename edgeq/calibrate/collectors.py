"""The statistics a pass can ask the calibration stream for (`edgeq.calibrate.stream.collect` feeds them all in one
pass): `StatisticPoint` names the model state it is measured on and its collector; the collectors are activation
ranges (min/max or histograms, per tensor or per channel), reservoir-sampled rows, per-channel means, and the
calibration batches themselves (for a pass that runs a model it made on them). A pass with a statistic of its
own defines its collector beside it (AdaRound's input moments: `quantize/repair/adaround.py`).

>>> means = ChannelMeans([("conv1_out", 1)], max_samples=512)
>>> means.tensors, means.ordered
(['conv1_out'], True)
"""
from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from edgeq.calibrate.observers import ChannelHistogramObserver, ChannelMinMaxObserver, HistogramObserver, MinMaxObserver
from edgeq.calibrate.stream import WORKERS, Collector
from edgeq.data import Batch
from edgeq.errors import ModelError

Observer = MinMaxObserver | HistogramObserver | ChannelMinMaxObserver | ChannelHistogramObserver


@dataclass
class StatisticPoint:
    """One statistic a pass needs: which collector (and so which tensors and samples). Its model state is the float
    graph as the passes before its pass left it (`quantize/pipeline.py` groups points by it); `holds_back`: every 5th
    batch is kept out of the collectors that skip held-back batches (`--method auto` scores on them)."""

    name: str
    collector: Collector
    holds_back: bool = False


@dataclass
class Ranges:
    """An observer per float32 tensor (histograms answer every calibration method), fed in any order from any
    thread: the result does not depend on it. NaN/Inf is a ModelError naming the first tensor that holds it
    (`diagnose`). Skips the held-back batches."""

    tensors: list[str]
    histogram: bool = True
    channel_axis: int | None = None
    max_samples: int | None = None
    diagnose: Callable[[Batch], str | None] = lambda batch: None
    skips_holdout: bool = True
    ordered: bool = False
    samples: int = 0
    observers: dict[str, Observer] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._locks: dict[str, threading.Lock] = {}
        self._registry = threading.Lock()

    def _make(self) -> Observer:
        if self.channel_axis is not None:
            return ChannelHistogramObserver(axis=self.channel_axis) if self.histogram else ChannelMinMaxObserver(axis=self.channel_axis)
        return HistogramObserver() if self.histogram else MinMaxObserver()

    def update(self, index: int, values: dict[str, np.ndarray], batch: Batch) -> None:
        with self._registry:
            self.samples += batch.size
        start = (index % WORKERS) * len(self.tensors) // WORKERS  # workers on neighbouring batches start apart: fewer waits
        for name in self.tensors[start:] + self.tensors[:start]:
            value = values.pop(name, None)  # freed once binned
            if value is None or value.dtype != np.float32:
                continue
            bounds = (float(value.min()), float(value.max())) if value.size else (0.0, 0.0)
            if not (math.isfinite(bounds[0]) and math.isfinite(bounds[1])):  # min/max propagate NaN and Inf
                name = self.diagnose(batch) or name
                raise ModelError(f"tensor {name!r} holds NaN/Inf on finite calibration data: the model overflows float32",
                                 "check the model and the input preprocessing (scale, normalisation)")
            with self._registry:
                observer, lock = self.observers.get(name), self._locks.setdefault(name, threading.Lock())
                if observer is None:
                    observer = self.observers[name] = self._make()
            with lock:  # batches update one tensor's observer in any order: the result does not depend on it
                if self.channel_axis is None:
                    observer.update(value, bounds)
                else:
                    observer.update(value)

    def in_graph_order(self) -> dict[str, Observer]:
        return {name: self.observers[name] for name in self.tensors if name in self.observers}


@dataclass
class Reservoir:
    """A uniform sample (reservoir, Algorithm R: constant memory) of `rows` rows of each tensor, flattened to
    [rows, channels] along the last axis; fed in data order (the sample depends on it and on `seed`)."""

    tensors: list[str]
    rows: int = 2048
    seed: int = 0
    max_samples: int | None = None
    skips_holdout: bool = False
    ordered: bool = True
    kept: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.seed)
        self._seen: dict[str, int] = {}

    def update(self, index: int, values: dict[str, np.ndarray], batch: Batch) -> None:
        for name in self.tensors:
            value = values[name]
            flat = value.reshape(-1, value.shape[-1]).astype(np.float64)
            start = self._seen.get(name, 0)
            if name not in self.kept:
                self.kept[name] = np.empty((0, flat.shape[1]))
            fill = min(self.rows - len(self.kept[name]), len(flat))
            self.kept[name] = np.concatenate([self.kept[name], flat[:fill]])
            # row t replaces slot j ~ U[0, t] when j < rows, vectorised; numpy's assignment keeps the last of
            # duplicate slots, as the sequential loop would
            t = start + np.arange(fill, len(flat))
            slots = self._rng.integers(0, t + 1)
            take = slots < self.rows
            self.kept[name][slots[take]] = flat[fill:][take]
            self._seen[name] = start + len(flat)


@dataclass
class ChannelMeans:
    """Mean of each (tensor, channel axis) over every other axis, summed in float64 in data order."""

    targets: list[tuple[str, int]]
    max_samples: int | None = None
    skips_holdout: bool = False
    ordered: bool = True

    def __post_init__(self) -> None:
        self.tensors = list(dict.fromkeys(name for name, _ in self.targets))
        self._axes = dict(self.targets)
        self._sums: dict[str, np.ndarray] = {}
        self._counts: dict[str, int] = {}

    def update(self, index: int, values: dict[str, np.ndarray], batch: Batch) -> None:
        for name in self.tensors:
            value, axis = values[name], self._axes[name]
            channels = np.moveaxis(value, axis, -1).reshape(-1, value.shape[axis])
            self._sums[name] = self._sums.get(name, 0.0) + channels.sum(axis=0, dtype=np.float64)
            self._counts[name] = self._counts.get(name, 0) + channels.shape[0]

    def means(self) -> dict[str, np.ndarray]:
        return {name: self._sums[name] / self._counts[name] for name in self.tensors if name in self._sums}


@dataclass
class KeptBatches:
    """The calibration batches themselves, in data order (for a pass that runs a model it changed on them)."""

    max_samples: int | None = None
    tensors: list[str] = field(default_factory=list)
    skips_holdout: bool = False
    ordered: bool = True
    batches: list[Batch] = field(default_factory=list)

    def update(self, index: int, values: dict[str, np.ndarray], batch: Batch) -> None:
        self.batches.append(batch)
