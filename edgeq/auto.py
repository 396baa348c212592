"""The automatic mode: meet an accuracy budget by itself, and explain every step.

INT8 static with the calibration method whose outputs stay closest to FP32 on calibration samples (no validation
run is spent on that choice; `select="validation"` spends one per method); if its drop exceeds the budget, layers
ranked by sensitivity go back to float — the fewest that meet the budget (at most `max_float_layers`), found by a
guess from the sensitivity analysis refined by bisection on the count (a handful of evaluations, never one per
combination). The model found is then refined: each calibration method, with and without cross-layer equalization,
then bias correction, scored by output fidelity on calibration samples; the best recipe costs one more evaluation,
and of candidates with the same layers in float (the same kernels) the more accurate is kept. When no INT8 or mixed
model meets the budget, quantization-aware training runs if the PyTorch model was given (`qat=QatSource(...)`), and
FP16 is evaluated if nothing meets after that; otherwise the verdict gives the QAT command to run. Every candidate is
evaluated through an executor (a local process pool by default); every candidate's latency is measured and the
fastest one that meets the budget wins, FP32 and FP16 included (both are evaluated first, before calibration): when
nothing beats FP32 the verdict says so and FP32 is the model written. Validation data without labels makes the metric
fidelity to the FP32 model (top-1 agreement, or cosine), stated in the report's `metric_note`.

>>> result = edgeq.auto("model.onnx", calib="calib.npz", val="val.npz", budget=1.0, output="auto-out")   # doctest: +SKIP
>>> result["verdict"]["status"], result["evaluations"]                                                  # doctest: +SKIP
('met', 4)
"""
from __future__ import annotations

import dataclasses
import platform
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeq.analyze import analyze
from edgeq.analyze.sensitivity import eval_inputs, fidelity, full_int8_fidelity, outputs_of
from edgeq.data import Dataset, batches, open_data
from edgeq.errors import ConfigError
from edgeq.executor import Executor, LocalPool
from edgeq.model import Model, load, model_files
from edgeq.progress import Step, step
from edgeq.quantize.config import Int8Static
from edgeq.quantize.qdq import Prepared, prepare_and_calibrate_each, quantize_qdq
from edgeq.sqnr import BROKEN_SQNR_DB

METHODS = ("minmax", "percentile", "mse")
SAME_FUNCTION_RTOL = 1e-3   # the PyTorch model given for QAT must reproduce MODEL's outputs this closely


@dataclass(frozen=True)
class QatSource:
    """The PyTorch model MODEL was exported from, for the quantization-aware training `auto` runs when no INT8 or
    mixed model meets the budget (the `edgeq qat` inputs: a factory, a weights-only state dict, labelled data).

    >>> src = QatSource("mynets:build", "weights.pt", "train.npz", epochs=2)
    >>> src.factory, src.lr
    ('mynets:build', 0.0001)
    """

    factory: str                    # MODULE:FACTORY, a function that builds the torch.nn.Module with no arguments
    weights: str | Path             # its state dict, torch.save(model.state_dict(), PATH); loaded weights-only
    train: Dataset | str | Path     # labelled training data, also the source of the QAT calibration
    epochs: int = 3
    lr: float = 1e-4
    batch_size: int = 64
    seed: int = 0


@dataclass
class _QatInputs:
    """A checked QatSource: the module, MODEL's input name and the training arrays."""

    source: QatSource
    module: Any
    input_name: str
    x: np.ndarray
    y: np.ndarray


@dataclass(frozen=True)
class EvalTask:
    """One candidate evaluation: plain values, so any executor (a process pool, a cluster) can run it."""

    name: str
    model_path: str
    arrays: dict[str, np.ndarray]
    labels: np.ndarray | None
    batch_size: int = 64
    reference: str | None = None   # without labels: the FP32 model, fidelity to it is the metric


def evaluate_task(task: EvalTask) -> dict:
    """Validate one candidate (runs in a worker)."""
    from edgeq.evaluate import validate

    data = Dataset.from_arrays(task.arrays, labels=task.labels, description="validation")
    record = validate(task.model_path, data, reference=task.reference, batch_size=task.batch_size).to_dict()
    record.pop("predictions", None)
    return record


def materialize(data: Dataset, model: Model) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """The validation set as arrays (sent to every worker)."""
    parts: dict[str, list[np.ndarray]] = {}
    labels: list[np.ndarray] = []
    for batch in batches(data, model.inputs, 256, refuse_nonfinite=False):
        for k, v in batch.inputs.items():
            parts.setdefault(k, []).append(v)
        if batch.labels is not None:
            labels.append(np.asarray(batch.labels))
    return {k: np.concatenate(v) for k, v in parts.items()}, (np.concatenate(labels) if labels else None)


class _Search:
    """Saves, evaluates and records candidates; counts evaluations."""

    def __init__(self, folder, executor: Executor, arrays, labels, budget: float, rule, reference: str | None = None) -> None:
        self.folder, self.executor, self.arrays, self.labels = folder, executor, arrays, labels
        self.budget, self.rule, self.reference = budget, rule, reference
        self.records: dict[str, dict] = {}
        self.base: dict | None = None
        self.evaluations = 0

    def evaluate(self, candidates: list[tuple[str, Any, dict]]) -> list[dict]:
        from edgeq.evaluate import compare
        from edgeq.model import save

        tasks = []
        for name, proto, _ in candidates:
            path = save(proto, self.folder.path(f"candidates/{name}.onnx"), force=True)
            tasks.append(EvalTask(name, str(path), self.arrays, self.labels, reference=self.reference))
        with step(f"validating {', '.join(t.name for t in tasks)}"[:80]):
            results = self.executor.map(evaluate_task, tasks)
        self.evaluations += len(tasks)
        out = []
        for (name, _, meta), task, result in zip(candidates, tasks, results):
            record = {"name": name, "path": task.model_path, **meta, "metric": result["metric"], "metric_value": result["value"],
                      "metric_ci95": result["ci95"], "evaluation": self.evaluations - len(tasks) + len(out) + 1}
            if self.base is None:
                self.base = result
                record.update(drop=0.0, drop_ci95=[0.0, 0.0], meets=True)
            else:
                c = compare(self.base if self.reference is None else _perfect(result), result, self.rule).to_dict()
                record.update(drop=c["drop"], drop_ci95=c["drop_ci95"], meets=bool(c["drop"] <= self.budget), comparison_reasons=c["reasons"])
            self.records[name] = record
            out.append(record)
        return out

    def meeting(self) -> list[dict]:
        """Quantized candidates (INT8, mixed, QAT) that meet the budget."""
        return [r for r in self.records.values() if r["meets"] and r["kind"] in ("int8", "qat")]

    def within_budget(self) -> list[dict]:
        """Every candidate that meets the budget, FP32 and FP16 included."""
        return [r for r in self.records.values() if r["meets"]]


def _perfect(record: dict) -> dict:
    """FP32's fidelity to itself, on the candidate's metric and samples: 100% agreement, cosine 1. Each candidate's
    drop is paired against it, so it is the points the candidate loses to FP32 even when the worst output (and so
    the metric) differs between candidates of a multi-output model."""
    from edgeq.evaluate.metrics import METRICS

    info = METRICS[record["metric"]]
    ones = [1.0] * len(record["per_sample"][info.samples])
    return {**record, "value": info.scale, "ci95": [info.scale, info.scale], "model": "fp32 (reference)", "worst": None,
            "predictions": None, "per_sample": {**record["per_sample"], info.samples: ones}}


def metric_note(base: dict, budget: float, labelled: bool) -> str | None:
    """What the budget means when the metric is fidelity to the FP32 model (no labels); None with labels."""
    if labelled:
        return None
    where = f" (output {base['output']})" if base.get("output") else ""
    if base["metric"] == "cosine":
        return (f"Metric: no labels, so fidelity to the FP32 model: cosine of each candidate's outputs to FP32's{where}; "
                f"a budget of {budget:g} points is {budget / 100:g} of cosine: a candidate meets it at ≥ {1 - budget / 100:g}")
    return (f"Metric: no labels, so top-1 agreement with the FP32 model{where}: a budget of {budget:g} points "
            f"lets {budget:g}% of the validation samples change their top class")


def fidelity_reference(source: Model, labels: np.ndarray | None) -> bool:
    """Whether auto measures fidelity to the FP32 model: the validation data has no labels and the model is no causal
    language model (those are scored by perplexity without labels)."""
    from edgeq.evaluate.tasks.lm import causal_lm_input

    return labels is None and causal_lm_input(source) is None


def auto(model: Model | str | Path, calib: Dataset | str | Path, val: Dataset | str | Path, budget: float = 1.0,
         output: str | Path = "auto-out", *, target: str = "onnxruntime-cpu", executor: Executor | None = None,
         config: Int8Static | None = None, methods: tuple[str, ...] = METHODS, force: bool = False,
         bench_runs: int = 20, bench_batch: int = 64, threads: int = 1, select: str = "fidelity",
         max_float_layers: int | None = None, refine: bool = True, qat: QatSource | None = None, console: Any = None) -> dict:
    """Meet `budget` (points of the validation metric: top-1 % with labels, fidelity to MODEL without) with the
    fastest model, FP32 and FP16 included; write OUTDIR.

    Validation data without labels is scored by fidelity to MODEL itself (the natural reference), as `validate
    --reference` does: the worst output's top-1 agreement (%), or its cosine for embeddings and other tensors; the
    budget is then in points of it: percentage points of agreement, or 0.01 of cosine (budget 1: cosine >= 0.99).
    FP32 is a candidate like the others: when no candidate within the budget is faster, FP32 is chosen and written.

    `max_float_layers` caps the layers the search may return to float (0: a fully INT8 model or nothing);
    `refine` False skips the recipe refinement (one evaluation less); `qat` lets QAT run when nothing else meets."""
    from edgeq.report import ReportFolder

    _check_options(select, budget, max_float_layers)
    started = time.perf_counter()
    say = console.print if console is not None else (lambda *a, **k: None)
    source = load(model) if isinstance(model, (str, Path)) else model
    calib_spec = calib
    calib = open_data(calib) if isinstance(calib, (str, Path)) else calib
    val_spec = val
    val = open_data(val) if isinstance(val, (str, Path)) else val
    qat_inputs = _load_qat(qat, source) if qat is not None else None   # before any work: a wrong model fails fast
    folder = ReportFolder(Path(output), force=force, staged=True,
                          protect=(*model_files(source.path), *(Path(d) for d in (calib_spec, val_spec) if isinstance(d, (str, Path)))))
    try:
        with step("auto") as phase:
            report = _run(source, calib, val, val_spec, budget, output, folder, target, executor, config, methods, bench_runs,
                          bench_batch, threads, select, max_float_layers, refine, qat_inputs, _narrated(say, phase), started)
    except BaseException:
        folder.discard()  # a failure or an interrupt leaves the output folder as it was, or absent
        raise
    folder.commit()
    return report


def _run(source: Model, calib: Dataset, val: Dataset, val_spec: Dataset | str | Path, budget: float, output: str | Path,
         folder: Any, target: str, executor: Executor | None, config: Int8Static | None, methods: tuple[str, ...],
         bench_runs: int, bench_batch: int, threads: int, select: str, max_float_layers: int | None, refine: bool,
         qat_inputs: "_QatInputs | None", say: Any, started: float) -> dict:
    from edgeq.decide import DecisionRule
    from edgeq.report.auto import render_auto_html

    config = config or Int8Static()
    arrays, labels = materialize(val, source)
    own_executor = executor is None
    executor = executor or LocalPool(2)
    rule = DecisionRule(ship_below=max(budget, 1e-9), qat_up_to=max(budget, 3.0))
    reference = None
    if fidelity_reference(source, labels):   # decided before any calibration: no labels, FP32 is the reference
        from edgeq.model import save

        reference = str(save(source.proto, folder.path("candidates/fp32.onnx"), force=True))
        say("the validation data has no labels: measuring fidelity to the FP32 model (budget in points of it)")
    search = _Search(folder, executor, arrays, labels, budget, rule, reference)
    steps: list[dict] = []
    try:
        _float_candidates(search, source, say)
        preps, best, feed = _calibrate(search, source, calib, config, methods, select, steps, say)
        prep = preps[best["method"]]
        say(f"best calibration: {best['method']} (drop {best['drop']:+.2f}); analysing layers")
        analysis = analyze(source, calib, target, val=val, config=config, prepared=prep,
                           minmax_ranges=preps["minmax"].ranges if "minmax" in preps else None)
        ranked = [s.node for s in analysis.sensitivity]
        n_layers = len(prep.layers)
        if not best["meets"]:
            _fallback_search(search, prep, best, ranked, analysis, steps, say, max_float_layers)
        if refine:
            _refine(search, preps, _refine_target(search), calib, feed, config, steps, say)
        if not search.meeting() and qat_inputs is not None:
            _qat_step(search, qat_inputs, dataclasses.replace(config, method=best["method"]), source, steps, say)
        _measure(search, n_layers, threads, bench_runs, bench_batch, say)
        meeting = search.within_budget()
        chosen = _choose(meeting)
        notes = [s["result"] for s in steps if "result" in s]
        hint = None if qat_inputs is not None else _qat_command(source, val_spec, config, output)
        verdict = _verdict(chosen, meeting, search, budget, n_layers, analysis, best, notes, hint)
    except BaseException as exc:
        if own_executor:
            executor.close(stop_workers=not isinstance(exc, Exception))
        raise
    if own_executor:
        executor.close()
    from edgeq.model import save as save_model

    save_model(load(chosen["path"]).proto, folder.path("model.onnx"), force=True)
    for r in search.records.values():
        r["path"] = str(folder.final(r["path"]))
        folder.write_json(f"candidates/{r['name']}.json", r)
    import onnxruntime

    report = {
        "title": f"edgeq auto: {source.name}", "budget": budget, "metric": search.base["metric"],
        "metric_note": metric_note(search.base, budget, labelled=labels is not None),
        "verdict": verdict, "chosen": chosen["name"], "evaluations": search.evaluations,
        "evaluations_note": f"{search.evaluations} validation runs (FP32 included) on {search.base['samples']} samples; "
                            f"sensitivity: {2 * len(analysis.sensitivity)} quantize-and-run passes on {min(128, prep.samples)} calibration samples",
        "layers": n_layers, "search": steps,
        "candidates": [{k: v for k, v in r.items() if k != "comparison_reasons"} for r in search.records.values()],
        "analysis": analysis.to_dict(),
        "environment": {"onnxruntime": onnxruntime.__version__, "machine": platform.machine(), "threads": threads,
                        "batch": bench_batch, "validation samples": search.base["samples"], "workers": getattr(executor, "workers", 1)},
        "wall_s": round(time.perf_counter() - started, 2),
    }
    folder.write_json("report.json", report)
    folder.write_text("report.html", render_auto_html(report))
    return report


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


def _calibrate(search: _Search, source: Model, calib: Dataset, config: Int8Static, methods: tuple[str, ...], select: str,
               steps: list[dict], say) -> tuple[dict[str, Prepared], dict, dict[str, np.ndarray]]:
    """Calibrate with every method; evaluate FP32 and the best full INT8 (every method's with `select="validation"`).
    Returns the prepared graphs, the best full-INT8 record and the calibration samples fidelity is measured on."""
    say("calibrating with each method; the one whose INT8 outputs stay closest to FP32 is kept")
    preps = prepare_and_calibrate_each(source, calib, config, methods)
    feed = eval_inputs(next(iter(preps.values())), calib)
    scores = {m: full_int8_fidelity(p, feed) for m, p in preps.items()}
    def int8(m: str) -> tuple:
        return f"int8-{m}", quantize_qdq(preps[m]), {"kind": "int8", "float_layers": [], "method": m}

    if select == "validation":   # one validation run per method: the most accurate, at the price of evaluations
        full = search.evaluate([int8(m) for m in methods])
        best = min(full, key=lambda r: (r["drop"], methods.index(r["method"])))
        why = "lowest validation drop: " + ", ".join(f"{r['method']} {r['drop']:+.2f}" for r in full)
    else:                        # fidelity on calibration samples: no validation run spent on the choice
        method = max(methods, key=lambda m: (scores[m].sqnr_db, -methods.index(m)))
        full = search.evaluate([int8(method)])
        best = full[0]
        why = "highest output SQNR vs FP32 on calibration samples: " + ", ".join(f"{m} {scores[m].sqnr_db:.1f} dB" for m in methods)
    steps.append({"step": "calibration", "evaluated": [r["name"] for r in full], "best": best["name"], "why": why,
                  "sqnr_db": {m: scores[m].sqnr_db for m in methods}})
    return preps, best, feed


def _fallback_search(search: _Search, prep: Prepared, best: dict, ranked: list[str], analysis, steps: list[dict], say,
                     max_float_layers: int | None = None) -> None:
    """Fewest top-ranked layers to float (at most `max_float_layers`): start at the sensitivity analysis's guess
    (layers that alone break the outputs), grow by doubling while the budget fails, then bisect the count down to
    the smallest that meets it."""
    method = best["method"]
    n = len(ranked) if max_float_layers is None else min(max_float_layers, len(ranked))
    if n == 0:
        steps.append({"step": "fallback", "result": "no layer may stay in float (max_float_layers 0): no mixed-precision search"})
        return
    sens = {s.node: s for s in analysis.sensitivity}
    guess = max(1, sum(1 for name in ranked if sens[name].only_quantized.sqnr_db < BROKEN_SQNR_DB))
    results: dict[int, dict] = {0: best}

    def trial(k: int) -> dict:
        if k not in results:
            layers = ranked[:k]
            (record,) = search.evaluate([(f"int8-{method}-float{k}", quantize_qdq(prep, exclude=layers),
                                          {"kind": "int8", "float_layers": layers, "method": method})])
            results[k] = record
            steps.append({"step": "fallback", "float_count": k, "float_layers": layers, "drop": record["drop"], "meets": record["meets"]})
            say(f"  top {k} layers in float: drop {record['drop']:+.2f} ({'meets' if record['meets'] else 'over'} the budget)")
        return results[k]

    low, high = 0, None          # low: largest count known to fail; high: smallest known to meet
    k = min(guess, n)
    while k <= n:
        if trial(k)["meets"]:
            high = k
            break
        low = k
        if k == n:
            break
        k = min(2 * k, n)
    if high is None:
        limit = f"all {n} layers" if n == len(ranked) else f"the top {n} layers (max_float_layers)"
        steps.append({"step": "fallback", "result": f"even {limit} in float miss the budget"})
        return
    while high - low > 1:
        mid = (low + high) // 2
        if trial(mid)["meets"]:
            high = mid
        else:
            low = mid
    steps.append({"step": "fallback", "result": f"{high} layer(s) in float is the fewest by rank that meets the budget"})


def _refine_target(search: _Search) -> dict:
    """The INT8 candidate to refine: the one meeting the budget with the fewest layers in float, else the closest."""
    int8 = [r for r in search.records.values() if r["kind"] == "int8"]
    meeting = [r for r in int8 if r["meets"]]
    if meeting:
        return min(meeting, key=lambda r: (len(r["float_layers"]), r["drop"]))
    return min(int8, key=lambda r: r["drop"])


def _refine(search: _Search, preps: dict[str, Prepared], target: dict, calib: Dataset, feed: dict[str, np.ndarray],
            config: Int8Static, steps: list[dict], say) -> None:
    """Validate the recipe with the best output SQNR on calibration samples for the target's layers in float, unless
    it is the target's own: at most one evaluation."""
    say(f"refining {target['name']}: calibration methods, equalization and bias correction scored on calibration samples")
    protos, scores = _score_recipes(preps, target, calib, feed, config)
    key = max(scores, key=scores.get)
    method, cle, bc = key
    floats = list(target["float_layers"])
    name = f"int8-{method}" + (f"-float{len(floats)}" if floats else "") + ("-cle" if cle else "") + ("-bc" if bc else "")
    ranking = ", ".join(f"{_recipe_label(*k)} {v:.1f} dB" for k, v in sorted(scores.items(), key=lambda kv: -kv[1]))
    step = {"step": "refine", "target": target["name"], "sqnr_db": {_recipe_label(*k): v for k, v in scores.items()}, "best": name}
    if name in search.records:
        step["result"] = f"{name} keeps the highest output SQNR on calibration samples ({ranking}): no evaluation spent"
    else:
        repairs = _recipe_repairs(cle, bc)
        (record,) = search.evaluate([(name, protos[key], {"kind": "int8", "float_layers": floats, "method": method, "repairs": repairs})])
        step["result"] = (f"{name} has the highest output SQNR on calibration samples ({ranking}); validated: drop "
                          f"{record['drop']:+.2f} vs {target['drop']:+.2f} for {target['name']}")
        say(f"  {name}: drop {record['drop']:+.2f}")
    steps.append(step)


def _score_recipes(preps: dict[str, Prepared], target: dict, calib: Dataset, feed: dict[str, np.ndarray],
                   config: Int8Static) -> tuple[dict[tuple, Any], dict[tuple, float]]:
    """Every calibration method with and without cross-layer equalization, then bias correction on the best of
    those (the slow repair: once), each with the target's layers in float; keyed (method, equalize, bias correction)."""
    from edgeq.quantize import quantize

    floats = list(target["float_layers"])
    model = preps[target["method"]].model
    reference = outputs_of(model.proto, feed)

    def build(method: str, cle: bool, bc: bool) -> Any:
        if not (cle or bc):      # the stored ranges: the same model the search builds
            return quantize_qdq(preps[method], exclude=floats)
        recipe = dataclasses.replace(config, method=method, exclude_nodes=tuple(config.exclude_nodes) + tuple(floats),
                                     equalize=cle, bias_correction=bc)
        return quantize(model, recipe, calib=calib).proto

    protos = {(m, cle, False): build(m, cle, False) for m in preps for cle in (False, True)}
    scores = {key: fidelity(reference, outputs_of(p, feed)).sqnr_db for key, p in protos.items()}
    method, cle, _ = max(scores, key=scores.get)
    protos[(method, cle, True)] = build(method, cle, True)
    scores[(method, cle, True)] = fidelity(reference, outputs_of(protos[(method, cle, True)], feed)).sqnr_db
    return protos, scores


def _recipe_repairs(cle: bool, bc: bool) -> list[str]:
    return [label for label, on in (("equalization", cle), ("bias correction", bc)) if on]


def _recipe_label(method: str, cle: bool, bc: bool) -> str:
    return " + ".join([method] + _recipe_repairs(cle, bc))


def _float_candidates(search: _Search, source: Model, say) -> None:
    """FP32 (the baseline) and FP16, evaluated before any calibration: both are candidates like the others."""
    from edgeq.quantize import quantize
    from edgeq.quantize.config import Fp16

    say("evaluating FP32 and FP16")
    search.evaluate([("fp32", source.proto, {"kind": "fp32", "float_layers": [], "method": None}),
                     ("fp16", quantize(source, Fp16()).proto, {"kind": "fp16", "float_layers": [], "method": None})])


def _load_qat(qat: QatSource, source: Model) -> _QatInputs:
    """Check everything QAT needs before the search starts: PyTorch, the factory and weights, labelled training data
    for MODEL's one input, and that the module computes what MODEL computes."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise ConfigError("QAT needs PyTorch, which is not installed", "pip install 'edgeq[torch]', or leave out the PyTorch model") from None
    from edgeq.qat.run import load_model, training_arrays

    if qat.epochs < 1 or not qat.lr > 0 or qat.batch_size < 1:
        raise ConfigError(f"QAT settings out of range: {qat.epochs} epochs, learning rate {qat.lr:g}, batch size {qat.batch_size}",
                          "give at least 1 epoch (--qat-epochs), a positive learning rate (--qat-lr) and a batch size of at least 1")
    if len(source.inputs) != 1:
        raise ConfigError(f"QAT supports models with one input; {_label(source)} has {len(source.inputs)}", "leave out the PyTorch model")
    module = load_model(qat.factory, Path(qat.weights))
    train = open_data(qat.train) if isinstance(qat.train, (str, Path)) else qat.train
    _, x, y = training_arrays(train, "training data")
    inputs = _QatInputs(qat, module, source.inputs[0].name, x, y)
    _check_same_function(inputs, source)
    return inputs


def _check_same_function(inputs: _QatInputs, source: Model) -> None:
    """QAT fine-tunes the PyTorch model and is measured against MODEL's FP32: they must compute the same function."""
    import torch

    from edgeq.model import make_session

    batch = source.inputs[0].shape[0] if source.inputs[0].shape and isinstance(source.inputs[0].shape[0], int) else 8
    x = inputs.x[:batch]
    try:
        with torch.no_grad():
            ours = inputs.module(torch.from_numpy(x))
        ours = np.asarray((ours[0] if isinstance(ours, (tuple, list)) else ours).numpy(), dtype=np.float64)
        theirs = np.asarray(make_session(source.proto, threads=1).run(None, {inputs.input_name: x})[0], dtype=np.float64)
        error = float(np.linalg.norm(ours - theirs) / max(float(np.linalg.norm(theirs)), 1e-12))
    except Exception as exc:  # noqa: BLE001 - any failure here means the two do not fit together
        detail = " ".join(str(exc).split())[:160]
        raise ConfigError(f"the training data does not run through both {inputs.source.factory} and {_label(source)} ({type(exc).__name__}: {detail})",
                          f"give the PyTorch model {_label(source)} was exported from and training inputs shaped like its input") from None
    if not error <= SAME_FUNCTION_RTOL:
        raise ConfigError(f"{inputs.source.factory} with {inputs.source.weights} does not compute what {_label(source)} computes "
                          f"(relative output difference {error:.2g} on {len(x)} training samples)",
                          f"give the PyTorch model and weights {_label(source)} was exported from")


def _label(model: Model) -> str:
    return Path(model.path).name if model.path else model.name


def _qat_step(search: _Search, inputs: _QatInputs, config: Int8Static, source: Model, steps: list[dict], say) -> None:
    """Fine-tune the PyTorch model with fake quantization (initialised from PTQ with the chosen calibration) and
    evaluate its exported QDQ model like every other candidate."""
    from edgeq import qat
    from edgeq.qat.run import QatOptions, default_task, finetune_qat, prepare_qat

    src = inputs.source
    options = QatOptions(epochs=src.epochs, lr=src.lr, batch_size=src.batch_size, per_channel=config.per_channel,
                         weight_bits=config.weight_bits, seed=src.seed)
    say(f"no INT8 or mixed model meets the budget: quantization-aware training of {src.factory} ({src.epochs} epochs)")
    started = time.perf_counter()
    prepared, split = prepare_qat(inputs.module, inputs.x, inputs.input_name, config, options, [o.name for o in source.outputs])
    history = finetune_qat(prepared, inputs.x, inputs.y, split, default_task(inputs.y), options)
    proto = qat.to_onnx(prepared, weight_storage=options.weight_storage).proto
    seconds = time.perf_counter() - started
    about = {"factory": src.factory, "epochs": src.epochs, "lr": src.lr, "best_epoch": history.best_epoch,
             "train_samples": len(split[0]), "early_stop_samples": len(split[1]), "seconds": round(seconds, 1)}
    (record,) = search.evaluate([("qat", proto, {"kind": "qat", "float_layers": [], "method": config.method, "qat": about})])
    steps.append({"step": "qat", **about, "drop": record["drop"], "meets": record["meets"],
                  "result": f"quantization-aware training of {src.factory} ({src.epochs} epochs on {len(split[0])} training samples, "
                            f"epoch {history.best_epoch} kept by early stop on {len(split[1])}, {seconds:.0f} s): drop "
                            f"{record['drop']:+.2f} points, {'meets' if record['meets'] else 'over'} the budget"})
    say(f"  qat: drop {record['drop']:+.2f}")


def _qat_command(source: Model, val: Dataset | str | Path, config: Int8Static, output: str | Path) -> str:
    """The recommendation when QAT could not run here: the exact `edgeq qat` command, and how to let auto run it."""
    if isinstance(val, Dataset):
        val = val.description if Path(val.description).exists() else "VAL_DATA"
    flags = ("" if config.per_channel else " --per-tensor") + ("" if config.weight_bits == 8 else f" --weight-bits {config.weight_bits}")
    command = (f"edgeq qat MODULE:FACTORY --weights WEIGHTS.pt --train TRAIN_DATA --val {shlex.quote(str(val))}{flags} "
               f"-o {shlex.quote(str(Path(output) / 'qat.onnx'))}")
    return (f"recommendation: quantization-aware training, which recovers most of the INT8 loss: `{command}` "
            f"(MODULE:FACTORY builds the PyTorch model {_label(source)} was exported from), or rerun `edgeq auto` with "
            "`--torch-model MODULE:FACTORY --weights WEIGHTS.pt --train TRAIN_DATA` to run it and compare it here")


def _measure(search: _Search, n_layers: int, threads: int, runs: int, batch: int, say) -> None:
    """Latency and size of every candidate, each in its own benchmark worker."""
    from edgeq.bench import BenchConfig, benchmark

    say("measuring latency of every candidate")
    names = list(search.records)
    bench = benchmark([search.records[n]["path"] for n in names], BenchConfig(threads=threads, runs=runs, warmup=3, batch=batch))
    for n, b in zip(names, bench):
        r = search.records[n]
        d = b.to_dict()
        r.update(size_mb=d["size_bytes"] / 1e6, p50_ms=d["latency_ms"]["p50"], p90_ms=d["latency_ms"]["p90"])
        r["int8_layers"] = {"int8": n_layers - len(r["float_layers"]), "qat": n_layers}.get(r["kind"], 0)


def _structure(record: dict) -> tuple:
    """Candidates with the same kind and layers in float run the same kernels."""
    return record["kind"], tuple(sorted(record["float_layers"]))


def _choose(meeting: list[dict]) -> dict:
    """The fastest candidate that meets the budget; among those with its structure, the most accurate (their
    latencies differ by measurement noise only)."""
    fastest = min(meeting, key=lambda r: r["p50_ms"])
    same = [r for r in meeting if _structure(r) == _structure(fastest)]
    return min(same, key=lambda r: (r["drop"], r["evaluation"]))


def broken_layers(analysis) -> dict[str, str]:
    """Layers the analysis says break INT8: alone they drag the output SQNR under 20 dB, or their weights need
    clipping (outliers own the int8 range even per channel)."""
    out: dict[str, str] = {}
    for s in analysis.sensitivity:
        if s.only_quantized.sqnr_db < BROKEN_SQNR_DB:
            out[s.node] = f"only it INT8: output SQNR {s.only_quantized.sqnr_db:.1f} dB"
    for o in analysis.outliers:
        if "clip-or-float" in o.flags:
            why = f"weight outliers {o.outlier_ratio:.0f}× the robust spread, {o.zeroed_per_channel:.0%} of weights round to zero"
            out[o.node] = f"{out[o.node]}; {why}" if o.node in out else why
    return out


def _verdict(chosen: dict, meeting: list[dict], search: _Search, budget: float, n_layers: int, analysis, best: dict,
             notes: list[str], qat_hint: str | None) -> dict:
    """Status, one-line summary and the reasons: what full INT8 did, what each search step found, why the chosen
    model (or the recommendation when none meets)."""
    reasons = [f"full INT8 with the best calibration ({best['method']}) drops {best['drop']:+.2f} points"
               + (": within the budget" if best["meets"] else ": over the budget"), *notes]
    fp32, fp16 = search.records["fp32"], search.records.get("fp16")
    quantized = [r for r in meeting if r["kind"] in ("int8", "qat")]
    if chosen["kind"] in ("int8", "qat"):
        status = "met"
        how = f"{n_layers - len(chosen['float_layers'])} of {n_layers} layers INT8" if chosen["kind"] == "int8" else \
            f"all {n_layers} layers INT8 after quantization-aware training"
        summary = (f"{chosen['name']} meets the budget: drop {chosen['drop']:+.2f} points (≤ {budget:g}), {how}, "
                   f"{chosen['p50_ms']:.2f} ms p50, {chosen['size_mb']:.2f} MB")
        reasons += [_float_reason(name, analysis) for name in chosen["float_layers"]]
        reasons += _speed_reasons(chosen, meeting, search)
    elif chosen["kind"] == "fp16":
        status = "fp16"
        summary = (f"fp16 is the fastest model within the budget: drop {chosen['drop']:+.2f} points, "
                   f"{_speed(chosen, fp32)}× FP32's speed, {chosen['size_mb']:.2f} MB")
        if quantized:
            q = min(quantized, key=lambda r: r["p50_ms"])
            summary += f"; {q['name']} meets the budget at {_speed(q, fp32)}× FP32's speed"
        else:
            summary = f"no INT8 or mixed-precision model meets the budget of {budget:g} points; " + summary
            reasons += [qat_hint] if qat_hint else []
        reasons += _speed_reasons(chosen, meeting, search)
    elif quantized:
        status = "fp32"
        q = min(quantized, key=lambda r: r["p50_ms"])
        summary = (f"nothing beats FP32: the fastest quantized candidate within the budget, {q['name']}, runs at "
                   f"{_speed(q, fp32)}× FP32's speed ({q['p50_ms']:.2f} vs {fp32['p50_ms']:.2f} ms p50); FP32 is the chosen model")
        reasons += _speed_reasons(chosen, meeting, search)[:-1]
    else:
        status = "fp32" if fp16 is not None and fp16["meets"] else "not-met"
        summary = (f"no INT8{', QAT' if 'qat' in search.records else ''} or mixed-precision model meets the budget of "
                   f"{budget:g} points; nothing beats FP32")
        others = [r for r in search.records.values() if r["kind"] != "fp32" and r.get("p50_ms")]
        if others:
            q = min(others, key=lambda r: r["p50_ms"])
            summary += (f" (the fastest candidate, {q['name']}, runs at {_speed(q, fp32)}× FP32's speed and "
                        f"{'meets' if q['meets'] else 'misses'} the budget: drop {q['drop']:+.2f}); FP32 is the chosen model")
        if qat_hint:
            reasons.append(qat_hint)
    if fp16 is not None:
        reasons.append(f"FP16: drop {fp16['drop']:+.2f} points, {fp16['size_mb']:.2f} MB, {_speed(fp16, fp32)}× FP32's speed "
                       f"({'meets' if fp16['meets'] else 'misses'} the budget; on CPUs without FP16 arithmetic it is not faster)")
    broken = broken_layers(analysis)
    if broken:
        reasons.insert(1, "layers that break INT8: " + "; ".join(f"{n} ({why})" for n, why in broken.items()))
    reasons.append(f"{search.evaluations} evaluations on the validation set (FP32 included)")
    return {"status": status, "summary": summary, "reasons": reasons, "broken_layers": list(broken)}


def _speed(candidate: dict, fp32: dict) -> str:
    return f"{fp32['p50_ms'] / candidate['p50_ms']:.2f}"


def _float_reason(name: str, analysis) -> str:
    s = next((s for s in analysis.sensitivity if s.node == name), None)
    o = next((o for o in analysis.outliers if o.node == name), None)
    why = f"kept in float: {name}"
    if s:
        why += f" — rank {s.rank} in sensitivity (only it INT8: output SQNR {s.only_quantized.sqnr_db:.1f} dB, cosine {s.only_quantized.cosine:.4f})"
    if o and o.reasons:
        why += f"; {o.reasons[0]}"
    return why


def _speed_reasons(chosen: dict, meeting: list[dict], search: _Search) -> list[str]:
    out = []
    faster = sorted(meeting, key=lambda r: r["p50_ms"])
    if len(faster) > 1:
        out.append("fastest of the candidates that meet the budget: " + ", ".join(f"{r['name']} {r['p50_ms']:.2f} ms" for r in faster))
    if chosen is not faster[0]:
        out.append(f"{chosen['name']} has the layers in float of {faster[0]['name']}, so the same kernels: the more accurate of the two is kept")
    fp32 = search.records["fp32"]
    out.append(f"vs FP32: latency {chosen['p50_ms']:.2f} ms vs {fp32['p50_ms']:.2f} ms ({fp32['p50_ms'] / chosen['p50_ms']:.2f}× the speed), "
               f"size {fp32['size_mb'] / chosen['size_mb']:.2f}× smaller")
    return out


def print_auto(console, report: dict, output: Path | str) -> None:
    """The verdict, its reasons and the candidates table, with rich."""
    from rich.table import Table

    v = report["verdict"]
    colour = {"met": "green", "fp16": "yellow", "fp32": "yellow"}.get(v["status"], "red")
    console.print(f"[bold {colour}]{v['summary']}[/]", highlight=False)
    for reason in v["reasons"]:
        console.print(f"  • {reason}", highlight=False)
    t = Table(title=f"candidates (budget {report['budget']:g} points of {report['metric']})")
    for col in ("candidate", "float layers", "size MB", "p50 ms", report["metric"], "drop", "meets"):
        t.add_column(col, justify="left" if col == "candidate" else "right")
    for r in report["candidates"]:
        t.add_row(r["name"] + (" ★" if r["name"] == report["chosen"] else ""), str(len(r["float_layers"])), f"{r['size_mb']:.3f}",
                  f"{r['p50_ms']:.2f}", f"{r['metric_value']:.2f}", f"{r['drop']:+.2f}", "yes" if r["meets"] else "no")
    console.print(t)
    console.print(f"report: {Path(output) / 'report.html'}  ({report['evaluations']} evaluations)")
