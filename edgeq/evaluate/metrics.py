"""The metric registry: how each metric is read, scaled and counted in a drop."""
from __future__ import annotations

from dataclasses import dataclass

# PP-OCR's DB post-processing binarises its probability map at 0.3 (det_db_thresh); the IoU uses the same cut.
MAP_THRESHOLD = 0.3
UNIT_RANGE_SLACK = 0.02  # how far past [0, 1] a (quantized) probability map may step


@dataclass(frozen=True)
class MetricInfo:
    """How a metric is read: `value = scale * mean(per_sample[samples])`; a drop counts `points` per unit of value."""

    samples: str | None        # per-sample array behind the metric; None when it is not a per-sample mean
    scale: float = 1.0
    higher_is_better: bool = True
    points: float = 1.0
    unit: str = ""
    pooled: bool = False       # recomputed from the record's per-image detections (mAP), not a mean of per-sample values


METRICS = {
    "top1": MetricInfo("correct", scale=100, unit="%"),
    "top5": MetricInfo("correct_top5", scale=100, unit="%"),
    "mae": MetricInfo("abs_error", higher_is_better=False),
    "rmse": MetricInfo(None, higher_is_better=False),
    "top1_agreement": MetricInfo("agree", scale=100, unit="%"),
    # One point of cosine is 0.01, so the same 1/3-point rule reads sensibly for fidelity as for accuracy.
    "cosine": MetricInfo("cosine", points=100),
    "sqnr_db": MetricInfo(None, unit="dB"),
    "mean_abs_diff": MetricInfo("abs_diff", higher_is_better=False),
    f"iou@{MAP_THRESHOLD}": MetricInfo(f"iou@{MAP_THRESHOLD}", points=100),
    # Causal LMs on token windows: per-window mean negative log-likelihood; perplexity = exp(mean nll). A perplexity
    # drop is the relative increase in percent (exp of the paired nll difference, minus one).
    "perplexity": MetricInfo("nll", higher_is_better=False),
    "nll": MetricInfo("nll", higher_is_better=False, unit="nats/token"),
    # Detection against the FP32 reference: means over images of each image's box agreement (IoU 0.5, same class).
    "box_f1": MetricInfo("box_f1", points=100),
    "box_precision": MetricInfo("box_precision", points=100),
    "box_recall": MetricInfo("box_recall", points=100),
    "matched_iou": MetricInfo("matched_iou", points=100),
    # Detection on ground truth: COCO mAP, pooled over images (edgeq.evaluate.detection.pooled).
    "map50": MetricInfo(None, points=100, pooled=True),
    "map50_95": MetricInfo(None, points=100, pooled=True),
}
