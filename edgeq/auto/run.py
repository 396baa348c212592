"""`auto` end to end: checks the options, loads the inputs, runs the search in a staged output folder (a failure or
an interrupt leaves the folder as it was), measures every candidate, writes the chosen model, the candidates and the
report."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeq.analyze import analyze
from edgeq.auto.candidates import bench_shapes, first_batch, measure
from edgeq.auto.qat import QatInputs, QatSource, load_qat, qat_command, qat_step
from edgeq.auto.search import Search, choose, fallback_search, float_candidates, pick_calibration, refine_recipe, refine_target
from edgeq.auto.verdict import assemble_report, assemble_verdict
from edgeq.data import Dataset, open_data
from edgeq.errors import ConfigError
from edgeq.evaluate.shards import data_source
from edgeq.executors import Executor, as_executor
from edgeq.model import Model, load, model_files
from edgeq.progress import Step, step
from edgeq.quantize.config import Int8Static

METHODS = ("minmax", "percentile", "mse")


def fidelity_reference(source: Model, labels: np.ndarray | None) -> bool:
    """Whether auto measures fidelity to the FP32 model: the validation data has no labels and the model is no causal
    language model (those are scored by perplexity without labels)."""
    from edgeq.evaluate.tasks.lm import causal_lm_input

    return labels is None and causal_lm_input(source) is None


def auto(model: Model | str | Path, calib: Dataset | str | Path, val: Dataset | str | Path, budget: float = 1.0,
         output: str | Path = "auto-out", *, target: str = "onnxruntime-cpu", executor: Executor | str | None = None,
         workers: int | None = None,
         config: Int8Static | None = None, methods: tuple[str, ...] = METHODS, force: bool = False,
         bench_runs: int = 20, bench_batch: int = 64, threads: int = 1, select: str = "fidelity",
         max_float_layers: int | None = None, refine: bool = True, qat: QatSource | None = None, console: Any = None,
         labels: str | Path | None = None) -> dict:
    """Meet `budget` (points of the validation metric: top-1 % with labels, fidelity to MODEL without) with the
    fastest model, FP32 and FP16 included; write OUTDIR.

    Validation data without labels is scored by fidelity to MODEL itself (the natural reference), as `validate
    --reference` does: the worst output's top-1 agreement (%), or its cosine for embeddings and other tensors; the
    budget is then in points of it: percentage points of agreement, or 0.01 of cosine (budget 1: cosine >= 0.99).
    FP32 is a candidate like the others: when no candidate within the budget is faster, FP32 is chosen and written.

    Candidates are validated through `executor` ("local", the default: a process pool of `workers`, one per core;
    "ray"; or an `edgeq.executors` executor the caller closes), split by data shard (`edgeq/evaluate/shards.py`).

    `max_float_layers` caps the layers the search may return to float (0: a fully INT8 model or nothing);
    `refine` False skips the recipe refinement (one evaluation less); `qat` lets QAT run when nothing else meets.

    A detector (its head recognised by `validate --task detect`'s rules) is judged on its boxes after decoding and
    NMS: mAP@0.5 on ground-truth boxes given as `labels` (an .npz or COCO .json, as `validate --labels`), or without
    them box F1 against the FP32 model; the budget is in points of that (0.01 of mAP or F1)."""
    from edgeq.report import ReportFolder

    _check_options(select, budget, max_float_layers)
    started = time.perf_counter()
    say = console.print if console is not None else (lambda *a, **k: None)
    source = load(model) if isinstance(model, (str, Path)) else model
    calib_spec = calib
    calib = open_data(calib) if isinstance(calib, (str, Path)) else calib
    val_spec = val
    val = open_data(val) if isinstance(val, (str, Path)) else val
    qat_inputs = load_qat(qat, source) if qat is not None else None   # before any work: a wrong model fails fast
    head = _detection_task(source, labels)
    folder = ReportFolder(Path(output), force=force, staged=True,
                          protect=(*model_files(source.path), *(Path(d) for d in (calib_spec, val_spec, labels) if isinstance(d, (str, Path)))))
    try:
        with step("auto") as phase:
            report = _run(source, calib, val, val_spec, budget, output, folder, target, executor, workers, config, methods, bench_runs,
                          bench_batch, threads, select, max_float_layers, refine, qat_inputs, _narrated(say, phase), started,
                          head, labels)
    except BaseException:
        folder.discard()  # a failure or an interrupt leaves the output folder as it was, or absent
        raise
    folder.commit()
    return report


def _run(source: Model, calib: Dataset, val: Dataset, val_spec: Dataset | str | Path, budget: float, output: str | Path,
         folder: Any, target: str, executor: Executor | str | None, workers: int | None, config: Int8Static | None,
         methods: tuple[str, ...],
         bench_runs: int, bench_batch: int, threads: int, select: str, max_float_layers: int | None, refine: bool,
         qat_inputs: QatInputs | None, say: Any, started: float, head: str | None = None,
         detection_labels: str | Path | None = None) -> dict:
    from edgeq.decide import DecisionRule
    from edgeq.report.auto import render_auto_html

    config = config or Int8Static()
    probe = first_batch(val, source)
    labels = probe.labels
    rule = DecisionRule(ship_below=max(budget, 1e-9), qat_up_to=max(budget, 3.0))
    reference = None
    if head is not None:
        say(f"a detector ({head} head): judged on its boxes after decoding and NMS, "
            + ("mAP@0.5 on the ground-truth boxes" if detection_labels is not None else "box F1 against the FP32 model"))
    if (head is not None and detection_labels is None) or (head is None and fidelity_reference(source, labels)):
        from edgeq.model import save  # decided before any calibration: no labels, FP32 is the reference

        reference = str(save(source.proto, folder.path("candidates/fp32.onnx"), force=True))
        if head is None:
            say("the validation data has no labels: measuring fidelity to the FP32 model (budget in points of it)")
    steps: list[dict] = []
    executor, own_executor = as_executor("local" if executor is None else executor, workers)
    try:
        source_data = data_source(val, source.inputs, executor)
        if source_data is None:
            raise ConfigError("auto validates on samples it can split (files, arrays, lists), not on whole feeds",
                              "give the validation data as an .npz file, a folder, or arrays")
        search = Search(folder, executor, source_data, budget, rule, reference, detect=head is not None,
                        detection_labels=None if detection_labels is None else str(detection_labels))
        float_candidates(search, source, say)
        preps, best, feed = pick_calibration(search, source, calib, config, methods, select, steps, say)
        prep = preps[best.recipe.method]
        say(f"best calibration: {best.recipe.method} (drop {best.drop:+.2f}); analysing layers")
        analysis = analyze(source, calib, target, val=val, config=config, prepared=prep,
                           minmax_ranges=preps["minmax"].ranges if "minmax" in preps else None, executor=executor)
        ranked = [s.node for s in analysis.sensitivity]
        n_layers = len(prep.layers)
        if not best.meets:
            fallback_search(search, prep, best, ranked, analysis, steps, say, max_float_layers)
        if refine:
            refine_recipe(search, preps, refine_target(search), calib, feed, config, steps, say)
        if not search.meeting() and qat_inputs is not None:
            qat_step(search, qat_inputs, dataclasses.replace(config, method=best.recipe.method), source, steps, say)
        say("measuring latency of every candidate")
        measure(list(search.records.values()), n_layers, threads, bench_runs, bench_batch, bench_shapes(source, probe.inputs, bench_batch))
        meeting = search.within_budget()
        chosen = choose(meeting)
        notes = [s["result"] for s in steps if "result" in s] + executor.notes
        hint = None if qat_inputs is not None else qat_command(source, val_spec, config, output)
        outcome = assemble_verdict(chosen, meeting, search, budget, n_layers, analysis, best, notes, hint)
    except BaseException as exc:
        if own_executor:
            executor.close(stop_workers=not isinstance(exc, Exception))
        raise
    if own_executor:
        executor.close()
    from edgeq.model import save as save_model

    save_model(load(chosen.path).proto, folder.path("model.onnx"), force=True)
    for c in search.records.values():
        c.path = str(folder.final(c.path))
        folder.write_json(f"candidates/{c.name}.json", c.to_dict())
    report = assemble_report(f"edgeq auto: {source.name}", budget, labels is not None or detection_labels is not None, search, outcome, chosen, analysis,
                             calib_samples=prep.samples, n_layers=n_layers, steps=steps, threads=threads, batch=bench_batch,
                             workers=executor.workers, started=started)
    folder.write_json("report.json", report)
    folder.write_text("report.html", render_auto_html(report))
    return report


def _detection_task(source: Model, labels: str | Path | None) -> str | None:
    """The detector head `auto` judges boxes for (None for other models); ground-truth boxes without a detector are
    a user error, found before any work, as are unreadable labels."""
    from edgeq.evaluate.detect_validation import detector_head
    from edgeq.evaluate.detection.labels import read_detection_labels

    head = detector_head(source)
    if labels is not None:
        if head is None:
            raise ConfigError("--labels gives ground-truth boxes, but the model's outputs match no detector head",
                              "drop --labels (class labels go in the validation data as 'labels'), or check the model")
        read_detection_labels(labels)
    return head


def _narrated(say: Callable[..., None], phase: Step) -> Callable[..., None]:
    """auto's messages name its phases as they begin: each one also becomes the phase's progress line."""
    def narrate(text: str, *args: Any, **kwargs: Any) -> None:
        phase.describe(f"auto: {text.strip()}"[:80])
        say(text, *args, **kwargs)
    return narrate


def _check_options(select: str, budget: float, max_float_layers: int | None) -> None:
    if select not in ("fidelity", "validation"):
        raise ConfigError(f"unknown calibration selection {select!r}", "use fidelity (no validation runs) or validation")
    if not budget >= 0:
        raise ConfigError(f"budget {budget} is negative", "give the accuracy drop you accept in points, e.g. --budget 1")
    if max_float_layers is not None and max_float_layers < 0:
        raise ConfigError(f"max float layers {max_float_layers} is negative", "give 0 (a fully INT8 model) or more")


