"""One streaming pass over the calibration data that feeds every collector the passes asked for (NNCF's statistic
points and its aggregator): the model runs once per batch with the union of the collectors' tensors as outputs, two
worker threads each inferring and feeding their own batch, and each collector gets what it declared.

A collector (`Collector`) names the tensors it reads, how many samples (the first `max_samples`), whether it skips
the batches held back for `--method auto`, and whether it must be fed whole batches in data order (`ordered`: running
float sums, reservoir samples) or may be fed parts of batches in any order from any thread (histograms). A batch
whose activations exceed ACTIVATION_BUDGET runs a few samples at a time; an ordered collector gets the parts joined.
The data is read once whatever the collectors: the stream runs to the largest `max_samples`, each collector sees the
first samples up to its own (a batch that straddles a collector's limit runs again for it, cut).
"""
from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import onnx

from edgeq.calibrate.observers import release_scratch
from edgeq.data import Batch, Dataset, batches, count_nonfinite
from edgeq import interrupts
from edgeq.errors import DataError
from edgeq.model import Model, TensorSpec, run_session
from edgeq.progress import track
from edgeq.runtimes import ONNX_RUNTIME, GraphRuntime

# `auto` evaluates on every HOLDOUT_EVERY-th batch (never used for ranges), keeping at most HOLDOUT_MAX samples, when
# that holds back at least HOLDOUT_MIN; fewer held-back samples go back into the ranges and `auto` scores on the
# calibration samples themselves. Measured on PP-OCRv4 det (8 calibration pages, 6 validation pages, two seeds): one
# held-back page chose entropy both times (text-region IoU 0.72 / 0.71), the 8 pages themselves the best method each
# time (mse 0.91 / percentile 0.85).
HOLDOUT_EVERY, HOLDOUT_MIN, HOLDOUT_MAX = 5, 32, 128
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


class Collector(Protocol):
    """What one statistic point collects, and how it must be fed."""

    tensors: list[str]            # model tensors it reads (graph inputs included); none: only the batches themselves
    max_samples: int | None       # the first samples of the data it reads (None: all)
    skips_holdout: bool           # never fed the batches held back for --method auto
    ordered: bool                 # fed whole batches, in data order, one at a time

    def update(self, index: int, values: dict[str, np.ndarray], batch: Batch) -> None:
        """Take batch `index` (or part of it): `values` by tensor name (an unordered collector may pop them)."""
        ...


@dataclass
class Collected:
    """What a pass held back (`holdout`: every 5th batch, at most 128 samples, for `auto`'s fidelity check), and
    `feed_held()`, which feeds those batches to the collectors that skipped them, once they have served."""

    held: list[Batch]
    feed_held: Callable[[], None]


def collect(model: Model, data: Dataset, collectors: list[Collector], *, batch_size: int = 16, holdout: bool = False,
            label: str = "calibrating", runtime: GraphRuntime = ONNX_RUNTIME) -> Collected:
    """Feed every collector in one pass over `data`."""
    graph_inputs = {s.name for s in model.inputs}
    outputs = list(dict.fromkeys(t for c in collectors for t in c.tensors if t not in graph_inputs))
    session = runtime.open_graph(with_outputs(model.proto, outputs), threads=max(1, (os.cpu_count() or 2) // WORKERS)) if outputs else None
    limits = [c.max_samples for c in collectors]
    limit = None if None in limits or not limits else max(limits)
    stream = feed_batches(data, model.inputs, batch_size, limit)
    progress = track(stream, label, total=lambda: _batch_count(data.samples(model.inputs), batch_size, limit))
    held: list[tuple[int, Batch, int]] = []
    position = {"samples": 0, "held": 0}
    # how many samples keep one run's activations within ACTIVATION_BUDGET, set by the first run; batches are split
    # only where every input's first axis is a free batch axis
    splittable = not isinstance(data, Feeds) and all(spec.rank and not isinstance(spec.shape[0], int) for spec in model.inputs)
    rows_per_run = [0 if splittable else math.inf]
    deliveries = _InOrder()

    def pull(index: int, batch: Batch) -> tuple[int, bool]:  # under the stream's lock, in batch order
        offset = position["samples"]
        position["samples"] += batch.size
        if holdout and index % HOLDOUT_EVERY == HOLDOUT_EVERY - 1 and position["held"] < HOLDOUT_MAX:
            position["held"] += batch.size
            held.append((index, batch, offset))
            return offset, True
        return offset, False

    def run(part: Batch, names: list[str]) -> dict[str, np.ndarray]:
        values = run_session(session, names, part.inputs, "the model", f"the calibration data ({data.description})") if names else []
        named = dict(zip(names, values))
        if not rows_per_run[0]:
            per_sample = sum(v.nbytes for v in named.values()) / max(part.size, 1)
            rows_per_run[0] = max(1, int(ACTIVATION_BUDGET // max(per_sample, 1.0)))
        return named | part.inputs

    def feed(index: int, batch: Batch, offset: int, is_held: bool, targets: list[Collector] = collectors) -> list:
        """Run the batch for `targets`; feed the unordered ones, return what the ordered ones are to get."""
        views: dict[int, list[Collector]] = {}
        for c in targets:
            rows = batch.size if c.max_samples is None else min(batch.size, c.max_samples - offset)
            if rows > 0 and not (is_held and c.skips_holdout):
                views.setdefault(rows, []).append(c)
        ordered_work = []
        for rows, group in views.items():
            view = batch if rows == batch.size else _rows(batch, 0, rows)
            names = list(dict.fromkeys(t for c in group for t in c.tensors if t not in graph_inputs))
            ordered, unordered = [c for c in group if c.ordered], [c for c in group if not c.ordered]
            parts: list[dict[str, np.ndarray]] = []
            begin = 0
            while begin < view.size:
                step = min(rows_per_run[0] or 1, view.size)  # the first run measures one sample's activations
                part = view if (begin, step) == (0, view.size) else _rows(view, begin, begin + step)
                named = run(part, names)
                if ordered:
                    parts.append({t: named[t] for c in ordered for t in c.tensors if t in named})
                for k, c in enumerate(unordered):  # each may pop what it has binned; the last one pops the original
                    c.update(index, named if k == len(unordered) - 1 else dict(named), part)
                begin += step
            if ordered:
                joined = parts[0] if len(parts) == 1 else {t: np.concatenate([p[t] for p in parts]) for t in parts[0]}
                ordered_work += [(c, joined, view) for c in ordered]
        return ordered_work

    def feed_held() -> None:
        late = [c for c in collectors if c.skips_holdout]
        try:
            for index, batch, offset in held:
                for collector, values, view in feed(index, batch, offset, False, late):
                    collector.update(index, values, view)
        finally:
            release_scratch()
        held.clear()

    _in_parallel(progress, pull, lambda index, batch, offset, is_held: deliveries.put(index, feed(index, batch, offset, is_held)))
    return Collected([batch for _, batch, _ in held], feed_held)


class _InOrder:
    """Hands ordered collectors their batches in data order, whichever worker finished a batch first."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.waiting: dict[int, list] = {}
        self.next = 0

    def put(self, index: int, work: list) -> None:
        with self.lock:
            self.waiting[index] = work
            while self.next in self.waiting:
                for collector, values, batch in self.waiting.pop(self.next):
                    collector.update(self.next, values, batch)
                self.next += 1


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


def _rows(batch: Batch, start: int, stop: int) -> Batch:
    return Batch({k: v[start:stop] for k, v in batch.inputs.items()}, None if batch.labels is None else batch.labels[start:stop])


def _in_parallel(stream, pull, feed) -> None:
    """Run `feed(index, batch, offset, held)` over the stream's batches in WORKERS threads (this one included),
    `pull(index, batch)` (the batch's sample offset, whether it is held back) under the stream's lock. The first
    error in any worker stops the others after their current batch and is raised here."""
    lock, stop = threading.Lock(), threading.Event()
    iterator = enumerate(stream)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            while not stop.is_set():
                with lock:
                    index, batch = next(iterator, (None, None))
                    if batch is None:
                        return
                    offset, held = pull(index, batch)
                feed(index, batch, offset, held)
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread, raised there
            errors.append(exc)
            stop.set()
        finally:
            release_scratch()

    helpers = [threading.Thread(target=work, name=f"edgeq-calibration-{i}", daemon=True) for i in range(WORKERS - 1)]
    try:
        with interrupts.deferred():  # an interrupt inside Thread.start would leave a thread that cannot be joined
            for helper in helpers:
                helper.start()
        work()
    finally:  # once this thread is done the stream is exhausted or failed: helpers stop after their current batch
        stop.set()
        for helper in helpers:
            if helper.ident is not None:
                helper.join()
    if errors:
        raise errors[0]


def _batch_count(samples: int | None, batch_size: int, max_samples: int | None) -> int | None:
    if samples is None:
        return None
    n = min(samples, max_samples) if max_samples else samples
    return -(-n // batch_size)


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
