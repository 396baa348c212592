"""Classification against labels: top-1 and top-5 with Wilson intervals."""
from __future__ import annotations

import numpy as np

from edgeq.errors import DataError
from edgeq.evaluate.stats import Estimate, proportion
from edgeq.evaluate.tasks.rows import class_scores, failed_rows, predictions


def labelled_task(y: np.ndarray, labels: np.ndarray, warnings: list[str]) -> str:
    one_per_sample = labels.size == len(labels)
    if predictions(y, failed_rows(y)) is None or not one_per_sample:
        return "regress"
    if labels.dtype.kind in "iub":
        return "classify"
    if labels.dtype.kind == "f" and np.all(np.mod(labels, 1) == 0):
        warnings.append("the labels are floats with whole values: read as class ids (save them as integers to be explicit)")
        return "classify"
    return "regress"


def classify(y: np.ndarray, labels: np.ndarray, failed: np.ndarray) -> dict[str, np.ndarray]:
    pred = predictions(y, failed)
    labels = labels.reshape(len(labels)).astype(np.int64)
    scores = class_scores(y)
    classes = scores.shape[1] if scores is not None else None
    if classes is not None and (labels.min() < 0 or labels.max() >= classes):
        raise DataError(f"labels run from {labels.min()} to {labels.max()} but the model scores {classes} classes",
                        f"give class ids 0..{classes - 1} in the model's class order")
    cols = {"prediction": pred, "correct": pred == labels}
    if classes is not None and classes > 5:
        top5 = np.argpartition(-scores, 4, axis=1)[:, :5]
        cols["correct_top5"] = (top5 == labels[:, None]).any(axis=1) & ~failed
    return cols


def classify_metrics(cols: dict[str, np.ndarray]) -> dict[str, Estimate]:
    metrics = {"top1": proportion(cols["correct"])}
    if "correct_top5" in cols:
        metrics["top5"] = proportion(cols["correct_top5"])
    return metrics
