"""`validate`: stream the data once through the model (and its reference) and score every batch."""
from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.data import Batch, Dataset, batches, conform, fixed_batch_size, open_data
from edgeq.errors import ConfigError
from edgeq.evaluate.record import ValidationRecord
from edgeq.evaluate.scoring import Scorer
from edgeq.evaluate.tasks.lm import causal_lm_input
from edgeq.model import Model, TensorSpec, load, run_session
from edgeq.progress import track


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
    lm_input = causal_lm_input(subject) if ref is None and out_name == subject.outputs[0].name else None
    scorer = Scorer(has_reference=ref is not None, lm_input=lm_input)
    session = subject.session()
    runs = partial(_run_count, data, subject.inputs, batch_size)  # counted only when a progress bar is drawn
    for batch in track(batches(stream, subject.inputs, batch_size, refuse_nonfinite=False), "validating", total=runs):
        y = _run(session, out_name, batch.inputs, subject_label, data.description)
        scorer.add(batch, y, ref.run(batch, data.description) if ref else None)
    return scorer.record(subject_label, data.description, out_name, "sha256:" + digest.hexdigest(),
                         reference=ref.label if ref else None, notes=[*data.notes, *stream.notes])


def _run_count(data: Dataset, specs: list[TensorSpec], batch_size: int) -> int | None:
    """How many runs validation makes (None when the data cannot say how many samples it holds)."""
    samples = data.samples(specs)
    return None if samples is None else -(-samples // max(fixed_batch_size(specs) or batch_size, 1))


def _load(model: Path | str | Model) -> tuple[Model, str]:
    # An in-memory Model (e.g. a fresh QuantizedModel) may carry its source's path: name it, do not claim the file.
    if isinstance(model, Model):
        return model, f"<in memory: {model.name}>"
    return load(model), str(model)


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
