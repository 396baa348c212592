"""Classification against labels: top-1 and top-5 with Wilson intervals.

Labels are class ids, or one row per sample over the model's classes: one-hot rows are class ids written another
way (their argmax); probability rows that are not one-hot (label smoothing, soft targets) are scored against their
most likely class, and the record says so.
"""
from __future__ import annotations

import numpy as np

from edgeq.errors import DataError
from edgeq.evaluate.stats import Estimate, proportion
from edgeq.evaluate.tasks.rows import class_scores, failed_rows, predictions

ROW_SUM_TOLERANCE = 1e-3  # float32 soft labels written by frameworks sum to 1 within ~1e-6; this leaves room for float16


def labelled_task(y: np.ndarray, labels: np.ndarray, warnings: list[str]) -> str:
    if predictions(y, failed_rows(y)) is None:
        return "regress"
    if labels.size != len(labels):
        return "classify" if _probability_rows(labels, class_scores(y)) is not None else "regress"
    if labels.dtype.kind in "iub":
        return "classify"
    if labels.dtype.kind == "f" and np.all(np.mod(labels, 1) == 0):
        warnings.append("the labels are floats with whole values: read as class ids (save them as integers to be explicit)")
        return "classify"
    return "regress"


def classify(y: np.ndarray, labels: np.ndarray, failed: np.ndarray) -> dict[str, np.ndarray]:
    pred = predictions(y, failed)
    scores = class_scores(y)
    classes = scores.shape[1] if scores is not None else None
    cols: dict[str, np.ndarray] = {}
    if labels.size != len(labels):
        rows = _probability_rows(labels, scores)
        if rows is None:
            raise DataError(f"labels of shape {labels.shape} are neither class ids nor one-hot or probability rows over the model's {classes} classes",
                            "give one class id per sample (or one row per sample that sums to 1) throughout the data")
        labels = rows.argmax(axis=1)
        cols["soft_label"] = ~np.all((rows == 0) | (rows == 1), axis=1)
    labels = labels.reshape(len(labels)).astype(np.int64)
    if classes is not None and (labels.min() < 0 or labels.max() >= classes):
        raise DataError(f"labels run from {labels.min()} to {labels.max()} but the model scores {classes} classes",
                        f"give class ids 0..{classes - 1} in the model's class order")
    cols |= {"prediction": pred, "correct": pred == labels}
    if classes is not None and classes > 5:
        top5 = np.argpartition(-scores, 4, axis=1)[:, :5]
        cols["correct_top5"] = (top5 == labels[:, None]).any(axis=1) & ~failed
    return cols


def _probability_rows(labels: np.ndarray, scores: np.ndarray | None) -> np.ndarray | None:
    """(n, C) label rows when every row is a probability distribution over the model's C classes; None otherwise."""
    rows = labels.reshape(len(labels), -1)
    if labels.dtype.kind not in "iubf" or rows.shape[1] < 2 or (scores is not None and rows.shape[1] != scores.shape[1]):
        return None
    rows = rows.astype(np.float64)
    if not np.isfinite(rows).all() or (rows < 0).any() or not np.allclose(rows.sum(axis=1), 1.0, atol=ROW_SUM_TOLERANCE):
        return None
    return rows


def classify_warnings(cols: dict[str, np.ndarray]) -> list[str]:
    """What was assumed about the labels, in words for the record."""
    soft = int(cols["soft_label"].sum()) if "soft_label" in cols else 0
    if not soft:
        return []
    return [f"{soft} of {len(cols['soft_label'])} labels are probability rows that are not one-hot (soft targets): each was "
            "scored as its most likely class (top-1 against the row's argmax); save class ids to say which class is right"]


def classify_metrics(cols: dict[str, np.ndarray]) -> dict[str, Estimate]:
    metrics = {"top1": proportion(cols["correct"])}
    if "correct_top5" in cols:
        metrics["top5"] = proportion(cols["correct_top5"])
    return metrics
