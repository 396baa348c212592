"""Calibration: run the model once per batch with every needed tensor as an output, and stream the values into
observers. Memory stays constant in the number of calibration samples."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from edgeq.calibrate.observers import HistogramObserver, MinMaxObserver
from edgeq.data import Dataset, batches
from edgeq.errors import ConfigError, DataError, ModelError
from edgeq.model import make_session, Model
from edgeq.progress import track

METHODS = ("minmax", "percentile", "mse")


@dataclass
class Calibration:
    """Activation ranges per tensor name, with how they were obtained."""

    ranges: dict[str, tuple[float, float]]
    method: str
    samples: int
    warnings: list[str] = field(default_factory=list)


def calibrate(model: Model, data: Dataset, tensors: list[str] | None = None, *, method: str = "minmax",
              percentile: float = 99.99, batch_size: int = 16, max_samples: int | None = None,
              symmetric: bool = False) -> Calibration:
    """Stream `data` through the model and return activation ranges for `tensors` (default: every float tensor).

    >>> cal = calibrate(model, dataset, method="percentile", percentile=99.99)   # doctest: +SKIP
    >>> cal.ranges["conv1_out"]                                                   # doctest: +SKIP
    (0.0, 5.87)
    """
    if method not in METHODS:
        raise ConfigError(f"unknown calibration method {method!r}", f"use one of: {', '.join(METHODS)}")
    if not 50.0 < percentile <= 100.0:
        raise ConfigError(f"percentile {percentile} is out of range", "give a value in (50, 100], e.g. 99.99")
    graph_inputs = [s.name for s in model.inputs]
    wanted = tensors if tensors is not None else graph_inputs + float_tensors(model.proto)
    session = make_session(with_outputs(model.proto, [t for t in wanted if t not in graph_inputs]), threads=0)
    output_names = [o.name for o in session.get_outputs()]
    observers: dict[str, MinMaxObserver | HistogramObserver] = {}
    make = MinMaxObserver if method == "minmax" else HistogramObserver
    samples = 0
    stream = batches(data, model.inputs, batch_size, refuse_nonfinite=True, max_samples=max_samples)
    for batch in track(stream, "calibrating", total=_batch_count(data, batch_size, max_samples)):
        values = session.run(output_names, batch.inputs)
        named = dict(zip(output_names, values)) | batch.inputs
        for name in wanted:
            value = named.get(name)
            if value is None or value.dtype != np.float32:
                continue
            if not _all_finite(value):
                raise ModelError(f"tensor {name!r} holds NaN/Inf on finite calibration data: the model overflows float32",
                                 "check the model and the input preprocessing (scale, normalisation)")
            observers.setdefault(name, make()).update(value)
        samples += batch.size
    ranges = {name: _range(obs, method, percentile, symmetric) for name, obs in observers.items()}
    cal = Calibration(ranges, method, samples, list(data.notes))
    if samples < 32:
        cal.warnings.append(f"only {samples} calibration samples: ranges may not represent real data (use a few hundred)")
    if method == "percentile" and percentile < 100:
        thin = [n for n, o in observers.items() if isinstance(o, HistogramObserver) and o.counts.sum() * (100 - percentile) < 100]
        if thin:
            cal.warnings.append(f"{len(thin)} tensors saw too few values for the {percentile}th percentile to differ from min/max (e.g. {thin[0]})")
    return cal


def _all_finite(value: np.ndarray) -> bool:
    """One pass, no temporary: a float64 sum of float32 values cannot overflow, so it is finite iff they all are."""
    with np.errstate(invalid="ignore"):  # inf + -inf is the NaN we are looking for, not a warning for the user
        return bool(np.isfinite(value.sum(dtype=np.float64)))


def _range(observer: MinMaxObserver | HistogramObserver, method: str, percentile: float, symmetric: bool) -> tuple[float, float]:
    if isinstance(observer, MinMaxObserver):
        return observer.range()
    if method == "mse":
        return observer.mse_range(symmetric=symmetric)
    return observer.percentile_range(percentile)


def _batch_count(data: Dataset, batch_size: int, max_samples: int | None) -> int | None:
    if data.length is None:
        return None
    n = min(data.length, max_samples) if max_samples else data.length
    return -(-n // batch_size)


def float_tensors(proto: onnx.ModelProto) -> list[str]:
    """Names of node outputs that are (or may be) float32, in graph order; known non-float ones are skipped."""
    known = {v.name: v.type.tensor_type.elem_type for v in list(proto.graph.value_info) + list(proto.graph.output)}
    names = []
    for node in proto.graph.node:
        for out in node.output:
            if out and known.get(out, onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT:
                names.append(out)
    return names


def with_outputs(proto: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of the model that also returns the given intermediate tensors."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    existing = {o.name for o in copy.graph.output}
    for name in names:
        if name not in existing:
            copy.graph.output.append(onnx.ValueInfoProto(name=name))
            existing.add(name)
    return copy
