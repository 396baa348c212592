"""`validate` split by data shard: each shard, a window of whole batches on the fingerprint's block grid, is scored
by a worker (`score_shard`) and the parts are merged per sample (`validation.finish`), so the record (metrics,
intervals, per-sample columns, fingerprint) is the one a single process writes. Several models (auto's candidates)
are validated in one pass: one task per shard per model, one progress line over them all.

Data given as a file is reopened by each worker from its path (shared storage) and read from its window on; data
held in memory is shared once (`Executor.share_arrays`). Models go to the workers once each (`share_model`); a
worker keeps one session per model between its tasks.

>>> shard_windows(1000, batch_size=32, workers=2)
[(0, 256), (256, 512), (512, 768), (768, 1000)]
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeq import runtimes
from edgeq.calibrate import Feeds
from edgeq.data import Dataset, fixed_batch_size, open_data
from edgeq.data.windows import sample_first, window
from edgeq.evaluate.fingerprint import BLOCK
from edgeq.evaluate.record import ValidationRecord
from edgeq.evaluate.validation import Partial, _Reference, finish, score
from edgeq.executors import Executor, InProcess, Shared, running
from edgeq.executors.worker import opened, shared_arrays, shared_model_path
from edgeq.model import TensorSpec

SHARDS_PER_WORKER = 4   # more shards than workers: a slow shard does not leave the others idle at the end


@dataclass(frozen=True)
class DataSource:
    """Where a worker gets the data: a path it reopens (with the image preset), or arrays shared once."""

    description: str
    samples: int
    path: str | None = None
    preset: Any = "raw"
    arrays: Shared | None = None

    def open(self) -> Dataset:
        if self.path is not None:
            return open_data(self.path, self.preset)
        values = dict(shared_arrays(self.arrays))
        labels = values.pop("labels", None)
        return Dataset.from_arrays(values, labels, description=self.description)


@dataclass(frozen=True)
class ShardTask:
    """One model on samples [start, stop) of the data: plain values and shared handles, for any executor."""

    name: str
    model: Shared
    model_label: str
    reference: Shared | None
    reference_label: str | None
    data: DataSource
    start: int
    stop: int
    batch_size: int
    outputs: tuple[str, ...]


def score_shard(task: ShardTask) -> Partial:
    """Score one shard (runs in a worker, the models opened once per worker)."""
    data = task.data.open()
    subject = opened(shared_model_path(task.model))
    ref = None
    if task.reference is not None:
        kept = opened(shared_model_path(task.reference))
        ref = _Reference(kept.model, task.reference_label, opened=kept)
    specs = subject.model.inputs
    first = window(data, 0, fixed_batch_size(specs) or task.batch_size, specs) if task.start > 0 else None
    return score(subject, task.model_label, ref, window(data, task.start, task.stop, specs), list(task.outputs),
                 task.batch_size, start=task.start, first=first)


def shard_windows(samples: int, batch_size: int, workers: int) -> list[tuple[int, int]]:
    """Windows of whole batches that start on the fingerprint's blocks, about SHARDS_PER_WORKER per worker."""
    unit = math.lcm(max(batch_size, 1), BLOCK)
    units = -(-samples // unit)
    per_shard = max(1, -(-units // (SHARDS_PER_WORKER * workers)))
    starts = range(0, samples, per_shard * unit)
    return [(start, min(start + per_shard * unit, samples)) for start in starts]


def validate_many(models: list[str], data: "Dataset | DataSource", reference: str | None, batch_size: int,
                  outputs: list[str], executor: Executor | str, workers: int | None = None,
                  description: str = "validating") -> list[ValidationRecord]:
    """Every model validated on the same data, by shards through `executor`; records in `models` order. Data that
    cannot be split (whole feeds, a source that cannot say how many samples it holds) is validated here, in one
    pass per model."""
    with running(executor, workers) as pool:
        specs = runtimes.load(models[0]).inputs
        source = data if isinstance(data, DataSource) else data_source(data, specs, pool)
        if source is None:
            return [_unsplit(model, data, reference, batch_size, outputs) for model in models]
        noted = len(pool.notes)
        windows = shard_windows(source.samples, fixed_batch_size(specs) or batch_size, pool.workers)
        shared_ref = None if reference is None else pool.share_model(reference)
        tasks = [ShardTask(f"{model} [{start}:{stop}]", pool.share_model(model), model, shared_ref, reference, source,
                           start, stop, batch_size, tuple(outputs))
                 for model in models for start, stop in windows]
        runner = pool if len(tasks) > 1 else InProcess()   # one shard: no worker started for it
        results = runner.map(score_shard, tasks, f"{description}: {len(tasks)} shard{'s' if len(tasks) > 1 else ''}")
        records = [finish(results[i * len(windows):(i + 1) * len(windows)]) for i in range(len(models))]
        for record in records:
            record.warnings.extend(pool.notes[noted:])
    return records


def data_source(data: Dataset, specs: list[TensorSpec], executor: Executor) -> DataSource | None:
    """Where the workers read `data`: its file (reopened from the path), or its samples read once here and shared
    (`executor.share_arrays`). None for whole feeds, which are not split."""
    if isinstance(data, Feeds):
        return None
    samples = data.samples(specs)
    if data.origin is not None and samples is not None:
        return DataSource(data.description, samples, path=data.origin[0], preset=data.origin[1])
    parts: dict[str, list[np.ndarray]] = {}
    for chunk in data.chunks():
        for key, values in sample_first(chunk, specs).items():
            parts.setdefault(key, []).append(values)
    try:
        arrays = {key: np.concatenate(values) for key, values in parts.items()}
    except ValueError:   # samples of different shapes (dynamic dims): not one array
        return None
    if not arrays:
        return None   # no samples: validation in one pass says so
    return DataSource(data.description, len(next(iter(arrays.values()))), arrays=executor.share_arrays(arrays))


def _unsplit(model: str, data: Dataset, reference: str | None, batch_size: int, outputs: list[str]) -> ValidationRecord:
    from edgeq.evaluate.validation import validate

    return validate(model, data, reference, batch_size, outputs=outputs)
