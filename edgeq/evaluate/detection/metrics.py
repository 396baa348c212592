"""COCO-style mAP (101-point, per class, greedy matching by score) and agreement with a reference's detections.

Agreement is counted per image (true positives, predicted and reference boxes, IoU of matches) so a bootstrap over
images (`edgeq.evaluate.stats.bootstrap_ci`) gives intervals of the pooled precision, recall and F1.
"""
from __future__ import annotations

import numpy as np

from edgeq.evaluate.detection.boxes import Detections, iou_matrix

COCO_IOUS = np.linspace(0.5, 0.95, 10)
_RECALL_POINTS = np.linspace(0.0, 1.0, 101)


def _of_class(det: Detections, cls: int) -> Detections:
    keep = det.classes == cls
    return Detections(det.boxes[keep], det.scores[keep], det.classes[keep])


def _match(pred: Detections, truth: Detections, iou_threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Greedy by score, same class only: for each prediction (score order) the free truth of highest IoU >= threshold.

    Returns per prediction in score order whether it matched, and the IoU of the match (0 when none).
    """
    hits, hit_iou = match_at(pred, truth, (iou_threshold,))
    return hits[0], hit_iou[0]


def match_at(pred: Detections, truth: Detections, thresholds) -> tuple[np.ndarray, np.ndarray]:
    """`_match` at several IoU thresholds from one IoU matrix: (T, P) hits and IoUs of the matches."""
    order = np.argsort(-pred.scores, kind="stable")
    iou = iou_matrix(pred.boxes[order], truth.boxes)
    iou = np.where(pred.classes[order][:, None] == truth.classes[None, :], iou, -1.0)
    hit, hit_iou = np.zeros((len(thresholds), len(order)), bool), np.zeros((len(thresholds), len(order)))
    for t, threshold in enumerate(thresholds):
        taken = np.zeros(len(truth), bool)
        for i in range(len(order)):
            cand = np.where(taken, -1.0, iou[i])
            if len(cand) and cand.max() >= threshold:
                j = int(cand.argmax())
                taken[j], hit[t, i], hit_iou[t, i] = True, True, cand[j]
    return hit, hit_iou


def _average_precision(scores: np.ndarray, hits: np.ndarray, truths: int) -> float:
    order = np.argsort(-scores, kind="mergesort")
    tp = np.cumsum(hits[order])
    fp = np.cumsum(~hits[order])
    recall = tp / truths
    precision = tp / np.maximum(tp + fp, np.finfo(float).eps)
    precision = np.maximum.accumulate(precision[::-1])[::-1] if len(precision) else precision
    idx = np.searchsorted(recall, _RECALL_POINTS, side="left")
    return float(np.where(idx < len(precision), precision[np.minimum(idx, len(precision) - 1)], 0.0).mean())


def coco_map(preds: list[Detections], truths: list[Detections]) -> dict[str, float]:
    """mAP@0.5 and mAP@0.5:0.95 over the classes that have ground truth, as pycocotools computes them (no crowds,
    one area range, no per-image detection cap beyond what the decoder kept)."""
    classes = np.unique(np.concatenate([t.classes for t in truths])) if truths else np.zeros(0, np.int64)
    per_iou = []
    for thr in COCO_IOUS:
        aps = []
        for c in classes:
            scores, hits, count = [], [], 0
            for p, t in zip(preds, truths):
                pc, tc = _of_class(p, c), _of_class(t, c)
                hit, _ = _match(pc, tc, thr)
                scores.append(np.sort(pc.scores, kind="stable")[::-1])
                hits.append(hit)
                count += len(tc)
            aps.append(_average_precision(np.concatenate(scores), np.concatenate(hits), count))
        per_iou.append(float(np.mean(aps)) if aps else float("nan"))
    return {"map50": per_iou[0], "map50_95": float(np.mean(per_iou))}


def agreement_counts(pred: Detections, reference: Detections, iou_threshold: float = 0.5) -> dict[str, float]:
    """One image: boxes matching the reference's (same class, IoU >= threshold), and the IoU summed over matches."""
    hit, hit_iou = _match(pred, reference, iou_threshold)
    return {"matched": float(hit.sum()), "predicted": float(len(pred)), "reference": float(len(reference)),
            "matched_iou": float(hit_iou.sum())}


def box_f1(matched: np.ndarray, predicted: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Pooled F1 = 2 matched / (predicted + reference) along the last axis; 1 when neither side has boxes.

    >>> float(box_f1(np.array([3.0]), np.array([4.0]), np.array([4.0])))
    0.75
    """
    total = predicted.sum(axis=-1) + reference.sum(axis=-1)
    return np.where(total > 0, 2 * matched.sum(axis=-1) / np.maximum(total, 1), 1.0)
