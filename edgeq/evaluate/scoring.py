"""Per-sample columns batch by batch, then the metrics and the record."""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from edgeq.data import Batch, count_nonfinite
from edgeq.errors import DataError, ModelError, UserError
from edgeq.evaluate.metrics import METRICS
from edgeq.evaluate.record import ValidationRecord
from edgeq.evaluate.stats import Estimate, contain, mean_estimate
from edgeq.evaluate.tasks.classify import classify, classify_metrics, classify_warnings, labelled_task
from edgeq.evaluate.tasks.fidelity import fidelity, fidelity_metrics
from edgeq.evaluate.tasks.lm import window_nll
from edgeq.evaluate.tasks.regress import regress, regress_metrics
from edgeq.evaluate.tasks.rows import failed_rows

# A sample whose outputs are not finite counts as a failure where the metric has a worst value (wrong class,
# disagreement, cosine 0, IoU 0) and is left out where it has none (errors, differences, SQNR), with a warning.

@dataclass
class Scorer:
    """Per-sample columns for every metric; the task (classify, regress, fidelity) is fixed by the first batch."""

    has_reference: bool
    lm_input: str | None = None
    labelled: bool | None = None
    task: str | None = None
    samples: int = 0
    columns: dict[str, list[np.ndarray]] = field(default_factory=lambda: defaultdict(list))
    warnings: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, batch: Batch, y: np.ndarray, r: np.ndarray | None) -> None:
        labels = batch.labels
        if self.lm_input is not None and labels is None:
            self.labelled, self.task = False, "lm"
            nll = window_nll(y, batch.inputs[self.lm_input])
            self._append({"nll": np.where(failed_rows(y), np.nan, nll)})
        else:
            self._check_labels(labels)
        self.samples += len(y)
        failed = failed_rows(y)
        self.counts["inputs"] += count_nonfinite(batch)
        self.counts["outputs"] += int((~np.isfinite(y)).sum()) if y.dtype.kind == "f" else 0
        self.counts["samples_with_nonfinite_outputs"] += int(failed.sum())
        if labels is not None:
            self.task = self.task or labelled_task(y, labels, self.warnings)
            cols = classify(y, labels, failed) if self.task == "classify" else regress(y, labels, failed)
            self._append(cols)
        if r is not None:
            if r.shape != y.shape:
                raise ModelError(f"the reference's output has shape {r.shape}, the model's {y.shape}",
                                 "give a reference with the same outputs (the FP32 model this one came from)")
            self.counts["reference_outputs"] += int((~np.isfinite(r)).sum()) if r.dtype.kind == "f" else 0
            self._append(fidelity(y, r, failed | failed_rows(r)), prefix="fidelity:")

    def _check_labels(self, labels: np.ndarray | None) -> None:
        has = labels is not None
        if self.labelled is None:
            self.labelled = has
            if not has and not self.has_reference:
                raise UserError("the data has no labels, so there is nothing to measure the model against",
                                "pass --reference REF_MODEL (fidelity to it), or add a 'labels' array to the data")
        elif self.labelled != has:
            raise DataError("some samples have labels and others do not", "give every sample a label, or none")

    def _append(self, cols: dict[str, np.ndarray], prefix: str = "") -> None:
        for name, values in cols.items():
            self.columns[prefix + name].append(values)

    def record(self, model: str, data: str, output: str, fingerprint: str, *, reference: str | None,
               notes: list[str]) -> ValidationRecord:
        cols = {name: np.concatenate(parts) for name, parts in self.columns.items()}
        n = self.samples
        metrics, per_sample, predictions = {}, {}, None
        if self.task == "lm":
            nll = mean_estimate(cols["nll"])
            metrics["perplexity"] = contain(Estimate(math.exp(nll.value), (math.exp(nll.ci95[0]), math.exp(nll.ci95[1]))))
            metrics["nll"] = nll
            per_sample["nll"] = cols["nll"]
        elif self.labelled:
            predictions = cols.get("prediction")
            found = classify_metrics(cols) if self.task == "classify" else regress_metrics(cols)
            metrics.update(found)
            per_sample.update(_kept(cols, found))
        if self.has_reference:
            fid = {k.removeprefix("fidelity:"): v for k, v in cols.items() if k.startswith("fidelity:")}
            found = fidelity_metrics(fid)
            metrics.update(found)
            per_sample.update(_kept(fid, found))
            predictions = predictions if predictions is not None else fid.get("prediction")
        primary = _primary(metrics, self.task if self.labelled or self.task == "lm" else "fidelity")
        nonfinite = dict(self.counts)
        assumed = classify_warnings(cols) if self.labelled and self.task == "classify" else []
        warnings = [*notes, *self.warnings, *assumed, *_nonfinite_warnings(nonfinite, n, cols)]
        return ValidationRecord(model, data, output, primary, n, metrics, per_sample, fingerprint, predictions, reference,
                                nonfinite, warnings)


def _kept(cols: dict[str, np.ndarray], metrics: dict[str, Estimate]) -> dict[str, np.ndarray]:
    """The per-sample arrays behind the reported metrics (squared errors stand behind rmse)."""
    names = {METRICS[m].samples for m in metrics} | ({"sq_error"} if "rmse" in metrics else set())
    return {k: v for k, v in cols.items() if k in names}


def _primary(metrics: dict[str, Estimate], task: str | None) -> str:
    for name in {"classify": ("top1",), "regress": ("mae",), "lm": ("perplexity",)}.get(task or "", ("top1_agreement", "cosine")):
        if name in metrics:
            return name
    raise ModelError("the model's output is neither class scores nor float values that can be compared",
                     "choose a float output with --output, or add labels to the data")


def _nonfinite_warnings(nonfinite: dict[str, int], n: int, cols: dict[str, np.ndarray]) -> list[str]:
    warnings = []
    if nonfinite.get("inputs"):
        warnings.append(f"{nonfinite['inputs']} input values are NaN or Inf; results on those samples say little about the model")
    if nonfinite.get("samples_with_nonfinite_outputs"):
        warnings.append(f"the model produced NaN or Inf for {nonfinite['samples_with_nonfinite_outputs']} of {n} samples "
                        f"({nonfinite['outputs']} values): they count as wrong, or are left out of error averages")
    if nonfinite.get("reference_outputs"):
        warnings.append(f"the reference produced {nonfinite['reference_outputs']} NaN or Inf values; fidelity on those samples counts as failed")
    left_out = int(np.isnan(cols["abs_error"]).sum()) if "abs_error" in cols else 0
    if left_out:
        warnings.append(f"{left_out} samples with non-finite outputs or labels are left out of mae and rmse")
    return warnings
