"""Calibration: run the model once per batch with every needed tensor as an output, and stream the values into
observers. Memory stays constant in the number of calibration samples."""
from __future__ import annotations

import math
import os
import queue
import threading
from dataclasses import dataclass, field

import numpy as np
import onnx

from edgeq.calibrate.observers import (ChannelHistogramObserver, ChannelMinMaxObserver, HistogramObserver, MinMaxObserver,
                                       range_of)
from edgeq.data import Batch, Dataset, batches
from edgeq.errors import ConfigError, DataError, ModelError
from edgeq.model import make_session, Model
from edgeq.progress import track

METHODS = ("minmax", "percentile", "entropy", "mse")
# `auto` evaluates on every HOLDOUT_EVERY-th batch (never used for ranges), keeping at most HOLDOUT_MAX samples.
HOLDOUT_EVERY, HOLDOUT_MAX = 5, 128

Observer = MinMaxObserver | HistogramObserver | ChannelMinMaxObserver | ChannelHistogramObserver


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
            holdout: bool = False) -> Observed:
    """One pass over `data` with every wanted tensor as a model output, streamed into observers (constant memory:
    one batch of activations at a time, one fixed-size observer per tensor).

    `channel_axis` observes per channel along that axis; `holdout` keeps every 5th batch (at most 128 samples)
    out of the observers, for `auto`'s fidelity check.

    >>> seen = observe(model, dataset)                       # doctest: +SKIP
    >>> seen.ranges("entropy")["conv1_out"]                  # doctest: +SKIP
    (0.0, 4.21)
    """
    graph_inputs = [s.name for s in model.inputs]
    wanted = tensors if tensors is not None else graph_inputs + float_tensors(model.proto)
    # one core bins while the others run the next batch (measured on 2 cores: 1.9 s → 1.0 s for 500 digits)
    session = make_session(with_outputs(model.proto, [t for t in wanted if t not in graph_inputs]),
                           threads=max(1, (os.cpu_count() or 2) - 1))
    output_names = [o.name for o in session.get_outputs()]
    if channel_axis is not None:
        make = (lambda: ChannelHistogramObserver(axis=channel_axis)) if histogram else (lambda: ChannelMinMaxObserver(axis=channel_axis))
    else:
        make = HistogramObserver if histogram else MinMaxObserver
    observers: dict[str, Observer] = {}
    samples, held, held_samples = 0, [], 0
    stream = batches(data, model.inputs, batch_size, refuse_nonfinite=True, max_samples=max_samples)
    progress = track(stream, "calibrating", total=_batch_count(data, batch_size, max_samples))

    def held_back(index: int, batch: Batch) -> bool:
        nonlocal held_samples
        if holdout and index % HOLDOUT_EVERY == HOLDOUT_EVERY - 1 and held_samples < HOLDOUT_MAX:
            held_samples += batch.size
            return True
        return False

    for batch, values in _pipelined(session, output_names, progress, held_back):
        if values is None:
            held.append(batch)
            continue
        named = dict(zip(output_names, values)) | batch.inputs
        for name in wanted:
            value = named.get(name)
            if value is None or value.dtype != np.float32:
                continue
            bounds = (float(value.min()), float(value.max())) if value.size else (0.0, 0.0)
            if not (math.isfinite(bounds[0]) and math.isfinite(bounds[1])):  # min/max propagate NaN and Inf
                name = _first_nonfinite(model, batch) or name
                raise ModelError(f"tensor {name!r} holds NaN/Inf on finite calibration data: the model overflows float32",
                                 "check the model and the input preprocessing (scale, normalisation)")
            observer = observers.setdefault(name, make())
            if channel_axis is None:
                observer.update(value, bounds)
            else:
                observer.update(value)
        del values, named  # the batch's activations go before the next batch arrives
        samples += batch.size
    return Observed(observers, samples, list(data.notes), held)


_DONE = object()


def _first_nonfinite(model: Model, batch: Batch) -> str | None:
    """On error only: rerun the batch with every float tensor as an output and name the first one (in graph order)
    that is not finite, so the message points at the op that overflows, not at a quantized tensor downstream."""
    names = float_tensors(model.proto)
    try:
        session = make_session(with_outputs(model.proto, names), threads=1)
        outputs = [o.name for o in session.get_outputs()]
        values = dict(zip(outputs, session.run(outputs, batch.inputs)))
    except Exception:  # noqa: BLE001 - a diagnostic; the caller reports the tensor it saw
        return None
    for name in names:
        value = values.get(name)
        if value is not None and value.dtype.kind == "f" and value.size and not np.isfinite(value).all():
            return name
    return None


def _pipelined(session, output_names: list[str], stream, held_back):
    """Yield (batch, outputs) with the next batch's inference running in a worker thread while the caller bins the
    current one (ONNX Runtime releases the GIL): calibration costs about max(inference, binning) instead of their sum.
    At most two batches of activations are alive at once, so memory stays constant. Held-back batches come with None
    and are not run."""
    results: queue.Queue = queue.Queue(maxsize=1)
    stop, taken = threading.Event(), threading.Event()

    def offer(item) -> bool:
        """Hand over one item and wait until the caller has taken it: the worker then runs one batch ahead, never
        two, so at most two batches of activations are alive (the one being binned, the one being computed)."""
        results.put(item)
        while not taken.wait(0.05):
            if stop.is_set():
                return False
        taken.clear()
        return True

    def work() -> None:
        try:
            for index, batch in enumerate(stream):
                values = None if held_back(index, batch) else session.run(output_names, batch.inputs)
                if not offer((batch, values)):
                    return
            offer(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread, raised there
            offer(exc)

    worker = threading.Thread(target=work, name="edgeq-calibration", daemon=True)
    worker.start()
    try:
        while True:
            item = results.get()
            taken.set()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        worker.join()


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


# Ops whose output ONNX Runtime's QDQ quantizer gives the input's scale (so their output needs no range), and
# activations it folds into the producer's output (whose own output then needs no range of its own).
SAME_AS_INPUT = ("MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze")
FOLDED = ("Relu", "Clip")


def quantized_tensors(proto: onnx.ModelProto, op_types: tuple[str, ...] | list[str], exclude: tuple[str, ...] = ()) -> list[str]:
    """The tensors a static QDQ quantizer needs ranges for: non-constant inputs and outputs of the nodes it may
    quantize, less the outputs that take their input's scale and the pre-activation outputs folded into a Relu/Clip
    (calibrating only these halves the binning on conv nets; the quantized model is identical, tested)."""
    constants = {t.name for t in proto.graph.initializer}
    floats = set(float_tensors(proto)) | {i.name for i in proto.graph.input}
    graph_outputs = {o.name for o in proto.graph.output}
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)

    def folded(name: str) -> bool:
        readers = users.get(name, [])
        return (name not in graph_outputs and len(readers) == 1 and readers[0].op_type in FOLDED
                and readers[0].op_type in op_types and readers[0].name not in exclude)

    names: dict[str, None] = {}
    for node in proto.graph.node:
        if node.op_type not in op_types or node.name in exclude:
            continue
        outputs = [] if node.op_type in SAME_AS_INPUT and node.output[0] not in graph_outputs else list(node.output)
        for name in list(node.input) + outputs:
            if name and name not in constants and name in floats and not folded(name):
                names[name] = None
    return list(names)


def folded_activations(proto: onnx.ModelProto, op_types: tuple[str, ...] | list[str], exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """Pre-activation tensor → the Relu/Clip output it is folded into (ONNX Runtime looks the former up, then uses
    the latter's range)."""
    graph_outputs = {o.name for o in proto.graph.output}
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return {name: readers[0].output[0] for name, readers in users.items()
            if name not in graph_outputs and len(readers) == 1 and readers[0].op_type in FOLDED
            and readers[0].op_type in op_types and readers[0].name not in exclude}


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
