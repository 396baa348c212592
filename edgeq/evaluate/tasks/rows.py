"""Row helpers shared by the tasks: which samples failed, and the predicted class per sample."""
from __future__ import annotations

import numpy as np


def failed_rows(y: np.ndarray) -> np.ndarray:
    if y.dtype.kind != "f":
        return np.zeros(len(y), bool)
    return ~np.isfinite(y.reshape(len(y), -1)).all(axis=1)


def class_scores(y: np.ndarray) -> np.ndarray | None:
    """(n, C) scores when the output is one score vector per sample with C > 1 classes; None otherwise."""
    dims = [d for d in y.shape[1:] if d != 1]
    if y.dtype.kind == "f" and len(dims) == 1 and dims[0] > 1:
        return y.reshape(len(y), dims[0])
    return None


def predictions(y: np.ndarray, failed: np.ndarray) -> np.ndarray | None:
    """Predicted class per sample (-1 for failed samples): argmax of class scores, or an integer label output."""
    scores = class_scores(y)
    if scores is not None:
        return np.where(failed, -1, scores.argmax(axis=1))
    if y.dtype.kind in "iu" and y.size == len(y):
        return y.reshape(len(y)).astype(np.int64)
    return None
