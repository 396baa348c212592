"""Per-sample columns batch by batch, then the metrics and the record."""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from edgeq.data import Batch, count_nonfinite
from edgeq.errors import DataError, ModelError, UserError
from edgeq.evaluate.metrics import METRICS
from edgeq.evaluate.outputs import OutputFidelity, OutputSummary, thresholds, worst_output
from edgeq.evaluate.record import ValidationRecord
from edgeq.evaluate.stats import Estimate, contain, json_number, mean_estimate
from edgeq.evaluate.tasks.classify import classify, classify_metrics, classify_warnings, labelled_task
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
    outputs: list[OutputFidelity] = field(default_factory=list)  # the outputs fidelity is measured on
    named: tuple[str, ...] = ()  # outputs the user asked for: refused, not skipped, when they cannot be scored
    skipped: set[str] = field(default_factory=set)
    labelled: bool | None = None
    task: str | None = None
    samples: int = 0
    columns: dict[str, list[np.ndarray]] = field(default_factory=lambda: defaultdict(list))
    warnings: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, batch: Batch, ys: dict[str, np.ndarray], rs: dict[str, np.ndarray] | None) -> None:
        """Score one batch: labels (or perplexity) on the first scored output, fidelity on every scored output."""
        ys = self._sample_first(ys, batch.size)
        rs = None if rs is None else {name: rs[name] for name in ys}  # a shape that differs is refused below
        labels, y = batch.labels, next(iter(ys.values()))
        if self.lm_input is not None and labels is None:
            self.labelled, self.task = False, "lm"
            nll = window_nll(y, batch.inputs[self.lm_input])
            self._append({"nll": np.where(failed_rows(y), np.nan, nll)})
        else:
            self._check_labels(labels)
        self.samples += len(y)
        failed = failed_rows(y)
        self.counts["inputs"] += count_nonfinite(batch)
        self.counts["outputs"] += sum(int((~np.isfinite(v)).sum()) for v in ys.values() if v.dtype.kind == "f")
        self.counts["samples_with_nonfinite_outputs"] += int(np.any([failed_rows(v) for v in ys.values()], axis=0).sum())
        if labels is not None:
            self.task = self.task or labelled_task(y, labels, self.warnings)
            cols = classify(y, labels, failed) if self.task == "classify" else regress(y, labels, failed)
            self._append(cols)
        for scored in (o for o in self.outputs if rs is not None and o.name in ys):
            y_out, r_out = ys[scored.name], rs[scored.name]
            if r_out.shape != y_out.shape:
                raise ModelError(f"the reference's output {scored.name!r} has shape {r_out.shape}, the model's {y_out.shape}",
                                 "give a reference with the same outputs (the FP32 model this one came from)")
            self.counts["reference_outputs"] += int((~np.isfinite(r_out)).sum()) if r_out.dtype.kind == "f" else 0
            scored.add(y_out, r_out, failed_rows(y_out) | failed_rows(r_out), labels is not None)

    def fit(self, batch: Batch, ys: dict[str, np.ndarray], rs: dict[str, np.ndarray]) -> None:
        """Fix every output's kind and channel groups on `batch`, the data's first (a later data shard)."""
        ys = self._sample_first(ys, batch.size)
        for scored in (o for o in self.outputs if o.name in ys and o.name in rs and rs[o.name].shape == ys[o.name].shape):
            scored.fix(ys[scored.name], rs[scored.name], batch.labels is not None)

    def merged(self, later: list["Scorer"]) -> "Scorer":
        """This shard's columns followed by the later shards' (in data order), counts summed, warnings once."""
        for other in later:
            if other.labelled is not None and self.labelled is not None and other.labelled != self.labelled:
                raise DataError("some samples have labels and others do not", "give every sample a label, or none")
            self.labelled = self.labelled if self.labelled is not None else other.labelled
            self.task = self.task or other.task
            self.samples += other.samples
            self.skipped |= other.skipped
            for name, parts in other.columns.items():
                self.columns[name].extend(parts)
            for name, count in other.counts.items():
                self.counts[name] += count
            self.warnings = list(dict.fromkeys([*self.warnings, *other.warnings]))
            for mine, theirs in zip(self.outputs, other.outputs):
                mine.extend(theirs)
        return self

    def _sample_first(self, values: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
        """The outputs whose first axis holds the samples; others are left out (said), or refused when named."""
        kept = {}
        for name, v in values.items():
            if v.ndim and len(v) == rows:
                kept[name] = v
                continue
            if name in self.named:
                raise ModelError(f"output {name!r} has shape {v.shape}: its first axis is not the {rows} samples of the batch",
                                 "name outputs with the sample axis first in --outputs, or give whole feeds (edgeq.calibrate.Feeds)")
            self.skipped.add(name)
        if not kept:
            raise ModelError(f"no output has the samples on its first axis (batch of {rows}: {', '.join(f'{k} {v.shape}' for k, v in values.items())})",
                             "give whole feeds, one run each (edgeq.calibrate.Feeds), so that each run is one sample")
        return kept

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
        summaries, worst = [], None
        if self.has_reference:
            summaries = [s for s in (o.summary() for o in self.outputs) if s is not None]
            worst = worst_output(summaries) if summaries else None
        if worst is not None:
            metrics.update(worst.metrics)
            per_sample.update(_kept(worst.per_sample, worst.metrics))
            found = next((s.predictions for s in [worst, *summaries] if s.predictions is not None), None)
            predictions = predictions if predictions is not None else found
            output = output if self.labelled else worst.name
        primary = _primary(metrics, self.task if self.labelled or self.task == "lm" else "fidelity")
        nonfinite = dict(self.counts)
        assumed = classify_warnings(cols) if self.labelled and self.task == "classify" else []
        warnings = [*notes, *self.warnings, *assumed, *_nonfinite_warnings(nonfinite, n, cols)]
        unscored = [o.name for o in self.outputs if o.name not in {s.name for s in summaries} | self.skipped] if self.has_reference else []
        warnings += [s.caveat for s in summaries if s.caveat]
        if self.skipped:
            warnings.append(f"output(s) {', '.join(sorted(self.skipped))} have no sample axis first: not scored")
        if unscored:
            warnings.append(f"output(s) {', '.join(unscored)} hold neither class ids nor float values: not scored")
        return ValidationRecord(model, data, output, primary, n, metrics, per_sample, fingerprint, predictions, reference,
                                nonfinite, warnings, outputs=[s.to_dict() for s in summaries],
                                worst=_worst(worst) if worst is not None else None,
                                thresholds=thresholds() if worst is not None else None)


def _worst(summary: OutputSummary) -> dict:
    group = summary.groups[summary.worst_group] if len(summary.groups) > 1 else None
    return {"output": summary.name, "metric": summary.judged_by, "value": json_number(summary.metrics[summary.judged_by].value),
            "group": summary.worst_group if group else None, "channels": group["channels"] if group else None,
            "loss_points": json_number(summary.loss_points)}


def _kept(cols: dict[str, np.ndarray], metrics: dict[str, Estimate]) -> dict[str, np.ndarray]:
    """The per-sample arrays behind the reported metrics (squared errors stand behind rmse)."""
    names = {METRICS[m].samples for m in metrics} | ({"sq_error"} if "rmse" in metrics else set())
    return {k: v for k, v in cols.items() if k in names}


def _primary(metrics: dict[str, Estimate], task: str | None) -> str:
    for name in {"classify": ("top1",), "regress": ("mae",), "lm": ("perplexity",)}.get(task or "", ("top1_agreement", "cosine")):
        if name in metrics:
            return name
    raise ModelError("the model's output is neither class scores nor float values that can be compared",
                     "choose float outputs with --outputs, or add labels to the data")


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
