"""Fidelity to a reference model: top-1 agreement, cosine, SQNR, and for probability maps mean |diff| and IoU."""
from __future__ import annotations

import numpy as np

from edgeq.evaluate.metrics import MAP_THRESHOLD, UNIT_RANGE_SLACK
from edgeq.evaluate.stats import Estimate, mean_estimate, proportion, sqnr_estimate
from edgeq.evaluate.tasks.rows import failed_rows, predictions


def fidelity(y: np.ndarray, r: np.ndarray, failed: np.ndarray) -> dict[str, np.ndarray]:
    cols: dict[str, np.ndarray] = {}
    pred, ref_pred = predictions(y, failed_rows(y)), predictions(r, failed_rows(r))
    if pred is not None and ref_pred is not None:
        cols["prediction"], cols["agree"] = pred, pred == ref_pred
    if y.dtype.kind == "f" and r.dtype.kind == "f":
        cols.update(_closeness(y, r, failed))
    return cols


def _closeness(y: np.ndarray, r: np.ndarray, failed: np.ndarray) -> dict[str, np.ndarray]:
    n = len(y)
    a = np.nan_to_num(y.reshape(n, -1).astype(np.float64))
    b = np.nan_to_num(r.reshape(n, -1).astype(np.float64))
    dot = np.einsum("ij,ij->i", a, b)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    both_zero = ~a.any(axis=1) & ~b.any(axis=1)
    cosine = np.where(norms > 0, dot / np.where(norms > 0, norms, 1), np.where(both_zero, 1.0, 0.0))
    diff = a - b
    hit_a, hit_b = a > MAP_THRESHOLD, b > MAP_THRESHOLD
    union = (hit_a | hit_b).sum(axis=1)
    iou = np.where(union > 0, (hit_a & hit_b).sum(axis=1) / np.maximum(union, 1), 1.0)
    # a quantized probability map may step a few quantization levels past [0, 1] (uint8 over a range that is not
    # exactly [0, 1]): it is still a probability map
    slack = UNIT_RANGE_SLACK
    in_unit = (((y >= -slack) & (y <= 1 + slack)) | ~np.isfinite(y)).reshape(n, -1).all(axis=1) \
        & (((r >= -slack) & (r <= 1 + slack)) | ~np.isfinite(r)).reshape(n, -1).all(axis=1)
    return {
        "cosine": np.where(failed, 0.0, np.clip(cosine, -1.0, 1.0)),
        "signal": np.where(failed, np.nan, (b ** 2).sum(axis=1)),
        "noise": np.where(failed, np.nan, (diff ** 2).sum(axis=1)),
        "abs_diff": np.where(failed, np.nan, np.abs(diff).mean(axis=1)),
        f"iou@{MAP_THRESHOLD}": np.where(failed, 0.0, iou),
        "in_unit_range": in_unit,
    }


def fidelity_metrics(cols: dict[str, np.ndarray]) -> dict[str, Estimate]:
    metrics = {}
    if "agree" in cols:
        metrics["top1_agreement"] = proportion(cols["agree"])
    if "cosine" not in cols:
        return metrics
    metrics["cosine"] = mean_estimate(cols["cosine"])
    metrics["sqnr_db"] = sqnr_estimate(cols["signal"], cols["noise"])
    # Thresholded-map metrics only mean something for probability maps, not for class scores.
    if "agree" not in cols and cols["in_unit_range"].all():
        metrics["mean_abs_diff"] = mean_estimate(cols["abs_diff"])
        metrics[f"iou@{MAP_THRESHOLD}"] = mean_estimate(cols[f"iou@{MAP_THRESHOLD}"])
    return metrics
