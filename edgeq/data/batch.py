"""The value that flows from data to model: a Batch of feeds and labels, and what labels may hold."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeq.errors import DataError

LABELS_KEY = "labels"


@dataclass
class Batch:
    """Model feeds for a run (name -> array, sample axis first) and the labels of those samples, if any."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    unbatched: bool = False  # one sample whose arrays lack the sample axis (a .npy file per sample)

    @property
    def size(self) -> int:
        return 1 if self.unbatched else len(next(iter(self.inputs.values())))


def check_label_dtype(dtype: np.dtype, where: str) -> None:
    """Labels are numbers: class ids, one-hot or probability rows, or regression targets. Names of classes are
    refused here, before any work, rather than deep in scoring (where they crashed as a bug)."""
    if dtype.kind in "biuf":
        return
    if dtype.kind in "US":
        raise DataError(f"{where}: the labels are strings ({dtype}), but edgeq scores class ids, not class names",
                        "map each class name to its index in the model's output order and save the labels as integers")
    raise DataError(f"{where}: the labels are {dtype}, not numbers",
                    "save class ids (integers), one-hot rows or float targets")


def as_batch(item: Any) -> Batch:
    """A Batch from what a Dataset's source or transform yields: a Batch, a dict (optional 'labels'), an
    (inputs, labels) pair, or one array for a single-input model."""
    if isinstance(item, Batch):
        return item
    if isinstance(item, dict):
        item = dict(item)
        labels = item.pop(LABELS_KEY, None)
        return Batch({k: np.asarray(v) for k, v in item.items()}, None if labels is None else np.asarray(labels))
    if isinstance(item, tuple) and len(item) == 2:
        x, y = item
        batch = as_batch(x)
        return Batch(batch.inputs, np.asarray(y))
    return Batch({"": np.asarray(item)})
