"""A window of a dataset: samples [start, stop) in stream order, what one data shard of a distributed validation
reads. Sources that can (arrays, .npz files, image folders) read only the window; others are read from the start
and the samples before it skipped.

>>> data = Dataset.from_arrays({"x": np.arange(10, dtype=np.float32)[:, None]}, labels=np.arange(10))
>>> [b.labels.tolist() for b in window(data, 3, 6, []).chunks()]
[[3, 4, 5]]
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from edgeq.data.batch import Batch, as_batch
from edgeq.data.sources import Dataset
from edgeq.model import TensorSpec


def window(data: Dataset, start: int, stop: int, specs: list[TensorSpec]) -> Dataset:
    """The samples [start, stop) of `data` as a dataset of their own (same description, fresh notes)."""
    if data.slicer is not None:
        slicer = data.slicer
        return Dataset(lambda: slicer(start, stop), data.transform, length=stop - start, description=data.description)

    def skipping() -> Iterator[Batch]:
        position = 0
        for chunk in data.chunks():
            rows = sample_first(chunk, specs)
            size = len(next(iter(rows.values()))) if rows else 0
            if position + size > start and position < stop:
                low, high = max(start - position, 0), min(stop - position, size)
                labels = rows.pop("labels", None)
                yield Batch({k: v[low:high] for k, v in rows.items()}, None if labels is None else labels[low:high])
            position += size
            if position >= stop:
                return

    return Dataset(skipping, length=stop - start, description=data.description)


def sample_first(chunk: Batch, specs: list[TensorSpec]) -> dict[str, np.ndarray]:
    """A chunk's arrays (and `labels`) with the samples on the first axis: a file holding one sample (a `.npy` per
    sample, lacking that axis; a single-input model's rank says which) gets it."""
    chunk = as_batch(chunk)
    arrays = dict(chunk.inputs)
    if chunk.unbatched:
        rank = specs[0].rank if len(specs) == 1 else None
        arrays = {k: np.asarray(v)[None] if rank is None or np.ndim(v) == rank - 1 else np.asarray(v) for k, v in arrays.items()}
    if chunk.labels is not None:
        arrays["labels"] = np.atleast_1d(chunk.labels)
    return arrays
