"""The validation record: what `validate` measured, as a value and as JSON."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgeq.evaluate.metrics import METRICS
from edgeq.evaluate.stats import Estimate, json_number

RECORD_KIND = "edgeq.validation"
# 2: every scored output with its channel groups (`outputs`), the one the fidelity verdict rests on (`worst`) and
# the thresholds it is read against; every key of version 1 is kept with its meaning.
RECORD_VERSION = 2


@dataclass
class ValidationRecord:
    """The evidence of one validation: the primary metric, every metric with its interval, per-sample results.

    >>> record = validate("model.onnx", edgeq.Dataset.from_npz("val.npz"))   # doctest: +SKIP
    >>> record.metric, round(record.value, 1), record.samples                  # doctest: +SKIP
    ('top1', 91.5, 200)
    """

    model: str
    data: str
    output: str
    metric: str
    samples: int
    metrics: dict[str, Estimate]
    per_sample: dict[str, np.ndarray]
    data_fingerprint: str
    predictions: np.ndarray | None = None
    reference: str | None = None
    nonfinite: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    outputs: list[dict] = field(default_factory=list)
    worst: dict | None = None
    thresholds: dict | None = None
    detections: dict | None = None  # labelled detection: per-image boxes and ground truth, for compare's paired mAP

    @property
    def value(self) -> float:
        return self.metrics[self.metric].value

    @property
    def ci95(self) -> tuple[float, float]:
        return self.metrics[self.metric].ci95

    @property
    def higher_is_better(self) -> bool:
        return METRICS[self.metric].higher_is_better

    def to_dict(self) -> dict:
        """Plain JSON types; NaN and infinity (e.g. the SQNR of identical outputs) become null."""
        return {
            "kind": RECORD_KIND, "version": RECORD_VERSION,
            "model": self.model, "reference": self.reference, "data": self.data, "output": self.output,
            "metric": self.metric, "value": json_number(self.value), "ci95": [json_number(v) for v in self.ci95],
            "higher_is_better": self.higher_is_better, "unit": METRICS[self.metric].unit, "samples": self.samples,
            "metrics": {name: {**est.to_dict(), "higher_is_better": METRICS[name].higher_is_better}
                        for name, est in self.metrics.items()},
            "per_sample": {name: [json_number(v) for v in values.tolist()] for name, values in self.per_sample.items()},
            "predictions": None if self.predictions is None else self.predictions.tolist(),
            "data_fingerprint": self.data_fingerprint,
            "nonfinite": dict(self.nonfinite), "warnings": list(self.warnings),
            "outputs": list(self.outputs), "worst": self.worst, "thresholds": self.thresholds,
            "detections": self.detections,
        }
