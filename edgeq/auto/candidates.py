"""What `auto` evaluates and records: a candidate's recipe, its record (metric, drop against FP32, within the budget or
not, latency and size), and the evaluation of one candidate in a worker.

>>> c = Candidate("int8-mse-float1", "out/candidates/int8-mse-float1.onnx", Recipe("int8", ("conv1",), "mse"),
...               "top1", 97.9, [97.1, 98.6], 4, 0.4, [0.1, 0.7], True, [])
>>> c.recipe.quantized, list(c.to_dict())[:6]
(True, ['name', 'path', 'kind', 'float_layers', 'method', 'metric'])
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeq.data import Batch, Dataset, batches
from edgeq.evaluate.shards import DataSource
from edgeq.model import Model

@dataclass(frozen=True)
class Recipe:
    """How a candidate is built: its precision (`kind`: fp32, fp16, int8 (full or mixed) or qat), the layers kept in
    float, the calibration method, the repairs of a refined recipe and, for QAT, what the training did."""

    kind: str
    float_layers: tuple[str, ...] = ()
    method: str | None = None
    repairs: tuple[str, ...] | None = None   # a refined recipe's repairs (equalization, bias correction)
    qat: dict[str, Any] | None = None        # QAT's figures: factory, epochs, best epoch, samples, seconds

    def __post_init__(self) -> None:
        object.__setattr__(self, "float_layers", tuple(self.float_layers))

    @property
    def quantized(self) -> bool:
        """INT8 (full or mixed) or QAT: the candidates quantization is for."""
        return self.kind in ("int8", "qat")


@dataclass
class Candidate:
    """One evaluated candidate: its recipe and saved model, the validation metric, the drop against FP32 and whether
    it meets the budget; latency, size and INT8 layer count once measured."""

    name: str
    path: str
    recipe: Recipe
    metric: str
    metric_value: float
    metric_ci95: list[float]
    evaluation: int                               # its place in evaluation order (1: FP32)
    drop: float
    drop_ci95: list[float]
    meets: bool
    comparison_reasons: list[str] | None = None   # the comparison's reasons; None for FP32, the baseline
    size_mb: float | None = None
    p50_ms: float | None = None
    p90_ms: float | None = None
    int8_layers: int | None = None

    def to_dict(self, reasons: bool = True) -> dict[str, Any]:
        """The record as written to candidates/NAME.json (`reasons` False: as listed in report.json)."""
        r = self.recipe
        out: dict[str, Any] = {"name": self.name, "path": self.path, "kind": r.kind, "float_layers": list(r.float_layers),
                               "method": r.method}
        if r.repairs is not None:
            out["repairs"] = list(r.repairs)
        if r.qat is not None:
            out["qat"] = r.qat
        out.update(metric=self.metric, metric_value=self.metric_value, metric_ci95=self.metric_ci95,
                   evaluation=self.evaluation, drop=self.drop, drop_ci95=self.drop_ci95, meets=self.meets)
        if reasons and self.comparison_reasons is not None:
            out["comparison_reasons"] = self.comparison_reasons
        measured = {"size_mb": self.size_mb, "p50_ms": self.p50_ms, "p90_ms": self.p90_ms, "int8_layers": self.int8_layers}
        out.update({k: v for k, v in measured.items() if v is not None})
        return out


@dataclass(frozen=True)
class EvalTask:
    """One detector candidate's evaluation (judged on its boxes over the whole data): plain values and the data's
    handle, so any executor (a process pool, a cluster) can run it."""

    name: str
    model_path: str
    data: DataSource
    batch_size: int = 64
    reference: str | None = None   # without ground-truth boxes: the FP32 model, box F1 against it
    detection_labels: str | None = None  # ground-truth boxes for mAP


def evaluate_task(task: EvalTask) -> dict:
    """Validate one detector candidate (runs in a worker)."""
    from edgeq.evaluate.detect_validation import validate_detection

    record = validate_detection(task.model_path, task.data.open(), task.reference, labels=task.detection_labels,
                                batch_size=task.batch_size).to_dict()
    record.pop("predictions", None)
    return record


def first_batch(data: Dataset, model: Model) -> Batch:
    """The first sample of the validation set: whether it has labels, and the shapes latency is measured on."""
    return next(batches(data, model.inputs, 1, refuse_nonfinite=False))


def bench_shapes(model: Model, arrays: dict[str, np.ndarray], batch: int) -> dict[str, tuple[int, ...]]:
    """Timing shapes for inputs with dynamic dims besides the batch (an image size, a sequence length): the
    validation samples' own, so latency is measured on what the model is judged on."""
    from edgeq.timing import is_fixed_dim

    shapes = {}
    for spec in model.inputs:
        if spec.name in arrays and not all(is_fixed_dim(d) for d in spec.shape[1:]):
            first = spec.shape[0] if spec.shape and is_fixed_dim(spec.shape[0]) else batch
            shapes[spec.name] = (int(first), *map(int, arrays[spec.name].shape[1:]))
    return shapes


def measure(candidates: list[Candidate], n_layers: int, threads: int, runs: int, batch: int,
            shapes: dict[str, tuple[int, ...]] | None = None) -> None:
    """Latency and size of every candidate, each in its own benchmark worker."""
    from edgeq.bench import BenchConfig, benchmark

    config = BenchConfig(threads=threads, runs=runs, warmup=3, batch=batch, shapes=shapes or {})
    bench = benchmark([c.path for c in candidates], config)
    for c, b in zip(candidates, bench):
        d = b.to_dict()
        c.size_mb, c.p50_ms, c.p90_ms = d["size_bytes"] / 1e6, d["latency_ms"]["p50"], d["latency_ms"]["p90"]
        c.int8_layers = {"int8": n_layers - len(c.recipe.float_layers), "qat": n_layers}.get(c.recipe.kind, 0)
