"""Validate a model on data (a metric with a 95% interval, per sample) and compare two validations (paired).

A validation streams the data once through ONNX Runtime and keeps one number per sample per metric, so a comparison
can pair the two models sample by sample: the paired interval of a drop is far narrower than the two intervals side
by side, because both models find the same samples hard.

>>> import edgeq
>>> val = edgeq.Dataset.from_npz("val.npz")                                    # doctest: +SKIP
>>> base, cand = validate("model.onnx", val), validate("model_int8.onnx", val)  # doctest: +SKIP
>>> compare(base, cand).verdict                                                 # doctest: +SKIP
'ship'
"""
from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.data import Batch, Dataset, batches, conform, count_nonfinite, open_data
from edgeq.decide import DecisionRule, decide
from edgeq.errors import ConfigError, DataError, ModelError, UserError
from edgeq.model import Model, load, run_session

RECORD_KIND = "edgeq.validation"
RECORD_VERSION = 1
Z95 = 1.959963984540054
# Fixed seed and resample count: the same inputs give the same interval, run after run and machine to machine.
BOOTSTRAP_SEED = 20_240_917
BOOTSTRAP_RESAMPLES = 2000
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
}


@dataclass(frozen=True)
class Estimate:
    """A metric value and its 95% confidence interval."""

    value: float
    ci95: tuple[float, float]

    def to_dict(self) -> dict:
        return {"value": _num(self.value), "ci95": [_num(self.ci95[0]), _num(self.ci95[1])]}


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
            "metric": self.metric, "value": _num(self.value), "ci95": [_num(v) for v in self.ci95],
            "higher_is_better": self.higher_is_better, "unit": METRICS[self.metric].unit, "samples": self.samples,
            "metrics": {name: {**est.to_dict(), "higher_is_better": METRICS[name].higher_is_better}
                        for name, est in self.metrics.items()},
            "per_sample": {name: [_num(v) for v in values.tolist()] for name, values in self.per_sample.items()},
            "predictions": None if self.predictions is None else self.predictions.tolist(),
            "data_fingerprint": self.data_fingerprint,
            "nonfinite": dict(self.nonfinite), "warnings": list(self.warnings),
        }


# ----- validate ---------------------------------------------------------------------------------------------

def validate(model: Path | str | Model, data: Dataset | Path | str, reference: Path | str | Model | None = None,
             batch_size: int = 32, output: str | None = None) -> ValidationRecord:
    """Run `model` on `data` with ONNX Runtime and measure it.

    Labels that are class ids give top-1 (and top-5) accuracy in percent; float labels give MAE and RMSE. A causal
    language model (one integer input of token ids, logits [batch, sequence, vocabulary] out) on unlabelled token
    windows and without `reference` gives perplexity, each window a sample. Otherwise without labels, `reference` is required and the metric
    is fidelity to it: top-1 agreement, cosine, SQNR (and, for
    outputs in [0, 1] such as detection probability maps, mean absolute difference and IoU at 0.3). NaN/Inf in
    inputs or outputs is counted and reported, never refused.

    >>> val = edgeq.Dataset.from_npz("val.npz")                                       # doctest: +SKIP
    >>> validate("model_int8.onnx", val, reference="model.onnx").metrics["cosine"]    # doctest: +SKIP
    Estimate(value=0.9991, ci95=(0.9988, 0.9993))
    """
    data = open_data(data) if isinstance(data, (str, Path)) else data
    subject, subject_label = _load(model)
    out_name = _output_name(subject, output)
    ref = _Reference.open(reference, out_name) if reference is not None else None
    digest = hashlib.sha256()
    stream = _fingerprinted(data, digest)
    # Perplexity needs no reference; with one, the metric is fidelity to it, as for any model.
    lm_input = _causal_lm_input(subject) if ref is None and out_name == subject.outputs[0].name else None
    scorer = _Scorer(has_reference=ref is not None, lm_input=lm_input)
    session = subject.session()
    for batch in batches(stream, subject.inputs, batch_size, refuse_nonfinite=False):
        y = _run(session, out_name, batch.inputs, subject_label, data.description)
        scorer.add(batch, y, ref.run(batch, data.description) if ref else None)
    return scorer.record(subject_label, data.description, out_name, "sha256:" + digest.hexdigest(),
                         reference=ref.label if ref else None, notes=[*data.notes, *stream.notes])


def _load(model: Path | str | Model) -> tuple[Model, str]:
    # An in-memory Model (e.g. a fresh QuantizedModel) may carry its source's path: name it, do not claim the file.
    if isinstance(model, Model):
        return model, f"<in memory: {model.name}>"
    return load(model), str(model)


def _causal_lm_input(model: Model) -> str | None:
    """The token-id input of a causal LM: a single integer input [batch, sequence] and a rank-3 float first output."""
    inputs, outputs = model.inputs, model.outputs
    if len(inputs) == 1 and inputs[0].dtype.kind in "iu" and inputs[0].rank == 2 and outputs and outputs[0].rank == 3 \
            and outputs[0].dtype.kind == "f":
        return inputs[0].name
    return None


def window_nll(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Mean negative log-likelihood (nats per token) of each window's next tokens: logits [n, T, V], ids [n, T].

    >>> float(window_nll(np.zeros((1, 3, 4)), np.array([[0, 1, 2]]))[0]) == float(np.log(4))
    True
    """
    if ids.ndim != 2 or ids.shape[1] < 2:
        raise DataError(f"token windows have shape {ids.shape}", "give input_ids as [windows, tokens] with at least 2 tokens")
    z = logits[:, :-1].astype(np.float64)
    top = z.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(z - top).sum(axis=-1)) + top[..., 0]
    target = np.take_along_axis(z, ids[:, 1:, None].astype(np.int64), axis=-1)[..., 0]
    return (lse - target).mean(axis=1)


def _output_name(model: Model, output: str | None) -> str:
    names = [o.name for o in model.outputs]
    if output is None:
        return names[0]
    if output not in names:
        raise ConfigError(f"the model has no output {output!r}", f"use one of: {', '.join(names)}")
    return output


def _run(session: Any, output: str, feed: dict[str, np.ndarray], label: str, where: str) -> np.ndarray:
    return np.asarray(run_session(session, [output], feed, label, where)[0])


@dataclass
class _Reference:
    """The reference model run on the same batches (cast to its own input dtypes)."""

    model: Model
    label: str
    output: str
    session: Any

    @classmethod
    def open(cls, reference: Path | str | Model, output: str) -> "_Reference":
        model, label = _load(reference)
        names = [o.name for o in model.outputs]
        # Quantized models keep their outputs' names; fall back to the first output for a renamed one.
        name = output if output in names else names[0]
        return cls(model, label, name, model.session())

    def run(self, batch: Batch, where: str) -> np.ndarray:
        feed = conform(Batch(batch.inputs, batch.labels), self.model.inputs, f"{where} (reference)").inputs
        return _run(self.session, self.output, feed, self.label, where)


def _fingerprinted(data: Dataset, digest: Any) -> Dataset:
    """The same data, hashed chunk by chunk as it streams by.

    Hashing happens before the cast to the model's input dtypes, so an FP16 model with float16 inputs and its FP32
    base get the same fingerprint on the same data. The notes list is fresh so repeated runs do not pile up notes.
    """
    def source() -> Iterator[Batch]:
        for chunk in data.chunks():
            arrays = [chunk.inputs[k] for k in sorted(chunk.inputs)] + ([chunk.labels] if chunk.labels is not None else [])
            for arr in arrays:
                arr = np.ascontiguousarray(arr)
                digest.update(f"{arr.dtype.str}{arr.shape}".encode())
                digest.update(arr)  # the array's own buffer: no copy of a large chunk
            yield chunk

    return Dataset(source, length=data.length, description=data.description, notes=[])


# ----- scoring, batch by batch --------------------------------------------------------------------------------
# A sample whose outputs are not finite counts as a failure where the metric has a worst value (wrong class,
# disagreement, cosine 0, IoU 0) and is left out where it has none (errors, differences, SQNR), with a warning.

@dataclass
class _Scorer:
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
            self._append({"nll": np.where(_failed_rows(y), np.nan, nll)})
        else:
            self._check_labels(labels)
        self.samples += len(y)
        failed = _failed_rows(y)
        self.counts["inputs"] += count_nonfinite(batch)
        self.counts["outputs"] += int((~np.isfinite(y)).sum()) if y.dtype.kind == "f" else 0
        self.counts["samples_with_nonfinite_outputs"] += int(failed.sum())
        if labels is not None:
            self.task = self.task or _labelled_task(y, labels, self.warnings)
            cols = _classify(y, labels, failed) if self.task == "classify" else _regress(y, labels, failed)
            self._append(cols)
        if r is not None:
            if r.shape != y.shape:
                raise ModelError(f"the reference's output has shape {r.shape}, the model's {y.shape}",
                                 "give a reference with the same outputs (the FP32 model this one came from)")
            self.counts["reference_outputs"] += int((~np.isfinite(r)).sum()) if r.dtype.kind == "f" else 0
            self._append(_fidelity(y, r, failed | _failed_rows(r)), prefix="fidelity:")

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
            metrics["perplexity"] = _contain(Estimate(math.exp(nll.value), (math.exp(nll.ci95[0]), math.exp(nll.ci95[1]))))
            metrics["nll"] = nll
            per_sample["nll"] = cols["nll"]
        elif self.labelled:
            predictions = cols.get("prediction")
            found = _classify_metrics(cols) if self.task == "classify" else _regress_metrics(cols)
            metrics.update(found)
            per_sample.update(_kept(cols, found))
        if self.has_reference:
            fid = {k.removeprefix("fidelity:"): v for k, v in cols.items() if k.startswith("fidelity:")}
            found = _fidelity_metrics(fid)
            metrics.update(found)
            per_sample.update(_kept(fid, found))
            predictions = predictions if predictions is not None else fid.get("prediction")
        primary = _primary(metrics, self.task if self.labelled or self.task == "lm" else "fidelity")
        nonfinite = dict(self.counts)
        warnings = [*notes, *self.warnings, *_nonfinite_warnings(nonfinite, n, cols)]
        return ValidationRecord(model, data, output, primary, n, metrics, per_sample, fingerprint, predictions, reference,
                                nonfinite, warnings)


def _kept(cols: dict[str, np.ndarray], metrics: dict[str, Estimate]) -> dict[str, np.ndarray]:
    """The per-sample arrays behind the reported metrics (squared errors stand behind rmse)."""
    names = {METRICS[m].samples for m in metrics} | ({"sq_error"} if "rmse" in metrics else set())
    return {k: v for k, v in cols.items() if k in names}


def _failed_rows(y: np.ndarray) -> np.ndarray:
    if y.dtype.kind != "f":
        return np.zeros(len(y), bool)
    return ~np.isfinite(y.reshape(len(y), -1)).all(axis=1)


def _class_scores(y: np.ndarray) -> np.ndarray | None:
    """(n, C) scores when the output is one score vector per sample with C > 1 classes; None otherwise."""
    dims = [d for d in y.shape[1:] if d != 1]
    if y.dtype.kind == "f" and len(dims) == 1 and dims[0] > 1:
        return y.reshape(len(y), dims[0])
    return None


def _predictions(y: np.ndarray, failed: np.ndarray) -> np.ndarray | None:
    """Predicted class per sample (-1 for failed samples): argmax of class scores, or an integer label output."""
    scores = _class_scores(y)
    if scores is not None:
        return np.where(failed, -1, scores.argmax(axis=1))
    if y.dtype.kind in "iu" and y.size == len(y):
        return y.reshape(len(y)).astype(np.int64)
    return None


def _labelled_task(y: np.ndarray, labels: np.ndarray, warnings: list[str]) -> str:
    one_per_sample = labels.size == len(labels)
    if _predictions(y, _failed_rows(y)) is None or not one_per_sample:
        return "regress"
    if labels.dtype.kind in "iub":
        return "classify"
    if labels.dtype.kind == "f" and np.all(np.mod(labels, 1) == 0):
        warnings.append("the labels are floats with whole values: read as class ids (save them as integers to be explicit)")
        return "classify"
    return "regress"


def _classify(y: np.ndarray, labels: np.ndarray, failed: np.ndarray) -> dict[str, np.ndarray]:
    pred = _predictions(y, failed)
    labels = labels.reshape(len(labels)).astype(np.int64)
    scores = _class_scores(y)
    classes = scores.shape[1] if scores is not None else None
    if classes is not None and (labels.min() < 0 or labels.max() >= classes):
        raise DataError(f"labels run from {labels.min()} to {labels.max()} but the model scores {classes} classes",
                        f"give class ids 0..{classes - 1} in the model's class order")
    cols = {"prediction": pred, "correct": pred == labels}
    if classes is not None and classes > 5:
        top5 = np.argpartition(-scores, 4, axis=1)[:, :5]
        cols["correct_top5"] = (top5 == labels[:, None]).any(axis=1) & ~failed
    return cols


def _regress(y: np.ndarray, labels: np.ndarray, failed: np.ndarray) -> dict[str, np.ndarray]:
    n = len(y)
    pred, target = y.reshape(n, -1).astype(np.float64), labels.reshape(n, -1).astype(np.float64)
    if pred.shape != target.shape:
        raise DataError(f"the labels hold {target.shape[1]} value(s) per sample but the model output holds {pred.shape[1]}",
                        "give class ids (integers) for a classifier, or one target per output value for regression")
    err = pred - target
    bad = failed | ~np.isfinite(target).all(axis=1)
    return {"abs_error": np.where(bad, np.nan, np.abs(err).mean(axis=1)),
            "sq_error": np.where(bad, np.nan, (err ** 2).mean(axis=1))}


def _fidelity(y: np.ndarray, r: np.ndarray, failed: np.ndarray) -> dict[str, np.ndarray]:
    cols: dict[str, np.ndarray] = {}
    pred, ref_pred = _predictions(y, _failed_rows(y)), _predictions(r, _failed_rows(r))
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


# ----- metrics from the columns -------------------------------------------------------------------------------

def _classify_metrics(cols: dict[str, np.ndarray]) -> dict[str, Estimate]:
    metrics = {"top1": proportion(cols["correct"])}
    if "correct_top5" in cols:
        metrics["top5"] = proportion(cols["correct_top5"])
    return metrics


def _regress_metrics(cols: dict[str, np.ndarray]) -> dict[str, Estimate]:
    sq = _finite(cols["sq_error"])
    rmse = Estimate(math.sqrt(sq.mean()) if len(sq) else math.nan, bootstrap_ci(lambda s: np.sqrt(s.mean(axis=1)), sq))
    return {"mae": mean_estimate(cols["abs_error"]), "rmse": _contain(rmse)}


def _fidelity_metrics(cols: dict[str, np.ndarray]) -> dict[str, Estimate]:
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


# ----- statistics ---------------------------------------------------------------------------------------------

def proportion(flags: np.ndarray) -> Estimate:
    """Percentage of true flags with its Wilson 95% interval (sound near 0% and 100%, unlike the normal one).

    >>> est = proportion(np.array([True] * 90 + [False] * 10))
    >>> est.value, [round(v, 1) for v in est.ci95]
    (90.0, [82.6, 94.5])
    """
    n, k = len(flags), int(np.sum(flags))
    if n == 0:
        return Estimate(math.nan, (math.nan, math.nan))
    p = k / n
    denom = 1 + Z95 ** 2 / n
    centre = (p + Z95 ** 2 / (2 * n)) / denom
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95 ** 2 / (4 * n * n)) / denom
    return _contain(Estimate(100 * p, (100 * (centre - half), 100 * (centre + half))))


def mean_estimate(values: np.ndarray) -> Estimate:
    """Mean of the finite values with a percentile-bootstrap 95% interval (fixed seed: deterministic).

    >>> mean_estimate(np.array([1.0, 2.0, 3.0])).value
    2.0
    """
    x = _finite(values)
    value = float(x.mean()) if len(x) else math.nan
    return _contain(Estimate(value, bootstrap_ci(lambda s: s.mean(axis=1), x)))


def sqnr_estimate(signal: np.ndarray, noise: np.ndarray) -> Estimate:
    """10·log10(Σ signal energy / Σ noise energy) over finite samples; infinite for identical outputs.

    The bootstrap runs on the noise-to-signal ratio, which stays finite when some resamples carry no noise.
    """
    keep = np.isfinite(signal) & np.isfinite(noise)
    s, e = signal[keep], noise[keep]
    if not len(s) or s.sum() <= 0:
        return Estimate(math.nan, (math.nan, math.nan))
    lo, hi = bootstrap_ci(lambda ss, ee: ee.sum(axis=1) / np.maximum(ss.sum(axis=1), np.finfo(float).tiny), s, e)
    return _contain(Estimate(_db(e.sum() / s.sum()), (_db(hi), _db(lo))))


def _db(noise_to_signal: float) -> float:
    return math.inf if noise_to_signal <= 0 else -10 * math.log10(noise_to_signal)


def bootstrap_ci(stat: Callable[..., np.ndarray], *arrays: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[float, float]:
    """Percentile-bootstrap 95% interval of `stat`, resampling samples (rows shared by all arrays: paired).

    `stat` maps arrays of shape (resamples, n) to (resamples,). Resamples go in blocks to bound memory.

    >>> bootstrap_ci(lambda s: s.mean(axis=1), np.zeros(10))
    (0.0, 0.0)
    """
    n = len(arrays[0]) if arrays else 0
    if n == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    block = max(1, 4_000_000 // n)
    stats = []
    for start in range(0, resamples, block):
        idx = rng.integers(0, n, size=(min(block, resamples - start), n))
        stats.append(stat(*(a[idx] for a in arrays)))
    lo, hi = np.percentile(np.concatenate(stats), [2.5, 97.5])
    return float(lo), float(hi)


def _contain(est: Estimate) -> Estimate:
    """Widen an interval to hold its own estimate: nearly constant values can miss it by a rounding error."""
    lo, hi = est.ci95
    if not (math.isfinite(est.value) and math.isfinite(lo) and math.isfinite(hi)):
        return est
    return Estimate(float(est.value), (min(lo, est.value), max(hi, est.value)))


def _finite(values: np.ndarray) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    return x[np.isfinite(x)]


def _num(v: Any) -> Any:
    """JSON-safe number: bools as 0/1, NaN/inf as null."""
    if isinstance(v, (bool, np.bool_)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(v) else None
    return v


# ----- read and compare -----------------------------------------------------------------------------------------

_REQUIRED = ("metric", "value", "samples", "per_sample", "data_fingerprint")


def read_validation(path: Path | str) -> dict:
    """Read a validation record written by `edgeq validate`; UserError with a fix for anything else.

    >>> read_validation("fp32.json")["metric"]        # doctest: +SKIP
    'top1'
    """
    path = Path(path)
    rerun = f"write it with `edgeq validate MODEL --data DATA -o {path}`"
    if not path.is_file():
        raise UserError(f"validation results not found: {path}", rerun if not path.exists() else "give the path of a .json file")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc})".replace("\n", " "), rerun) from None
    if isinstance(record, dict) and "verdict" in record:
        raise UserError(f"{path} is a comparison, not a validation record", "give the JSON files that `edgeq validate` wrote")
    missing = [k for k in _REQUIRED if not isinstance(record, dict) or k not in record]
    if missing:
        raise UserError(f"{path} is not an edgeq validation record (missing {', '.join(missing)})", rerun)
    info = METRICS.get(record["metric"])
    values = record["per_sample"].get(info.samples) if info and isinstance(record["per_sample"], dict) else None
    if not isinstance(values, list) or len(values) != record["samples"]:
        raise UserError(f"{path} has no per-sample results for its metric {record['metric']!r}", f"re-run validation: {rerun}")
    return record


@dataclass
class Comparison:
    """Base against candidate on the same samples: the drop, its paired interval, and the verdict."""

    metric: str
    unit: str
    higher_is_better: bool
    samples: int
    base: float
    candidate: float
    base_ci95: tuple[float, float]
    candidate_ci95: tuple[float, float]
    base_model: str
    candidate_model: str
    drop: float
    drop_ci95: tuple[float, float]
    within_noise: bool
    agreement: Estimate | None
    verdict: str
    reasons: list[str]
    rule: DecisionRule

    def to_dict(self) -> dict:
        return {
            "metric": self.metric, "unit": self.unit, "higher_is_better": self.higher_is_better, "samples": self.samples,
            "base": _num(self.base), "candidate": _num(self.candidate),
            "base_ci95": [_num(v) for v in self.base_ci95], "candidate_ci95": [_num(v) for v in self.candidate_ci95],
            "base_model": self.base_model, "candidate_model": self.candidate_model,
            "drop": _num(self.drop), "drop_ci95": [_num(v) for v in self.drop_ci95], "within_noise": self.within_noise,
            "top1_agreement": None if self.agreement is None else self.agreement.to_dict(),
            "verdict": self.verdict, "reasons": list(self.reasons),
            "rule": {"ship_below": self.rule.ship_below, "qat_up_to": self.rule.qat_up_to},
        }


def compare(base: dict | ValidationRecord, candidate: dict | ValidationRecord, rule: DecisionRule | None = None) -> Comparison:
    """Measure the candidate's drop against the base on the same samples (paired) and decide.

    The drop is in points of the metric and positive when the candidate is worse (percentage points for accuracy
    and agreement, 0.01 for cosine, the targets' units for MAE).

    >>> c = compare(read_validation("fp32.json"), read_validation("int8.json"))   # doctest: +SKIP
    >>> c.verdict, round(c.drop, 2), c.within_noise                               # doctest: +SKIP
    ('ship', 0.5, True)
    """
    rule = rule or DecisionRule()
    base, cand = _as_dict(base), _as_dict(candidate)
    _check_comparable(base, cand)
    info = METRICS[base["metric"]]
    diff = _paired_drop(base, cand, info)
    drop = round(float(diff.mean()), 9) + 0.0 if len(diff) else math.nan  # no float dust (or -0.0) at a threshold
    drop_ci = _contain(Estimate(drop, bootstrap_ci(lambda d: d.mean(axis=1), diff))).ci95
    if base["metric"] == "perplexity":  # paired nll difference → relative perplexity increase in percent
        drop, drop_ci = _relative_ppl(drop), (_relative_ppl(drop_ci[0]), _relative_ppl(drop_ci[1]))
    within = bool(drop_ci[0] <= 0 <= drop_ci[1])
    agreement = _agreement(base, cand)
    verdict = decide(drop, drop_ci, rule, samples=len(diff))
    reasons = [*_context(base, cand, info, len(diff), agreement), *verdict.reasons]
    return Comparison(base["metric"], _unit(base["metric"]), info.higher_is_better, int(base["samples"]),
                      _float(base["value"]), _float(cand["value"]), _pair(base.get("ci95")), _pair(cand.get("ci95")),
                      str(base.get("model")), str(cand.get("model")), drop, drop_ci, within, agreement,
                      verdict.verdict, reasons, rule)


def _relative_ppl(nll_increase: float) -> float:
    return round(100 * math.expm1(nll_increase), 9) + 0.0 if math.isfinite(nll_increase) else nll_increase


def _as_dict(record: dict | ValidationRecord) -> dict:
    return record.to_dict() if isinstance(record, ValidationRecord) else record


def _check_comparable(base: dict, cand: dict) -> None:
    fix = "validate both models on the same data (and the same --reference) and compare those results"
    if base["metric"] != cand["metric"]:
        raise UserError(f"the base measures {base['metric']} and the candidate {cand['metric']}", fix)
    if base["metric"] not in METRICS or METRICS[base["metric"]].samples is None:
        raise UserError(f"cannot compare on metric {base['metric']!r}", "validate with a current edgeq and compare again")
    if base["samples"] != cand["samples"]:
        raise UserError(f"the base was validated on {base['samples']} samples and the candidate on {cand['samples']}", fix)
    if base["data_fingerprint"] != cand["data_fingerprint"]:
        raise UserError("the base and the candidate were validated on different data (their data fingerprints differ)", fix)


def _paired_drop(base: dict, cand: dict, info: MetricInfo) -> np.ndarray:
    """Per-sample drop in points (positive = worse), over samples finite on both sides."""
    b = np.asarray(base["per_sample"][info.samples], dtype=np.float64)
    c = np.asarray(cand["per_sample"][info.samples], dtype=np.float64)
    sign = 1.0 if info.higher_is_better else -1.0
    d = sign * (b - c) * info.scale * info.points
    return d[np.isfinite(d)]


def _agreement(base: dict, cand: dict) -> Estimate | None:
    p, q = base.get("predictions"), cand.get("predictions")
    if not p or not q or len(p) != len(q):
        return None
    return proportion(np.asarray(p) == np.asarray(q))


def _context(base: dict, cand: dict, info: MetricInfo, paired: int, agreement: Estimate | None) -> list[str]:
    metric, n = base["metric"], int(base["samples"])
    lines = [f"{metric}: base {_fmt(metric, _float(base['value']))}, candidate {_fmt(metric, _float(cand['value']))} "
             f"on the same {n} samples"]
    if paired < n:
        lines.append(f"{n - paired} samples with non-finite results on either side are left out of the paired drop")
    if agreement is not None:
        lines.append(f"the models pick the same top-1 class on {agreement.value:.2f}% of samples")
    if metric == "perplexity":
        lines.append("the perplexity drop is its relative increase in percent, paired window by window")
    elif info.points != 1:
        lines.append(f"{metric} drops are counted in points of {1 / info.points:g}")
    elif info.unit != "%":
        lines.append(f"the {metric} drop is in the targets' units: set --ship-below/--qat-up-to to what your application tolerates")
    return lines


def _unit(metric: str) -> str:
    if metric == "perplexity":
        return "% relative increase"
    info = METRICS[metric]
    if info.unit == "%":
        return "percentage points"
    return f"points of {1 / info.points:g} {metric}" if info.points != 1 else f"{metric} units"


def _float(v: Any) -> float:
    return math.nan if v is None else float(v)


def _pair(v: Any) -> tuple[float, float]:
    return (_float(v[0]), _float(v[1])) if isinstance(v, (list, tuple)) and len(v) == 2 else (math.nan, math.nan)


# ----- rendering ------------------------------------------------------------------------------------------------

VERDICT_STYLE = {"ship": "bold green", "try-qat": "bold yellow", "stay-fp16": "bold red"}


def print_validation(console: Any, record: ValidationRecord) -> None:
    """A rich table of every metric with its 95% interval, then the warnings."""
    from rich.table import Table

    title = f"{record.model} on {record.data} ({record.samples} samples)"
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("95% interval", justify="right")
    for name, est in record.metrics.items():
        label = f"[bold]{name}[/]" if name == record.metric else name
        table.add_row(label, _fmt(name, est.value), f"{_fmt(name, est.ci95[0])} – {_fmt(name, est.ci95[1])}")
    console.print(table)
    if record.reference:
        console.print(f"fidelity measured against {record.reference}", highlight=False)
    for warning in record.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)


def print_comparison(console: Any, comparison: Comparison) -> None:
    """A rich table of base, candidate and drop, then the coloured verdict and its reasons."""
    from rich.table import Table

    c, m = comparison, comparison.metric
    table = Table(title=f"{m}: {c.base_model} → {c.candidate_model} ({c.samples} samples)", title_justify="left")
    for col in ("", "value", "95% interval"):
        table.add_column(col, justify="right" if col else "left")
    table.add_row("base", _fmt(m, c.base), f"{_fmt(m, c.base_ci95[0])} – {_fmt(m, c.base_ci95[1])}")
    table.add_row("candidate", _fmt(m, c.candidate), f"{_fmt(m, c.candidate_ci95[0])} – {_fmt(m, c.candidate_ci95[1])}")
    table.add_row(f"drop ({c.unit}, paired)", f"{c.drop:+.2f}", f"{c.drop_ci95[0]:+.2f} – {c.drop_ci95[1]:+.2f}")
    if c.agreement is not None:
        table.add_row("top-1 agreement", _fmt("top1_agreement", c.agreement.value),
                      f"{_fmt('top1_agreement', c.agreement.ci95[0])} – {_fmt('top1_agreement', c.agreement.ci95[1])}")
    console.print(table)
    style = VERDICT_STYLE.get(c.verdict, "bold")
    console.print(f"verdict: [{style}]{c.verdict}[/]" + ("  (within noise)" if c.within_noise else ""), highlight=False)
    for reason in c.reasons:
        console.print(f"  • {reason}", highlight=False)


def _fmt(metric: str, value: float | None) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "∞" if value > 0 else "-∞"
    unit = METRICS[metric].unit if metric in METRICS else ""
    if unit == "%":
        return f"{value:.2f}%"
    if unit == "dB":
        return f"{value:.1f} dB"
    if METRICS.get(metric, MetricInfo(None)).points != 1:
        return f"{value:.5f}"
    return f"{value:.4g}"
