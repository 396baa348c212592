"""Detection against a reference (the FP32 model): boxes after the same decoding, score threshold and NMS.

Per image: box precision, recall and F1 at IoU 0.5 (class-aware, greedy by score) and the mean IoU of matched
boxes; an image where neither model finds a box scores 1. The metrics are means over images, so the paired
bootstrap of `compare` applies unchanged.
"""
from __future__ import annotations

import numpy as np

from edgeq.evaluate.detection import Detections, agreement_counts
from edgeq.evaluate.stats import Estimate, mean_estimate

# `compare` never ships a detector whose box F1 against FP32 (the point value) is below this.
MIN_SHIP_BOX_F1 = 0.9


def detect_columns(found: list[Detections], reference: list[Detections]) -> dict[str, np.ndarray]:
    rows = [agreement_counts(p, r) for p, r in zip(found, reference)]
    matched = np.array([r["matched"] for r in rows])
    predicted = np.array([r["predicted"] for r in rows])
    ref = np.array([r["reference"] for r in rows])
    total = predicted + ref
    return {
        "box_f1": np.where(total > 0, 2 * matched / np.maximum(total, 1), 1.0),
        "box_precision": np.where(predicted > 0, matched / np.maximum(predicted, 1), np.where(ref > 0, 0.0, 1.0)),
        "box_recall": np.where(ref > 0, matched / np.maximum(ref, 1), np.where(predicted > 0, 0.0, 1.0)),
        "matched_iou": np.where(matched > 0, np.array([r["matched_iou"] for r in rows]) / np.maximum(matched, 1), np.nan),
        "boxes": predicted, "reference_boxes": ref,
    }


def detect_metrics(cols: dict[str, np.ndarray]) -> dict[str, Estimate]:
    return {name: mean_estimate(cols[name]) for name in ("box_f1", "box_precision", "box_recall", "matched_iou")}
