"""Detections per image, IoU, class-aware greedy NMS."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Detections:
    """Boxes of one image: xyxy float32 (K, 4) in input pixels, scores float32 (K,), class ids int64 (K,)."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "boxes", np.asarray(self.boxes, np.float32).reshape(-1, 4))
        object.__setattr__(self, "scores", np.asarray(self.scores, np.float32).reshape(-1))
        object.__setattr__(self, "classes", np.asarray(self.classes, np.int64).reshape(-1))
        if not len(self.boxes) == len(self.scores) == len(self.classes):
            raise ValueError(f"boxes, scores and classes differ in length: {len(self.boxes)}, {len(self.scores)}, {len(self.classes)}")

    def __len__(self) -> int:
        return len(self.boxes)

    def above(self, score: float) -> Detections:
        """The boxes scoring above `score`: after NMS this equals decoding at that threshold (a box is suppressed only by
        higher-scoring ones), unless the per-image cap cut boxes above it."""
        keep = self.scores > score
        return Detections(self.boxes[keep], self.scores[keep], self.classes[keep])

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in `a` (N, 4) with every box in `b` (M, 4), xyxy; (N, M) float64, 0 where both are empty.

    >>> float(iou_matrix(np.array([[0, 0, 2, 2]]), np.array([[1, 0, 3, 2]]))[0, 0])
    0.3333333333333333
    """
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    width = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    height = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = width * height
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou_threshold: float = 0.45,
        max_detections: int = 300) -> np.ndarray:
    """Indices kept by class-aware greedy NMS, best score first.

    A box is dropped when a kept, higher-scoring box of the same class overlaps it with IoU > `iou_threshold`.
    Classes are separated by offsetting each class's boxes beyond the others, so one pass serves all classes.
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    if not len(boxes):
        return np.zeros(0, np.int64)
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    span = float(np.abs(boxes).max()) * 2 + 1
    shifted = boxes + (np.asarray(classes, np.float64) * span)[:, None]
    candidates = shifted[order]
    alive = np.ones(len(order), bool)
    kept: list[int] = []
    for i in range(len(order)):  # one row of IoUs per kept box: at most max_detections rows, not a full matrix
        if not alive[i]:
            continue
        kept.append(i)
        if len(kept) >= max_detections:
            break
        rest = np.flatnonzero(alive[i + 1:]) + i + 1
        if len(rest):
            alive[rest[iou_matrix(candidates[i:i + 1], candidates[rest])[0] > iou_threshold]] = False
    return order[np.asarray(kept, np.int64)]


def select(boxes: np.ndarray, class_scores: np.ndarray, score_threshold: float = 0.25, iou_threshold: float = 0.45,
           max_detections: int = 300, multi_label: bool = False, candidates: int = 2000) -> Detections:
    """Post-process one image: score threshold, class-aware NMS, top `max_detections`.

    `boxes` (A, 4) xyxy and `class_scores` (A, C) probabilities. Each anchor offers its best class, or with
    `multi_label` every class above the threshold (PP-PicoDet's own post-processing). At most `candidates`
    (best scores) enter NMS, which bounds its memory.
    """
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    class_scores = np.asarray(class_scores, np.float32).reshape(len(boxes), -1)
    if multi_label:
        anchors, classes = np.nonzero(class_scores > score_threshold)
        boxes, scores = boxes[anchors], class_scores[anchors, classes]
    else:
        classes = class_scores.argmax(axis=1)
        scores = class_scores[np.arange(len(classes)), classes]
    keep = np.flatnonzero(scores > score_threshold)
    if len(keep) > candidates:
        keep = keep[np.argsort(-scores[keep], kind="stable")[:candidates]]
    picked = keep[nms(boxes[keep], scores[keep], classes[keep], iou_threshold, max_detections)]
    return Detections(boxes[picked], scores[picked], classes[picked])
