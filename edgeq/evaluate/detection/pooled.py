"""mAP with a bootstrap over images: the COCO computation on weighted images, vectorised over resamples.

mAP is pooled (every class's precision-recall curve runs over all images at once), so it is not a mean of per-image
values and the per-sample bootstrap of `edgeq.evaluate.stats` does not apply. Matching is per image, though: a
prediction's hit (true positive at an IoU threshold) depends on its own image only. A bootstrap resample of images is
therefore a weight per image (how often it was drawn): each prediction counts with its image's weight in the
cumulative true and false positives, each image's ground truth with the same weight in the recall denominator.
Weight 1 for every image is exactly `coco_map`. The same weights applied to two models' tables give the paired
drop of `compare`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeq.evaluate.detection.boxes import Detections
from edgeq.evaluate.detection.metrics import COCO_IOUS, _of_class, match_at
from edgeq.evaluate.stats import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED

_RECALL_POINTS = np.linspace(0.0, 1.0, 101)
_BLOCK_CELLS = 4_000_000  # resamples × predictions per block: bounds memory to a few arrays of 32 MB
# Resamples × predictions (over every class and IoU threshold) a bootstrap may cost: ~3 s on this 2-core machine for
# 12 PP-PicoDet pages at 300 boxes each and 2000 resamples. Bigger sets get fewer resamples, never under MIN.
_BOOTSTRAP_CELLS = 15_000_000
MIN_RESAMPLES = 200


@dataclass(frozen=True)
class _Curve:
    """One class at one IoU threshold: predictions in global score order with their image and hit."""

    image: np.ndarray   # (P,) image index of each prediction
    hit: np.ndarray     # (P,) bool
    truths: np.ndarray  # (N,) ground-truth boxes of this class per image


@dataclass(frozen=True)
class MapTable:
    """Everything mAP needs from one model's detections against the ground truth, per IoU threshold and class."""

    images: int
    curves: tuple[tuple[_Curve, ...], ...]  # [threshold][class]

    @property
    def resamples(self) -> int:
        """Bootstrap resamples within the cost budget: BOOTSTRAP_RESAMPLES for small sets, fewer for large ones."""
        cells = max(1, sum(len(c.hit) for row in self.curves for c in row))
        return int(min(BOOTSTRAP_RESAMPLES, max(MIN_RESAMPLES, _BOOTSTRAP_CELLS // cells)))

    @classmethod
    def build(cls, preds: list[Detections], truths: list[Detections]) -> "MapTable":
        if len(preds) != len(truths):
            raise ValueError(f"{len(preds)} images of detections for {len(truths)} images of ground truth")
        classes = np.unique(np.concatenate([t.classes for t in truths])) if truths else np.zeros(0, np.int64)
        curves: list[list[_Curve]] = [[] for _ in COCO_IOUS]
        for c in classes:
            scores, hits, images = [], [], []   # hits: per image (thresholds, predictions in its score order)
            counts = np.zeros(len(truths))
            for i, (p, t) in enumerate(zip(preds, truths)):
                pc, tc = _of_class(p, c), _of_class(t, c)
                hits.append(match_at(pc, tc, COCO_IOUS)[0])   # one IoU matrix for the ten thresholds
                scores.append(np.sort(pc.scores, kind="stable")[::-1])
                images.append(np.full(len(pc), i))
                counts[i] = len(tc)
            s, im = (np.concatenate(a) if a else np.zeros(0) for a in (scores, images))
            h_all = np.concatenate(hits, axis=1) if hits else np.zeros((len(COCO_IOUS), 0), bool)
            order = np.argsort(-s, kind="mergesort")
            for t in range(len(COCO_IOUS)):
                # False positives after the last hit change no AP in any resample (recall stays, precision only
                # falls, and the envelope already holds the precision at that hit): at mAP's 0.001 score threshold
                # they are most of the predictions.
                h = h_all[t]
                hit_at = np.flatnonzero(h[order])
                kept = order[:hit_at[-1] + 1] if len(hit_at) else order[:0]
                curves[t].append(_Curve(im[kept].astype(np.int64), h[kept].astype(bool), counts))
        return cls(len(truths), tuple(tuple(row) for row in curves))

    def values(self, weights: np.ndarray) -> np.ndarray:
        """(R, 2): mAP@0.5 and mAP@0.5:0.95 for each row of image weights (R, images)."""
        weights = np.atleast_2d(np.asarray(weights, np.float64))
        if not self.curves or not self.curves[0]:
            return np.full((len(weights), 2), np.nan)
        per_threshold = np.stack([_nanmean([_weighted_ap(c, weights) for c in row]) for row in self.curves], axis=1)
        return np.stack([per_threshold[:, 0], per_threshold.mean(axis=1)], axis=1)


def _nanmean(rows: list[np.ndarray]) -> np.ndarray:
    stacked = np.stack(rows)
    counted = np.isfinite(stacked).sum(axis=0)
    return np.where(counted > 0, np.nansum(stacked, axis=0) / np.maximum(counted, 1), np.nan)


def _weighted_ap(curve: _Curve, weights: np.ndarray) -> np.ndarray:
    """101-point interpolated AP per row of weights, as `metrics._average_precision` on the weighted images."""
    truths = weights @ curve.truths  # (R,)
    if not len(curve.hit):
        return np.where(truths > 0, 0.0, np.nan)
    out = np.empty(len(weights))
    block = max(1, _BLOCK_CELLS // len(curve.hit))
    for start in range(0, len(weights), block):
        w = weights[start:start + block][:, curve.image]  # (r, P)
        tp, fp = np.cumsum(w * curve.hit, axis=1), np.cumsum(w * ~curve.hit, axis=1)
        denominator = truths[start:start + block, None]
        recall = tp / np.where(denominator > 0, denominator, np.inf)  # a true division: 3 * (1/6) misses the point 0.5
        precision = tp / np.maximum(tp + fp, np.finfo(float).eps)
        envelope = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
        # Each recall point takes the envelope at the first prediction whose recall reaches it: the points reached
        # at prediction j and not before count envelope[j] once each (the same sum as COCO's searchsorted per point).
        reached = np.searchsorted(_RECALL_POINTS, recall.ravel(), side="right").reshape(recall.shape)
        newly = np.diff(reached, axis=1, prepend=0)
        out[start:start + block] = (envelope * newly).sum(axis=1) / len(_RECALL_POINTS)
    return np.where(truths > 0, out, np.nan)  # a class without ground truth in a resample counts in no mean, as in COCO


def resample_weights(images: int, resamples: int = BOOTSTRAP_RESAMPLES) -> np.ndarray:
    """(resamples, images) draw counts of a bootstrap over images (fixed seed: deterministic, shared by pairs)."""
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    return rng.multinomial(images, np.full(images, 1.0 / images), size=resamples).astype(np.float64)


def pooled_map(preds: list[Detections], truths: list[Detections]) -> dict[str, tuple[float, tuple[float, float]]]:
    """mAP@0.5 and mAP@0.5:0.95 with percentile-bootstrap 95% intervals over images."""
    table = MapTable.build(preds, truths)
    point = table.values(np.ones((1, table.images)))[0]
    draws = table.values(resample_weights(table.images, table.resamples)) if table.images else np.full((1, 2), np.nan)
    lo, hi = np.nanpercentile(draws, [2.5, 97.5], axis=0) if np.isfinite(draws).any() else (draws[0], draws[0])
    return {name: (float(point[k]), (float(lo[k]), float(hi[k]))) for k, name in enumerate(("map50", "map50_95"))}


def paired_map_drop(base: MapTable, cand: MapTable) -> tuple[np.ndarray, np.ndarray]:
    """(point (2,), draws (R, 2)) of base − candidate mAP@0.5 and mAP@0.5:0.95 on the same resampled images."""
    ones = np.ones((1, base.images))
    weights = resample_weights(base.images, min(base.resamples, cand.resamples))
    return (base.values(ones) - cand.values(ones))[0], base.values(weights) - cand.values(weights)


def detections_record(found: list[Detections], truths: list[Detections]) -> dict[str, list[list[float]]]:
    """JSON rows for a validation record, from which `compare` rebuilds the table: predictions [image, x1, y1, x2,
    y2, score, class] and ground truth [image, x1, y1, x2, y2, class]."""
    def rows(dets: list[Detections], scored: bool) -> list[list[float]]:
        return [[float(i), *map(float, b), *([float(s)] if scored else []), float(c)]
                for i, d in enumerate(dets) for b, s, c in zip(d.boxes, d.scores, d.classes)]

    return {"images": len(truths), "predicted": rows(found, True), "truth": rows(truths, False)}


def table_of_record(detections: dict) -> tuple[MapTable, np.ndarray]:
    """The MapTable of a record's detections, and its ground truth as an array (to check two records share it)."""
    n = int(detections["images"])
    pred = np.asarray(detections["predicted"], np.float64).reshape(-1, 7)
    truth = np.asarray(detections["truth"], np.float64).reshape(-1, 6)
    per_image = lambda a, i: a[a[:, 0] == i]  # noqa: E731
    preds = [Detections(p[:, 1:5], p[:, 5], p[:, 6]) for p in (per_image(pred, i) for i in range(n))]
    truths = [Detections(t[:, 1:5], np.ones(len(t)), t[:, 5]) for t in (per_image(truth, i) for i in range(n))]
    return MapTable.build(preds, truths), truth
