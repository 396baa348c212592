"""The automatic mode: meet an accuracy budget by itself, and explain every step.

INT8 static with the calibration method whose outputs stay closest to FP32 on calibration samples (no validation
run is spent on that choice; `select="validation"` spends one per method); if its drop exceeds the budget, layers
ranked by sensitivity go back to float — the fewest that meet the budget, found by a guess from the sensitivity analysis refined by
bisection on the count (a handful of evaluations, never one per combination). Every candidate is evaluated through
an executor (a local process pool by default); every candidate's latency is measured and the fastest one that meets
the budget wins. When nothing does, the verdict says so and recommends QAT or FP16.

>>> result = edgeq.auto("model.onnx", calib="calib.npz", val="val.npz", budget=1.0, output="auto-out")   # doctest: +SKIP
>>> result["verdict"]["status"], result["evaluations"]                                                  # doctest: +SKIP
('met', 3)
"""
from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.analyze import analyze
from edgeq.analyze._qdq import Prepared, prepare_and_calibrate, quantize_qdq
from edgeq.analyze.sensitivity import eval_inputs, full_int8_fidelity
from edgeq.data import Dataset, batches, open_data
from edgeq.errors import ConfigError
from edgeq.executor import Executor, LocalPool
from edgeq.model import Model, load
from edgeq.quantize.config import Int8Static

METHODS = ("minmax", "percentile", "mse")
BROKEN_SQNR_DB = 20.0   # a layer that alone drags the output SQNR under this is a first guess for float


@dataclass(frozen=True)
class EvalTask:
    """One candidate evaluation: plain values, so any executor (a process pool, a cluster) can run it."""

    name: str
    model_path: str
    arrays: dict[str, np.ndarray]
    labels: np.ndarray | None
    batch_size: int = 64


def evaluate_task(task: EvalTask) -> dict:
    """Validate one candidate (runs in a worker)."""
    from edgeq.evaluate import validate

    data = Dataset.from_arrays(task.arrays, labels=task.labels, description="validation")
    record = validate(task.model_path, data, batch_size=task.batch_size).to_dict()
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

    def __init__(self, folder, executor: Executor, arrays, labels, budget: float, rule) -> None:
        self.folder, self.executor, self.arrays, self.labels = folder, executor, arrays, labels
        self.budget, self.rule = budget, rule
        self.records: dict[str, dict] = {}
        self.base: dict | None = None
        self.evaluations = 0

    def evaluate(self, candidates: list[tuple[str, Any, dict]]) -> list[dict]:
        from edgeq.evaluate import compare
        from edgeq.model import save

        tasks = []
        for name, proto, _ in candidates:
            path = save(proto, self.folder.path(f"candidates/{name}.onnx"), force=True)
            tasks.append(EvalTask(name, str(path), self.arrays, self.labels))
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
                c = compare(self.base, result, self.rule).to_dict()
                record.update(drop=c["drop"], drop_ci95=c["drop_ci95"], meets=bool(c["drop"] <= self.budget), comparison_reasons=c["reasons"])
            self.records[name] = record
            out.append(record)
        return out


def auto(model: Model | str | Path, calib: Dataset | str | Path, val: Dataset | str | Path, budget: float = 1.0,
         output: str | Path = "auto-out", *, target: str = "onnxruntime-cpu", executor: Executor | None = None,
         config: Int8Static | None = None, methods: tuple[str, ...] = METHODS, force: bool = False,
         bench_runs: int = 20, bench_batch: int = 64, threads: int = 1, select: str = "fidelity", console: Any = None) -> dict:
    """Meet `budget` (points of the validation metric, e.g. top-1 %) with the fastest model; write OUTDIR."""
    from edgeq.bench import BenchConfig, benchmark
    from edgeq.decide import DecisionRule
    from edgeq.report import ReportFolder
    from edgeq.report.auto import render_auto_html

    if select not in ("fidelity", "validation"):
        raise ConfigError(f"unknown calibration selection {select!r}", "use fidelity (no validation runs) or validation")
    if not budget >= 0:
        raise ConfigError(f"budget {budget} is negative", "give the accuracy drop you accept in points, e.g. --budget 1")
    started = time.perf_counter()
    say = console.print if console is not None else (lambda *a, **k: None)
    folder = ReportFolder(Path(output), force=force)
    source = load(model) if isinstance(model, (str, Path)) else model
    calib = open_data(calib) if isinstance(calib, (str, Path)) else calib
    val = open_data(val) if isinstance(val, (str, Path)) else val
    config = config or Int8Static()
    arrays, labels = materialize(val, source)
    own_executor = executor is None
    executor = executor or LocalPool(2)
    rule = DecisionRule(ship_below=max(budget, 1e-9), qat_up_to=max(budget, 3.0))
    search = _Search(folder, executor, arrays, labels, budget, rule)
    steps: list[dict] = []
    try:
        say("calibrating with each method; the one whose INT8 outputs stay closest to FP32 is kept")
        preps: dict[str, Prepared] = {m: prepare_and_calibrate(source, calib, config, method=m) for m in methods}
        feed = eval_inputs(next(iter(preps.values())), calib)
        scores = {m: full_int8_fidelity(p, feed) for m, p in preps.items()}
        if select == "validation":   # one validation run per method: the most accurate, at the price of evaluations
            full = search.evaluate([("fp32", source.proto, {"kind": "fp32", "float_layers": [], "method": None})]
                                   + [(f"int8-{m}", quantize_qdq(p), {"kind": "int8", "float_layers": [], "method": m}) for m, p in preps.items()])[1:]
            best = min(full, key=lambda r: (r["drop"], methods.index(r["method"])))
            why = "lowest validation drop: " + ", ".join(f"{r['method']} {r['drop']:+.2f}" for r in full)
        else:                        # fidelity on calibration samples: no validation run spent on the choice
            method = max(methods, key=lambda m: (scores[m].sqnr_db, -methods.index(m)))
            full = search.evaluate([("fp32", source.proto, {"kind": "fp32", "float_layers": [], "method": None}),
                                    (f"int8-{method}", quantize_qdq(preps[method]), {"kind": "int8", "float_layers": [], "method": method})])[1:]
            best = full[0]
            why = "highest output SQNR vs FP32 on calibration samples: " + ", ".join(f"{m} {scores[m].sqnr_db:.1f} dB" for m in methods)
        steps.append({"step": "calibration", "evaluated": [r["name"] for r in full], "best": best["name"], "why": why,
                      "sqnr_db": {m: scores[m].sqnr_db for m in methods}})
        prep = preps[best["method"]]
        say(f"best calibration: {best['method']} (drop {best['drop']:+.2f}); analysing layers")
        analysis = analyze(source, calib, target, val=val, config=config, prepared=prep,
                           minmax_ranges=preps["minmax"].ranges if "minmax" in preps else None)
        ranked = [s.node for s in analysis.sensitivity]
        n_layers = len(prep.layers)
        if not best["meets"]:
            _fallback_search(search, prep, best, ranked, analysis, steps, say)
        meeting = [r for r in search.records.values() if r["meets"] and r["kind"] != "fp32"]
        if not meeting:
            from edgeq.quantize import quantize
            from edgeq.quantize.config import Fp16

            say("no INT8 candidate meets the budget: evaluating FP16")
            search.evaluate([("fp16", quantize(source, Fp16()).proto, {"kind": "fp16", "float_layers": [], "method": None})])
        say("measuring latency of every candidate")
        names = list(search.records)
        bench = benchmark([search.records[n]["path"] for n in names], BenchConfig(threads=threads, runs=bench_runs, warmup=3, batch=bench_batch))
        for n, b in zip(names, bench):
            r = search.records[n]
            d = b.to_dict()
            r.update(size_mb=d["size_bytes"] / 1e6, p50_ms=d["latency_ms"]["p50"], p90_ms=d["latency_ms"]["p90"])
            r["int8_layers"] = n_layers - len(r["float_layers"]) if r["kind"] == "int8" else 0
        meeting = [r for r in search.records.values() if r["meets"] and r["kind"] != "fp32"]
        chosen = min(meeting, key=lambda r: r["p50_ms"]) if meeting else search.records["fp32"]
        verdict = _verdict(chosen, meeting, search, budget, n_layers, analysis, best)
    finally:
        if own_executor:
            executor.close()
    from edgeq.model import save as save_model

    save_model(load(chosen["path"]).proto, folder.path("model.onnx"), force=True)
    for r in search.records.values():
        folder.write_json(f"candidates/{r['name']}.json", r)
    import onnxruntime

    report = {
        "title": f"edgeq auto: {source.name}", "budget": budget, "metric": search.base["metric"],
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


def _fallback_search(search: _Search, prep: Prepared, best: dict, ranked: list[str], analysis, steps: list[dict], say) -> None:
    """Fewest top-ranked layers to float: start at the sensitivity analysis's guess (layers that alone break the
    outputs), grow by doubling while the budget fails, then bisect the count down to the smallest that meets it."""
    method = best["method"]
    sens = {s.node: s for s in analysis.sensitivity}
    guess = max(1, sum(1 for n in ranked if sens[n].only_quantized.sqnr_db < BROKEN_SQNR_DB))
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

    n = len(ranked)
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
        steps.append({"step": "fallback", "result": f"even all {n} layers in float miss the budget"})
        return
    while high - low > 1:
        mid = (low + high) // 2
        if trial(mid)["meets"]:
            high = mid
        else:
            low = mid
    steps.append({"step": "fallback", "result": f"{high} layer(s) in float is the fewest by rank that meets the budget"})


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


def _verdict(chosen: dict, meeting: list[dict], search: _Search, budget: float, n_layers: int, analysis, best: dict) -> dict:
    sens = {s.node: s for s in analysis.sensitivity}
    outl = {o.node: o for o in analysis.outliers}
    reasons = []
    if chosen["kind"] == "int8":
        float_layers = chosen["float_layers"]
        status = "met"
        summary = (f"{chosen['name']} meets the budget: drop {chosen['drop']:+.2f} points (≤ {budget:g}), "
                   f"{n_layers - len(float_layers)} of {n_layers} layers INT8, {chosen['p50_ms']:.2f} ms p50, "
                   f"{chosen['size_mb']:.2f} MB")
        reasons.append(f"full INT8 with the best calibration ({best['method']}) drops {best['drop']:+.2f} points"
                       + (": within the budget" if best["meets"] else ": over the budget"))
        for name in float_layers:
            s, o = sens.get(name), outl.get(name)
            why = f"kept in float: {name}"
            if s:
                why += f" — rank {s.rank} in sensitivity (only it INT8: output SQNR {s.only_quantized.sqnr_db:.1f} dB, cosine {s.only_quantized.cosine:.4f})"
            if o and o.reasons:
                why += f"; {o.reasons[0]}"
            reasons.append(why)
        faster = sorted(meeting, key=lambda r: r["p50_ms"])
        if len(faster) > 1:
            reasons.append("fastest of the candidates that meet the budget: " + ", ".join(f"{r['name']} {r['p50_ms']:.2f} ms" for r in faster))
        fp32 = search.records["fp32"]
        reasons.append(f"vs FP32: latency {chosen['p50_ms']:.2f} ms vs {fp32['p50_ms']:.2f} ms ({fp32['p50_ms'] / chosen['p50_ms']:.2f}× the speed), "
                       f"size {fp32['size_mb'] / chosen['size_mb']:.2f}× smaller")
    else:
        status = "not-met"
        fp16 = search.records.get("fp16")
        summary = f"no INT8 or mixed-precision model meets the budget of {budget:g} points"
        reasons.append(f"full INT8 ({best['method']}) drops {best['drop']:+.2f} points; returning layers to float by sensitivity did not reach the budget")
        reasons.append("recommendation: quantization-aware training (`edgeq qat` with the PyTorch model), which recovers most of the INT8 loss")
        if fp16 is not None:
            reasons.append(f"or FP16: drop {fp16['drop']:+.2f} points, {fp16['size_mb']:.2f} MB "
                           f"({'meets' if fp16['meets'] else 'misses'} the budget; on CPUs without FP16 arithmetic it is not faster)")
            if fp16["meets"]:
                status, summary = "fp16", summary + "; FP16 does, and is the chosen model"
    broken = broken_layers(analysis)
    if broken:
        reasons.insert(1 if chosen["kind"] == "int8" else 0, "layers that break INT8: " + "; ".join(f"{n} ({why})" for n, why in broken.items()))
    reasons.append(f"{search.evaluations} evaluations on the validation set (FP32 included)")
    return {"status": status, "summary": summary, "reasons": reasons, "broken_layers": list(broken)}


def print_auto(console, report: dict, output: Path | str) -> None:
    """The verdict, its reasons and the candidates table, with rich."""
    from rich.table import Table

    v = report["verdict"]
    colour = {"met": "green", "fp16": "yellow"}.get(v["status"], "red")
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
