"""Calibration: run the model once per batch with every needed tensor as an output, and stream the values into
collectors (`stream.collect`; `collectors.py` the statistics a pass can ask for). Memory stays constant in the
number of calibration samples."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx

from edgeq.calibrate.collectors import Observer, Ranges
from edgeq.calibrate.observers import ChannelHistogramObserver, ChannelMinMaxObserver, HistogramObserver, range_of
from edgeq.calibrate.stream import HOLDOUT_EVERY, HOLDOUT_MAX, HOLDOUT_MIN, Collected, Feeds, collect, feed_batches, with_outputs
from edgeq.data import Batch, Dataset
from edgeq.errors import ConfigError
from edgeq.model import Model
from edgeq.runtimes import ONNX_RUNTIME, GraphRuntime

METHODS = ("minmax", "percentile", "entropy", "mse")
__all__ = ["HOLDOUT_EVERY", "HOLDOUT_MAX", "HOLDOUT_MIN", "METHODS", "Calibration", "Feeds", "Observed", "Observer", "calibrate", "check_method",
           "collect", "feed_batches", "float_tensors", "observe", "to_calibration", "with_outputs"]


@dataclass
class Calibration:
    """Activation ranges per tensor name, with how they were obtained. Per-channel calibration gives arrays."""

    ranges: dict[str, tuple]
    method: str
    samples: int
    warnings: list[str] = field(default_factory=list)


@dataclass
class Observed:
    """What one streaming pass saw: an observer per tensor (histograms answer every method), the sample count, and
    the held-back batches when asked for (for choosing a method by output fidelity)."""

    observers: dict[str, Observer]
    samples: int
    notes: list[str] = field(default_factory=list)
    holdout: list[Batch] = field(default_factory=list)
    observe_more: Callable[[], int] | None = field(default=None, repr=False)   # bins the held-back batches: the new count

    def include_holdout(self) -> None:
        """Bin the held-back batches too, once they have served their purpose: the final ranges see all the data
        (histograms do not depend on the order of their batches, so the ranges equal a pass without holding back)."""
        if self.observe_more is not None and self.holdout:
            self.samples = self.observe_more()
        self.holdout = []

    def ranges(self, method: str, *, percentile: float = 99.99, symmetric: bool = False) -> dict[str, tuple]:
        out = {}
        for name, obs in self.observers.items():
            if isinstance(obs, ChannelHistogramObserver):
                out[name] = obs.ranges(method, percentile=percentile, symmetric=symmetric)
            elif isinstance(obs, ChannelMinMaxObserver):
                out[name] = obs.range()
            else:
                out[name] = range_of(obs, method, percentile=percentile, symmetric=symmetric)
        return out


def observe(model: Model, data: Dataset, tensors: list[str] | None = None, *, histogram: bool = True,
            channel_axis: int | None = None, batch_size: int = 16, max_samples: int | None = None,
            holdout: bool = False, runtime: GraphRuntime = ONNX_RUNTIME) -> Observed:
    """One pass over `data` with every wanted tensor as a model output, streamed into observers (constant memory:
    WORKERS batches of activations at a time, one fixed-size observer per tensor): `collect` with one `Ranges`.

    `channel_axis` observes per channel along that axis; `holdout` keeps every 5th batch (at most 128 samples, at
    least 32 or none) out of the observers, for `auto`'s fidelity check.

    >>> seen = observe(model, dataset)                       # doctest: +SKIP
    >>> seen.ranges("entropy")["conv1_out"]                  # doctest: +SKIP
    (0.0, 4.21)
    """
    ranges = range_collector(model, tensors, histogram=histogram, channel_axis=channel_axis, max_samples=max_samples,
                             runtime=runtime)
    return observed(ranges, data, collect(model, data, [ranges], batch_size=batch_size, holdout=holdout, runtime=runtime))


def range_collector(model: Model, tensors: list[str] | None = None, *, histogram: bool = True, channel_axis: int | None = None,
                    max_samples: int | None = None, runtime: GraphRuntime = ONNX_RUNTIME) -> Ranges:
    """The `Ranges` collector of `observe` (default tensors: the graph inputs and every float tensor)."""
    wanted = tensors if tensors is not None else [s.name for s in model.inputs] + float_tensors(model.proto)
    return Ranges(list(wanted), histogram=histogram, channel_axis=channel_axis, max_samples=max_samples,
                  diagnose=lambda batch: _first_nonfinite(model, batch, runtime))


def observed(ranges: Ranges, data: Dataset, collected: Collected | None = None) -> Observed:
    """What a pass's `Ranges` saw, as `observe` returns it (fewer than HOLDOUT_MIN held-back samples: too few to
    judge by, they calibrate too)."""

    def observe_more() -> int:
        collected.feed_held()
        seen.observers = ranges.in_graph_order()
        return ranges.samples

    seen = Observed(ranges.in_graph_order(), ranges.samples, list(data.notes), list(collected.held) if collected else [],
                    observe_more if collected else None)
    if sum(b.size for b in seen.holdout) < HOLDOUT_MIN:
        seen.include_holdout()
    return seen


def _first_nonfinite(model: Model, batch: Batch, runtime: GraphRuntime) -> str | None:
    """On error only: rerun the batch with every float tensor as an output and name the first one (in graph order)
    that is not finite, so the message points at the op that overflows, not at a quantized tensor downstream."""
    names = float_tensors(model.proto)
    try:
        session = runtime.open_graph(with_outputs(model.proto, names), threads=1)
        values = dict(zip(names, session.run(names, batch.inputs)))
    except Exception:  # noqa: BLE001 - a diagnostic; the caller reports the tensor it saw
        return None
    for name in names:
        value = values.get(name)
        if value is not None and value.dtype.kind == "f" and value.size and not np.isfinite(value).all():
            return name
    return None


def calibrate(model: Model, data: Dataset, tensors: list[str] | None = None, *, method: str = "minmax",
              percentile: float = 99.99, batch_size: int = 16, max_samples: int | None = None,
              symmetric: bool = False, channel_axis: int | None = None) -> Calibration:
    """Stream `data` through the model and return activation ranges for `tensors` (default: every float tensor).

    Methods: minmax, percentile (e.g. 99.99), entropy (TensorRT's KL threshold) and mse (least expected squared
    error); `symmetric` tunes mse for int8 activations; `channel_axis` gives per-channel (low, high) arrays.

    >>> cal = calibrate(model, dataset, method="percentile", percentile=99.99)   # doctest: +SKIP
    >>> cal.ranges["conv1_out"]                                                   # doctest: +SKIP
    (0.0, 5.87)
    """
    check_method(method, percentile)
    seen = observe(model, data, tensors, histogram=method != "minmax", channel_axis=channel_axis,
                   batch_size=batch_size, max_samples=max_samples)
    return to_calibration(seen, method, percentile=percentile, symmetric=symmetric)


def check_method(method: str, percentile: float = 99.99) -> None:
    if method not in METHODS:
        raise ConfigError(f"unknown calibration method {method!r}", f"use one of: {', '.join(METHODS)}")
    if not 50.0 < percentile <= 100.0:
        raise ConfigError(f"percentile {percentile} is out of range", "give a value in (50, 100], e.g. 99.99")


def to_calibration(seen: Observed, method: str, *, percentile: float = 99.99, symmetric: bool = False) -> Calibration:
    """Ranges by `method` from one pass's observers, with the warnings a user should see."""
    cal = Calibration(seen.ranges(method, percentile=percentile, symmetric=symmetric), method, seen.samples, list(seen.notes))
    if seen.samples < 32:
        cal.warnings.append(f"only {seen.samples} calibration samples: ranges may not represent real data (use a few hundred)")
    if method == "percentile" and percentile < 100:
        thin = [n for n, o in seen.observers.items() if isinstance(o, HistogramObserver) and o.counts.sum() * (100 - percentile) < 100]
        if thin:
            cal.warnings.append(f"{len(thin)} tensors saw too few values for the {percentile}th percentile to differ from min/max (e.g. {thin[0]})")
    return cal


def float_tensors(proto: onnx.ModelProto) -> list[str]:
    """Names of node outputs that are (or may be) float32, in graph order; known non-float ones are skipped."""
    known = {v.name: v.type.tensor_type.elem_type for v in list(proto.graph.value_info) + list(proto.graph.output)}
    names = []
    for node in proto.graph.node:
        for out in node.output:
            if out and known.get(out, onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT:
                names.append(out)
    return names
