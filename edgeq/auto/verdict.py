"""`auto`'s account of itself: the verdict (status, summary, reasons), the layers that break INT8, what the budget
means on a fidelity metric, the report it writes, and the verdict printed with rich."""
from __future__ import annotations

import platform
import time
from pathlib import Path
from edgeq.auto.candidates import Candidate
from edgeq.sqnr import BROKEN_SQNR_DB


def metric_note(base: dict, budget: float, labelled: bool) -> str | None:
    """What the budget means when the metric is fidelity to the FP32 model (no labels); None with labels."""
    if base["metric"] in ("map50", "map50_95"):
        return (f"Metric: mAP@0.5 on the ground-truth boxes (--labels), after the detector's decoding and NMS; a budget of "
                f"{budget:g} points lets mAP fall by {budget / 100:g}")
    if base["metric"] == "box_f1":
        return (f"Metric: no ground truth, so box agreement with the FP32 model: F1 of each candidate's boxes against FP32's "
                f"at IoU 0.5 after the same decoding and NMS; a budget of {budget:g} points is {budget / 100:g} of F1: a "
                f"candidate meets it at F1 ≥ {1 - budget / 100:g}")
    if labelled:
        return None
    where = f" (output {base['output']})" if base.get("output") else ""
    if base["metric"] == "cosine":
        return (f"Metric: no labels, so fidelity to the FP32 model: cosine of each candidate's outputs to FP32's{where}; "
                f"a budget of {budget:g} points is {budget / 100:g} of cosine: a candidate meets it at ≥ {1 - budget / 100:g}")
    return (f"Metric: no labels, so top-1 agreement with the FP32 model{where}: a budget of {budget:g} points "
            f"lets {budget:g}% of the validation samples change their top class")


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


def assemble_verdict(chosen: Candidate, meeting: list[Candidate], search, budget: float, n_layers: int, analysis, best: Candidate,
            notes: list[str], qat_hint: str | None) -> dict:
    """Status, one-line summary and the reasons: what full INT8 did, what each search step found, why the chosen
    model (or the recommendation when none meets). `search` gives the records by name and the evaluation count."""
    reasons = [f"full INT8 with the best calibration ({best.recipe.method}) drops {best.drop:+.2f} points"
               + (": within the budget" if best.meets else ": over the budget"), *notes]
    fp32, fp16 = search.records["fp32"], search.records.get("fp16")
    quantized = [c for c in meeting if c.recipe.quantized]
    kind = chosen.recipe.kind
    if chosen.recipe.quantized:
        status = "met"
        how = f"{n_layers - len(chosen.recipe.float_layers)} of {n_layers} layers INT8" if kind == "int8" else \
            f"all {n_layers} layers INT8 after quantization-aware training"
        summary = (f"{chosen.name} meets the budget: drop {chosen.drop:+.2f} points (≤ {budget:g}), {how}, "
                   f"{chosen.p50_ms:.2f} ms p50, {chosen.size_mb:.2f} MB")
        reasons += [_float_reason(name, analysis) for name in chosen.recipe.float_layers]
        reasons += _speed_reasons(chosen, meeting, fp32)
    elif kind == "fp16":
        status = "fp16"
        summary = (f"fp16 is the fastest model within the budget: drop {chosen.drop:+.2f} points, "
                   f"{_speed(chosen, fp32)}× FP32's speed, {chosen.size_mb:.2f} MB")
        if quantized:
            q = min(quantized, key=lambda c: c.p50_ms)
            summary += f"; {q.name} meets the budget at {_speed(q, fp32)}× FP32's speed"
        else:
            summary = f"no INT8 or mixed-precision model meets the budget of {budget:g} points; " + summary
            reasons += [qat_hint] if qat_hint else []
        reasons += _speed_reasons(chosen, meeting, fp32)
    elif quantized:
        status = "fp32"
        q = min(quantized, key=lambda c: c.p50_ms)
        summary = (f"nothing beats FP32: the fastest quantized candidate within the budget, {q.name}, runs at "
                   f"{_speed(q, fp32)}× FP32's speed ({q.p50_ms:.2f} vs {fp32.p50_ms:.2f} ms p50); FP32 is the chosen model")
        reasons += _speed_reasons(chosen, meeting, fp32)[:-1]
    else:
        status = "fp32" if fp16 is not None and fp16.meets else "not-met"
        summary = (f"no INT8{', QAT' if 'qat' in search.records else ''} or mixed-precision model meets the budget of "
                   f"{budget:g} points; nothing beats FP32")
        others = [c for c in search.records.values() if c.recipe.kind != "fp32" and c.p50_ms]
        if others:
            q = min(others, key=lambda c: c.p50_ms)
            summary += (f" (the fastest candidate, {q.name}, runs at {_speed(q, fp32)}× FP32's speed and "
                        f"{'meets' if q.meets else 'misses'} the budget: drop {q.drop:+.2f}); FP32 is the chosen model")
        if qat_hint:
            reasons.append(qat_hint)
    if fp16 is not None:
        reasons.append(f"FP16: drop {fp16.drop:+.2f} points, {fp16.size_mb:.2f} MB, {_speed(fp16, fp32)}× FP32's speed "
                       f"({'meets' if fp16.meets else 'misses'} the budget; on CPUs without FP16 arithmetic it is not faster)")
    broken = broken_layers(analysis)
    if broken:
        reasons.insert(1, "layers that break INT8: " + "; ".join(f"{n} ({why})" for n, why in broken.items()))
    reasons.append(f"{search.evaluations} evaluations on the validation set (FP32 included)")
    return {"status": status, "summary": summary, "reasons": reasons, "broken_layers": list(broken)}


def _speed(candidate: Candidate, fp32: Candidate) -> str:
    return f"{fp32.p50_ms / candidate.p50_ms:.2f}"


def _float_reason(name: str, analysis) -> str:
    s = next((s for s in analysis.sensitivity if s.node == name), None)
    o = next((o for o in analysis.outliers if o.node == name), None)
    why = f"kept in float: {name}"
    if s:
        why += f" — rank {s.rank} in sensitivity (only it INT8: output SQNR {s.only_quantized.sqnr_db:.1f} dB, cosine {s.only_quantized.cosine:.4f})"
    if o and o.reasons:
        why += f"; {o.reasons[0]}"
    return why


def _speed_reasons(chosen: Candidate, meeting: list[Candidate], fp32: Candidate) -> list[str]:
    out = []
    faster = sorted(meeting, key=lambda c: c.p50_ms)
    if len(faster) > 1:
        out.append("fastest of the candidates that meet the budget: " + ", ".join(f"{c.name} {c.p50_ms:.2f} ms" for c in faster))
    if chosen is not faster[0]:
        out.append(f"{chosen.name} has the layers in float of {faster[0].name}, so the same kernels: the more accurate of the two is kept")
    out.append(f"vs FP32: latency {chosen.p50_ms:.2f} ms vs {fp32.p50_ms:.2f} ms ({fp32.p50_ms / chosen.p50_ms:.2f}× the speed), "
               f"size {fp32.size_mb / chosen.size_mb:.2f}× smaller")
    return out


def assemble_report(title: str, budget: float, labelled: bool, search, verdict: dict, chosen: Candidate, analysis, *,
                    calib_samples: int, n_layers: int, steps: list[dict], threads: int, batch: int, workers: int,
                    started: float) -> dict:
    """report.json: the verdict, the search steps, every candidate (without its comparison reasons), the analysis
    and where it ran."""
    import onnxruntime

    base = search.base
    return {
        "title": title, "budget": budget, "metric": base["metric"], "metric_note": metric_note(base, budget, labelled=labelled),
        "verdict": verdict, "chosen": chosen.name, "evaluations": search.evaluations,
        "evaluations_note": f"{search.evaluations} validation runs (FP32 included) on {base['samples']} samples; "
                            f"sensitivity: {2 * len(analysis.sensitivity)} quantize-and-run passes on {min(128, calib_samples)} calibration samples",
        "layers": n_layers, "search": steps,
        "candidates": [c.to_dict(reasons=False) for c in search.records.values()],
        "analysis": analysis.to_dict(),
        "environment": {"onnxruntime": onnxruntime.__version__, "machine": platform.machine(), "threads": threads,
                        "batch": batch, "validation samples": base["samples"], "workers": workers},
        "wall_s": round(time.perf_counter() - started, 2),
    }


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
