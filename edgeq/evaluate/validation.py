"""`validate`: stream the data once through the model (and its reference) and score every batch."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeq.calibrate import Feeds
from edgeq.data import Batch, Dataset, batches, conform, fixed_batch_size, open_data
from edgeq.errors import ConfigError
from edgeq.evaluate.fingerprint import Fingerprint, combined
from edgeq.evaluate.outputs import OutputFidelity
from edgeq.evaluate.record import ValidationRecord
from edgeq.evaluate.scoring import Scorer
from edgeq.evaluate.tasks.lm import causal_lm_input
from edgeq import runtimes
from edgeq.data.windows import sample_first
from edgeq.executors.worker import Opened
from edgeq.model import Model, TensorSpec, run_session
from edgeq.runtimes import Runnable
from edgeq.progress import track

if TYPE_CHECKING:
    from edgeq.executors import Executor


def validate(model: Path | str | Model, data: Dataset | Path | str, reference: Path | str | Model | None = None,
             batch_size: int = 32, output: str | None = None, outputs: Sequence[str] | None = None, *,
             executor: "Executor | str | None" = None, workers: int | None = None) -> ValidationRecord:
    """Run `model` on `data` with ONNX Runtime and measure it.

    Labels that are class ids give top-1 (and top-5) accuracy in percent; float labels give MAE and RMSE, both on the
    first scored output. A causal language model (one integer input of token ids, logits [batch, sequence,
    vocabulary] out) on unlabelled token windows and without `reference` gives perplexity, each window a sample.
    Otherwise without labels, `reference` is required and the metric is fidelity to it, on every output (or those
    named in `outputs`): top-1 agreement for class outputs, cosine and SQNR per channel group for embeddings and
    other tensors (and, for outputs in [0, 1] such as detection probability maps, mean absolute difference and IoU
    at 0.3); the record's metric is the worst output's (`edgeq/evaluate/outputs.py`). `output` (one name) is the
    older spelling of `outputs=[name]`. A `Feeds` dataset gives whole feeds, each one run and one sample. NaN/Inf in
    inputs or outputs is counted and reported, never refused.

    `executor` ("local", "ray", or an `edgeq.executors` executor; `workers` of them) splits the data into shards
    scored by its workers and merged per sample: the figures, intervals and fingerprint are those of one process
    (`edgeq/evaluate/shards.py`). Without one, or for models in memory, validation runs in this process.

    >>> val = edgeq.Dataset.from_npz("val.npz")                                       # doctest: +SKIP
    >>> validate("model_int8.onnx", val, reference="model.onnx").metrics["cosine"]    # doctest: +SKIP
    Estimate(value=0.9991, ci95=(0.9988, 0.9993))
    >>> validate("int8.onnx", val, reference="model.onnx", outputs=["boxes"]).worst    # doctest: +SKIP
    {'output': 'boxes', 'metric': 'cosine', 'value': 0.62, 'group': 1, 'channels': '4-7', 'loss_points': 38.0}
    """
    data = open_data(data) if isinstance(data, (str, Path)) else data
    requested = list(outputs or ([output] if output else []))
    if executor is not None and not isinstance(model, Model) and not isinstance(reference, Model):
        from edgeq.evaluate.shards import validate_many

        return validate_many([str(model)], data, None if reference is None else str(reference), batch_size, requested,
                             executor, workers)[0]
    subject, label = _load(model)
    ref = _Reference.open(reference) if reference is not None else None
    return finish([score(Opened(subject), label, ref, data, requested, batch_size)])


@dataclass
class Partial:
    """One stretch of the data scored (all of it, or one shard), merged with the others by `finish`."""

    scorer: Scorer
    blocks: dict[int, bytes]   # the fingerprint's block digests
    notes: list[str]
    model: str
    data: str
    output: str
    reference: str | None


def score(subject: Opened, label: str, ref: "_Reference | None", data: Dataset, requested: list[str], batch_size: int,
          start: int = 0, first: Dataset | None = None) -> Partial:
    """Stream `data` (samples from `start` on) through the model and its reference and score every batch. A later
    shard gets the data's `first` batch: output kinds and channel groups are fixed on it, as in one process."""
    model = subject.model
    follow_layout(model, data, ref.model if ref else None)
    names = _output_names(model, requested)
    if ref is not None:
        ref.match(model, names)
    fingerprint = Fingerprint(start)
    stream = _fingerprinted(data, fingerprint, model.inputs)
    # Perplexity needs no reference; with one, the metric is fidelity to it, as for any model.
    lm_input = causal_lm_input(model) if ref is None and names[0] == model.outputs[0].name else None
    specs = {o.name: o for o in model.outputs}
    softmax = model.softmax_outputs()
    scorer = Scorer(has_reference=ref is not None, lm_input=lm_input, named=tuple(requested),
                    outputs=[OutputFidelity(n, specs[n], n in softmax) for n in names])
    session = subject.session()
    run_names = names if ref is not None else names[:1]  # labels and perplexity read the first output only
    if first is not None and ref is not None:
        batch = next(_runs(first, model, batch_size))
        scorer.fit(batch, _run(session, run_names, batch, label, data.description), ref.run(batch, data.description))
    runs = partial(_run_count, data, model.inputs, batch_size)  # counted only when a progress bar is drawn
    for batch in track(_runs(stream, model, batch_size), "validating", total=runs):
        ys = _run(session, run_names, batch, label, data.description)
        scorer.add(batch, ys, ref.run(batch, data.description) if ref else None)
    return Partial(scorer, fingerprint.finish(), [*data.notes, *stream.notes, *layout_notes(model, ref)], label,
                   data.description, names[0], ref.label if ref else None)


def finish(parts: list[Partial]) -> ValidationRecord:
    """The record of the parts, in data order: per-sample columns joined, counts summed, notes once each."""
    first = parts[0]
    scorer = first.scorer.merged([p.scorer for p in parts[1:]])
    notes = list(dict.fromkeys(n for p in parts for n in p.notes))
    return scorer.record(first.model, first.data, first.output, combined([p.blocks for p in parts]),
                         reference=first.reference, notes=notes)


def _runs(stream: Dataset, model: Model, batch_size: int) -> Iterator[Batch]:
    """Re-batched samples, or a `Feeds` dataset's whole feeds (each one run, one sample: Silero's state has its
    sample axis second, its `sr` none), cast to the model's dtypes; NaN is counted by the scorer, not refused."""
    if not isinstance(stream, Feeds):
        yield from batches(stream, model.inputs, batch_size, refuse_nonfinite=False)
        return
    for _, chunk in stream.checked([spec.name for spec in model.inputs]):
        labels = None if chunk.labels is None else np.atleast_1d(chunk.labels)[:1]
        yield Batch({s.name: np.ascontiguousarray(chunk.inputs[s.name], dtype=s.dtype) for s in model.inputs}, labels, unbatched=True)


def _run_count(data: Dataset, specs: list[TensorSpec], batch_size: int) -> int | None:
    """How many runs validation makes (None when the data cannot say how many samples it holds)."""
    samples = data.samples(specs)
    return None if samples is None else -(-samples // max(fixed_batch_size(specs) or batch_size, 1))


def _load(model: Path | str | Model) -> tuple[Runnable, str]:
    # An in-memory Model (e.g. a fresh QuantizedModel) may carry its source's path: name it, do not claim the file.
    if isinstance(model, Model):
        return model, f"<in memory: {model.name}>"
    return runtimes.load(model), str(model)


def follow_layout(subject: Runnable, data: Dataset, reference: Runnable | None) -> None:
    """A runtime whose layout may differ from the data's (LiteRT's NHWC) takes the reference's layout, or, without
    one, the data's (its first chunk's shapes); other models have one layout only."""
    for model, like in ((subject, reference), (reference, subject)):
        follow = getattr(model, "follow", None)
        if follow is None:
            continue
        if like is not None and not hasattr(like, "follow"):
            follow({s.name: s.shape for s in like.inputs}, {s.name: s.shape for s in like.outputs})
        else:
            first = next(data.chunks(), None)
            if first is not None and not isinstance(data, Feeds):
                follow({k: (None, *np.shape(v)[1:]) for k, v in first.inputs.items()})


def layout_notes(subject: Runnable, ref: "_Reference | None") -> list[str]:
    """What the runtimes adapted (LiteRT: quantized I/O, NHWC inputs), once each."""
    notes = [*getattr(subject, "notes", [])]
    if ref is not None:
        notes += [f"reference {n}" for n in getattr(ref.model, "notes", [])]
    return notes


def _output_names(model: Model, requested: list[str]) -> list[str]:
    names = [o.name for o in model.outputs]
    unknown = [n for n in requested if n not in names]
    if unknown:
        raise ConfigError(f"the model has no output {', '.join(map(repr, unknown))}", f"name outputs among: {', '.join(names)}")
    return list(dict.fromkeys(requested)) or names


def _run(session: Any, outputs: list[str], batch: Batch, label: str, where: str) -> dict[str, np.ndarray]:
    values = run_session(session, outputs, batch.inputs, label, where)
    # a whole feed is one sample: its outputs get the sample axis the scoring expects
    return {n: np.asarray(v)[None] if batch.unbatched else np.asarray(v) for n, v in zip(outputs, values)}


@dataclass
class _Reference:
    """The reference model run on the same batches (cast to its own input dtypes)."""

    model: Runnable
    label: str
    outputs: dict[str, str] = field(default_factory=dict)  # the subject's output name -> the reference's
    session: Any = None
    opened: Opened | None = None   # in a worker: the model kept open between tasks, with its session

    @classmethod
    def open(cls, reference: Path | str | Model) -> "_Reference":
        model, label = _load(reference)
        return cls(model, label)

    def match(self, subject: Runnable, names: list[str]) -> None:
        """Pair the scored outputs with the reference's and open its session (after the layouts are settled)."""
        theirs = [o.name for o in self.model.outputs]
        ours = [o.name for o in subject.outputs]
        # Quantized models keep their outputs' names; a renamed one (a converted one) is matched by position.
        self.outputs = {n: n if n in theirs else theirs[min(ours.index(n), len(theirs) - 1)] for n in names}
        self.session = self.opened.session() if self.opened is not None else self.model.session()

    def run(self, batch: Batch, where: str) -> dict[str, np.ndarray]:
        if batch.unbatched:
            feed = {s.name: np.ascontiguousarray(batch.inputs[s.name], dtype=s.dtype) for s in self.model.inputs}
        else:
            feed = conform(Batch(batch.inputs, batch.labels), self.model.inputs, f"{where} (reference)").inputs
        values = _run(self.session, list(self.outputs.values()), Batch(feed, unbatched=batch.unbatched), self.label, where)
        return {ours: values[theirs] for ours, theirs in self.outputs.items()}


def _fingerprinted(data: Dataset, fingerprint: Fingerprint, specs: list[TensorSpec]) -> Dataset:
    """The same data, hashed into `fingerprint` chunk by chunk as it streams by (before any cast). The notes list
    is fresh so repeated runs do not pile up notes."""
    def source() -> Iterator[Batch]:
        for chunk in data.chunks():
            if isinstance(data, Feeds):   # a whole feed is one sample
                rows = {k: np.asarray(v)[None] for k, v in chunk.inputs.items()}
                fingerprint.add(rows if chunk.labels is None else {**rows, "labels": np.atleast_1d(chunk.labels)[:1]})
            else:
                fingerprint.add(sample_first(chunk, specs))
            yield chunk

    return type(data)(source, length=data.length, description=data.description, notes=[])
