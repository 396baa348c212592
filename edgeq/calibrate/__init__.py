"""Calibration: run the model once per batch with every needed tensor as an output, and stream the values into
observers. Memory stays constant in the number of calibration samples."""
from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx

from edgeq.calibrate.observers import (ChannelHistogramObserver, ChannelMinMaxObserver, HistogramObserver, MinMaxObserver,
                                       range_of, release_scratch)
from edgeq.data import Batch, Dataset, batches, count_nonfinite
from edgeq.errors import ConfigError, DataError, ModelError
from edgeq.model import make_session, Model, TensorSpec, run_session
from edgeq.progress import track

METHODS = ("minmax", "percentile", "entropy", "mse")
# `auto` evaluates on every HOLDOUT_EVERY-th batch (never used for ranges), keeping at most HOLDOUT_MAX samples, when
# that holds back at least HOLDOUT_MIN; fewer held-back samples go back into the ranges and `auto` scores on the
# calibration samples themselves. Measured on PP-OCRv4 det (8 calibration pages, 6 validation pages, two seeds): one
# held-back page chose entropy both times (text-region IoU 0.72 / 0.71), the 8 pages themselves the best method each
# time (mse 0.91 / percentile 0.85).
HOLDOUT_EVERY, HOLDOUT_MIN, HOLDOUT_MAX = 5, 32, 128

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
    observe_more: Callable[[int, Batch], int] | None = field(default=None, repr=False)

    def include_holdout(self) -> None:
        """Bin the held-back batches too, once they have served their purpose: the final ranges see all the data
        (histograms do not depend on the order of their batches, so the ranges equal a pass without holding back)."""
        if self.observe_more is not None:
            self.samples += sum(self.observe_more(index, batch) for index, batch in enumerate(self.holdout))
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
            holdout: bool = False) -> Observed:
    """One pass over `data` with every wanted tensor as a model output, streamed into observers (constant memory:
    WORKERS batches of activations at a time, one fixed-size observer per tensor).

    `channel_axis` observes per channel along that axis; `holdout` keeps every 5th batch (at most 128 samples, at
    least 32 or none) out of the observers, for `auto`'s fidelity check.

    >>> seen = observe(model, dataset)                       # doctest: +SKIP
    >>> seen.ranges("entropy")["conv1_out"]                  # doctest: +SKIP
    (0.0, 4.21)
    """
    graph_inputs = [s.name for s in model.inputs]
    wanted = tensors if tensors is not None else graph_inputs + float_tensors(model.proto)
    cores = os.cpu_count() or 2
    session = make_session(with_outputs(model.proto, [t for t in wanted if t not in graph_inputs]),
                           threads=max(1, cores // WORKERS))
    output_names = [o.name for o in session.get_outputs()]
    if channel_axis is not None:
        make = (lambda: ChannelHistogramObserver(axis=channel_axis)) if histogram else (lambda: ChannelMinMaxObserver(axis=channel_axis))
    else:
        make = HistogramObserver if histogram else MinMaxObserver
    observers: dict[str, Observer] = {}
    locks: dict[str, threading.Lock] = {}
    registry = threading.Lock()
    held, held_samples = [], 0
    stream = feed_batches(data, model.inputs, batch_size, max_samples)
    progress = track(stream, "calibrating", total=lambda: _batch_count(data.samples(model.inputs), batch_size, max_samples))

    def held_back(index: int, batch: Batch) -> bool:  # called under the stream's lock, in batch order
        nonlocal held_samples
        if holdout and index % HOLDOUT_EVERY == HOLDOUT_EVERY - 1 and held_samples < HOLDOUT_MAX:
            held_samples += batch.size
            held.append(batch)
            return True
        return False

    # how many samples keep one run's activations within ACTIVATION_BUDGET, set by the first run; batches are split
    # only where every input's first axis is a free batch axis
    splittable = not isinstance(data, Feeds) and all(spec.rank and not isinstance(spec.shape[0], int) for spec in model.inputs)
    rows_per_run = [0 if splittable else math.inf]

    def observe_batch(index: int, batch: Batch) -> int:
        begin = 0
        while begin < batch.size:
            rows = min(rows_per_run[0] or 1, batch.size)  # the first run measures one sample's activations
            observe_rows(index, batch if (begin, rows) == (0, batch.size) else _rows(batch, begin, begin + rows))
            begin += rows
        return batch.size

    def observe_rows(index: int, part: Batch) -> None:
        named = dict(zip(output_names, run_session(session, output_names, part.inputs, "the model",
                                                   f"the calibration data ({data.description})")))
        if not rows_per_run[0]:
            per_sample = sum(v.nbytes for v in named.values()) / max(part.size, 1)
            rows_per_run[0] = max(1, int(ACTIVATION_BUDGET // max(per_sample, 1.0)))
        named |= part.inputs
        start = (index % WORKERS) * len(wanted) // WORKERS  # workers on neighbouring batches start apart: fewer waits
        for name in wanted[start:] + wanted[:start]:
            value = named.pop(name, None)  # freed once binned
            if value is None or value.dtype != np.float32:
                continue
            bounds = (float(value.min()), float(value.max())) if value.size else (0.0, 0.0)
            if not (math.isfinite(bounds[0]) and math.isfinite(bounds[1])):  # min/max propagate NaN and Inf
                name = _first_nonfinite(model, part) or name
                raise ModelError(f"tensor {name!r} holds NaN/Inf on finite calibration data: the model overflows float32",
                                 "check the model and the input preprocessing (scale, normalisation)")
            with registry:
                observer, lock = observers.get(name), locks.setdefault(name, threading.Lock())
                if observer is None:
                    observer = observers[name] = make()
            with lock:  # batches update one tensor's observer in any order: the result does not depend on it
                if channel_axis is None:
                    observer.update(value, bounds)
                else:
                    observer.update(value)

    samples = _in_parallel(progress, held_back, observe_batch)
    in_graph_order = {name: observers[name] for name in wanted if name in observers}
    seen = Observed(in_graph_order, samples, list(data.notes), held, observe_batch)
    if held_samples < HOLDOUT_MIN:  # too few to judge by: they calibrate too
        seen.include_holdout()
    return seen


class Feeds(Dataset):
    """Whole model feeds, each used as it is for one run: for inputs without a sample axis first (Silero VAD's
    state (2, batch, 128) and scalar sample rate), and for the values captured where a subgraph reads them.

    >>> calib = Feeds(lambda: ({"input": x, "state": s, "sr": np.array(16000)} for x, s in stream))  # doctest: +SKIP
    """

    def checked(self, names: list[str]) -> Iterator[tuple[int, Batch]]:
        """The feeds with their index, each holding a value for every one of NAMES (the model's inputs); a feed
        missing one, or no feed at all, is a DataError."""
        count = 0
        for index, chunk in enumerate(self.chunks()):
            missing = [name for name in names if name not in chunk.inputs]
            if missing:
                raise DataError(f"{self.description}: feed {index} has no value for {', '.join(missing)}",
                                f"give every feed the model's inputs: {', '.join(names)}")
            yield index, chunk
            count += 1
        if not count:
            raise DataError(f"{self.description} holds no feeds", "give at least one")


def feed_batches(data: Dataset, specs: list[TensorSpec], batch_size: int, max_samples: int | None = None) -> Iterator[Batch]:
    """The runs calibration makes: re-batched samples (`edgeq.data.batches`), or a `Feeds` dataset's feeds."""
    if not isinstance(data, Feeds):
        yield from batches(data, specs, batch_size, refuse_nonfinite=True, max_samples=max_samples)
        return
    for count, (index, chunk) in enumerate(data.checked([spec.name for spec in specs]), 1):
        feed = Batch({spec.name: np.ascontiguousarray(chunk.inputs[spec.name], dtype=spec.dtype) for spec in specs}, unbatched=True)
        if count_nonfinite(feed):
            raise DataError(f"{data.description}: feed {index} holds NaN/Inf values", "clean the data; calibration needs finite values")
        yield feed
        if max_samples is not None and count >= max_samples:
            return


# Batches observed at once: each worker runs the model on its batch (ONNX Runtime releases the GIL) and bins the
# result (so does numpy), so inference and binning both use every core, and at most WORKERS batches of activations
# are alive however many samples there are. Measured on 2 cores against one thread inferring while another bins:
# 100 digits in 5 batches 0.10–0.12 s → 0.07–0.08 s. Two keeps memory bounded on many-core machines, where each
# worker's inference gets cores // 2 threads.
WORKERS = 2
# Activations one run may produce. A batch whose activations are larger is observed a few samples at a time (the
# observers do not depend on how data is split): each worker's run then holds a bounded amount, and the peak no
# longer depends on how often the two workers' runs happen to coincide, which grew with the number of batches
# (PP-OCR cls, 96 MB of activations per batch of 16: peak RSS 350 MB at 100 samples, 375 MB at 1500).
ACTIVATION_BUDGET = 32 * 2**20


def _rows(batch: Batch, start: int, stop: int) -> Batch:
    return Batch({k: v[start:stop] for k, v in batch.inputs.items()}, None if batch.labels is None else batch.labels[start:stop])


def _in_parallel(stream, held_back, observe_batch) -> int:
    """Run `observe_batch(index, batch)` over the stream's batches in WORKERS threads (this one included); return the samples seen.
    The first error in any worker stops the others after their current batch and is raised here."""
    pull, stop = threading.Lock(), threading.Event()
    iterator = enumerate(stream)
    counts: list[int] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            while not stop.is_set():
                with pull:
                    index, batch = next(iterator, (None, None))
                    if batch is None:
                        return
                    if held_back(index, batch):
                        continue
                counts.append(observe_batch(index, batch))
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread, raised there
            errors.append(exc)
            stop.set()
        finally:
            release_scratch()

    helpers = [threading.Thread(target=work, name=f"edgeq-calibration-{i}", daemon=True) for i in range(WORKERS - 1)]
    for helper in helpers:
        helper.start()
    try:
        work()
    finally:  # once this thread is done the stream is exhausted or failed: helpers stop after their current batch
        stop.set()
        for helper in helpers:
            helper.join()
    if errors:
        raise errors[0]
    return sum(counts)


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


def _batch_count(samples: int | None, batch_size: int, max_samples: int | None) -> int | None:
    if samples is None:
        return None
    n = min(samples, max_samples) if max_samples else samples
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
