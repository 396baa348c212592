"""The embedded default: a small CNN trained on scikit-learn's digits, taken through the whole workflow.

train (torch, seeded) → export FP32 ONNX → FP16, INT8 dynamic, INT8 static (and FP32/FP16/INT8 TFLite with the
edgeq[tflite] extra) → benchmark → validate → compare → decide → report.json + report.html; then two real pretrained
detectors (YOLOv8n, PP-PicoDet: `detection.py`) through default static INT8, judged on their boxes after NMS.
torch is imported here only, never on the ONNX paths.
"""
from __future__ import annotations

import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

IMAGE_SIZE = 32
BENCH_BATCH = 64


@dataclass
class DigitsSplit:
    """Digits upscaled to 32×32 in [0, 1]: a training split (also the calibration source) and a held-out split."""

    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray


def load_digits_split(seed: int = 0, val_fraction: float = 0.4) -> DigitsSplit:
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.stack([np.asarray(Image.fromarray((img * 255 / 16).astype(np.uint8)).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR))
                       for img in digits.images]).astype(np.float32)[:, None] / 255.0
    order = np.random.default_rng(seed).permutation(len(images))
    n_val = int(len(images) * val_fraction)
    val, train = order[:n_val], order[n_val:]
    return DigitsSplit(images[train], digits.target[train].astype(np.int64), images[val], digits.target[val].astype(np.int64))


def build_cnn():
    """Four 3×3 convolutions with BatchNorm and ReLU, two poolings, two fully connected layers (~600k parameters)."""
    from torch import nn

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(*block(1, 16), *block(16, 32), nn.MaxPool2d(2), *block(32, 64), *block(64, 64), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(64 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, 10))


def train_cnn(split: DigitsSplit, epochs: int = 8, seed: int = 0, lr: float = 1e-3):
    """Seeded initialisation and training with a progress bar; returns the model in eval mode."""
    import torch

    torch.manual_seed(seed)
    return train_classifier(build_cnn(), split, epochs=epochs, seed=seed, lr=lr, description="training the digits CNN")


def train_classifier(model, split: DigitsSplit, *, epochs: int, seed: int = 0, lr: float = 1e-3, cosine: bool = False,
                     description: str = "training"):
    """Seeded Adam with cross-entropy in batches of 64 (optionally a cosine schedule); returns the model in eval mode."""
    import torch
    from torch import nn

    from edgeq.progress import track

    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, epochs) if cosine else None
    x, y = torch.from_numpy(split.train_x), torch.from_numpy(split.train_y)
    generator = torch.Generator().manual_seed(seed)
    for _ in track(range(epochs), description, total=epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 64):
            idx = order[start:start + 64]
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            optimiser.step()
        if schedule is not None:
            schedule.step()
    return model.eval()


def export_onnx(model, path: Path) -> Path:
    """Export with a dynamic batch dimension (TorchScript exporter: one self-contained file)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 1, IMAGE_SIZE, IMAGE_SIZE),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path


def run_demo(output: Path, *, epochs: int = 8, force: bool = False, console: Console | None = None, qat: bool = True,
             detection: bool = True) -> dict:
    """Run the whole workflow into `output`; returns the report dict (also written as report.json/report.html)."""
    import edgeq
    from edgeq.report import ReportFolder

    console = console or Console()
    folder = ReportFolder(Path(output), force=force)
    split = load_digits_split()
    console.print(f"digits: {len(split.train_x)} training / {len(split.val_x)} held-out images, {IMAGE_SIZE}×{IMAGE_SIZE}")
    with tempfile.TemporaryDirectory() as tmp:
        model = train_cnn(split, epochs=epochs)
        fp32 = edgeq.load(export_onnx(model, Path(tmp) / "fp32.onnx"))
        fp32.path = fp32.save(folder.path("models/fp32.onnx"), force=True)
    calib = edgeq.Dataset.from_arrays({"input": split.train_x[:512]}, description="calibration (512 training images)")
    val = edgeq.Dataset.from_arrays({"input": split.val_x}, labels=split.val_y, description="held-out digits")
    candidates = {
        "fp16": edgeq.Fp16(),
        "int8-dynamic": edgeq.Int8Dynamic(),
        "int8-static": edgeq.Int8Static(),
    }
    paths = {"fp32": fp32.path}
    summaries = {}
    for name, config in candidates.items():
        q = edgeq.quantize(fp32, config, calib=calib if isinstance(config, edgeq.Int8Static) else None)
        paths[name] = q.save(folder.path(f"models/{name}.onnx"), force=True)
        summaries[name] = q.summary.to_dict()
    tflite_rows(fp32, calib, folder, paths, summaries, console)
    case = qat_case(model, split, fp32, calib, val, folder, paths, summaries, console) if qat else None
    report = measure(paths, val, summaries)
    if case is not None:
        report["qat"] = qat_report(case, report)
    if detection:
        from edgeq.demo.detection import detection_rows

        report["detection"] = detection_rows(folder, console)
    folder.write_json("report.json", {k: v for k, v in report.items() if k != "plot_svg"})
    from edgeq.report import render_html

    folder.write_text("report.html", render_html(report))
    print_demo_table(console, report)
    if report.get("qat"):
        print_qat_story(console, report["qat"])
    if report.get("detection"):
        from edgeq.demo.detection import print_detection_table

        print_detection_table(console, report["detection"])
    console.print(f"report: {folder.path('report.html')}")
    return report


def tflite_rows(fp32, calib, folder, paths: dict, summaries: dict, console: Console) -> None:
    """FP32, FP16 and INT8 (edgeq's ranges) TFLite files next to the ONNX models, when the edgeq[tflite] extra is
    installed; fixed at the benchmark's batch, so LiteRT and ONNX Runtime are timed on the same work."""
    from importlib.util import find_spec

    if not all(find_spec(m) for m in ("ai_edge_litert", "litert_torch", "ai_edge_quantizer")):
        console.print("TFLite rows left out: install the extra (pip install 'edgeq[tflite]') to add them", highlight=False)
        return
    from collections import Counter

    from edgeq.export import export_tflite
    from edgeq.runtimes.litert import load

    for precision in ("fp32", "fp16", "int8"):
        name = f"tflite-{precision}"
        int8 = precision == "int8"   # full integer, int8 model I/O included: every tensor of the file int8/int32
        result = export_tflite(fp32, folder.path(f"models/{name}.tflite"), precision, calib if int8 else None,
                               batch=BENCH_BATCH, io="int8" if int8 else "float", force=True)
        paths[name] = result.path
        notes = [f"LiteRT: FP32 conversion within {result.fp32_max_abs_diff:.2g} of ONNX Runtime"] + result.notes
        if result.ranges:
            notes.append(f"activation ranges: {result.ranges} on {result.calibration_samples} samples")
        # INT8 is full integer (every op), FP16 casts the weights of convolutions and fully connected layers
        ops = Counter(op for op in load(result.path).op_types() if precision == "int8" or op in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"))
        summaries[name] = {"quantized": dict(ops) if precision != "fp32" else {}, "notes": notes, "warnings": []}


# Edge targets whose kernels cannot do per-channel int8 weights: per-tensor weights (many NPUs and microcontroller
# kernels) and 4-bit weights with 8-bit activations. The demo measures PTQ on each, mildest first, and takes the
# first that loses more than the ship threshold: the QAT case is found by measurement, never planted.
EDGE_SETTINGS = {
    "int8-per-tensor": dict(per_channel=False),
    "w4a8-per-channel": dict(weight_bits=4),
    "w4a8-per-tensor": dict(per_channel=False, weight_bits=4),
}
QAT_EPOCHS = 2
QAT_LR = 1e-4
EARLY_STOP_FRACTION = 0.1


def qat_case(model, split: DigitsSplit, fp32, calib, val, folder, paths: dict, summaries: dict, console: Console) -> dict:
    """PTQ on the edge settings until one loses > 1 point; then QAT on that setting, exported next to the others."""
    import edgeq
    from edgeq import qat
    from edgeq.decide import DecisionRule
    from edgeq.evaluate import validate

    rule = DecisionRule()
    base = validate(fp32.path, val, batch_size=BENCH_BATCH).value
    tried = []
    for name, options in EDGE_SETTINGS.items():
        config = edgeq.Int8Static(**options)
        q = edgeq.quantize(fp32, config, calib=calib)
        value = validate(q, val, batch_size=BENCH_BATCH).value
        tried.append({"setting": name, "ptq_top1": value, "drop": base - value})
        if base - value > rule.ship_below:
            break
    else:
        console.print("QAT case: PTQ loses ≤ 1 point on every edge setting tried "
                      "(" + ", ".join(f"{t['setting']} {t['drop']:+.2f}" for t in tried) + "): nothing for QAT to recover")
        return {"tried": tried, "setting": None}
    name = tried[-1]["setting"]
    console.print(f"QAT case: PTQ with {name} weights loses {tried[-1]['drop']:.2f} points; quantization-aware training…")
    paths[f"{name}-ptq"] = q.save(folder.path(f"models/{name}-ptq.onnx"), force=True)
    summaries[f"{name}-ptq"] = q.summary.to_dict()
    n_stop = int(len(split.train_x) * EARLY_STOP_FRACTION)
    stop, train = slice(len(split.train_x) - n_stop, None), slice(0, len(split.train_x) - n_stop)
    prepared = qat.prepare(model, config, calib=split.train_x[:512])
    history = qat.finetune(prepared, (split.train_x[train], split.train_y[train]), (split.train_x[stop], split.train_y[stop]),
                           epochs=QAT_EPOCHS, lr=QAT_LR)
    paths[f"{name}-qat"] = qat.export(prepared, folder.path(f"models/{name}-qat.onnx"), force=True)
    summary = dict(summaries[f"{name}-ptq"])
    summary["notes"] = [*summary.get("notes", []), f"QAT: {history.best_epoch} of {len(history.history) - 1} epochs kept (early stop on "
                        f"{n_stop} training images), Adam lr {QAT_LR:g} cosine, fake quant initialised from the PTQ calibration"]
    summaries[f"{name}-qat"] = summary
    return {"tried": tried, "setting": name, "config": {"per_channel": config.per_channel, "weight_bits": config.weight_bits},
            "finetune": history.to_dict()}


def qat_report(case: dict, report: dict) -> dict:
    """FP32, PTQ and QAT of the chosen setting side by side, the verdict before and after, the share recovered."""
    if case["setting"] is None:
        return case
    rows = {m["name"]: m for m in report["models"]}
    fp32, ptq, qat = rows["fp32"], rows[f"{case['setting']}-ptq"], rows[f"{case['setting']}-qat"]
    lost = fp32["metric_value"] - ptq["metric_value"]
    recovered = (qat["metric_value"] - ptq["metric_value"]) / lost if lost > 0 else None
    return {**case, "fp32": fp32["metric_value"], "ptq": ptq["metric_value"], "qat": qat["metric_value"],
            "ptq_drop": ptq["drop"], "qat_drop": qat["drop"], "verdict_before": ptq["verdict"], "verdict_after": qat["verdict"],
            "recovered_fraction": recovered, "ptq_p50_ms": ptq["p50_ms"], "qat_p50_ms": qat["p50_ms"],
            "qat_size_ratio": qat["size_ratio"], "qat_speedup": qat["speedup"]}


def print_qat_story(console: Console, case: dict) -> None:
    if case["setting"] is None:
        return
    share = "" if case["recovered_fraction"] is None else f", {case['recovered_fraction'] * 100:.0f}% of the loss recovered"
    console.print(f"[bold]QAT case ({case['setting']}):[/] FP32 {case['fp32']:.2f} → PTQ {case['ptq']:.2f} "
                  f"(drop {case['ptq_drop']:+.2f}, {case['verdict_before']}) → QAT {case['qat']:.2f} "
                  f"(drop {case['qat_drop']:+.2f}, {case['verdict_after']}){share}; QAT model {case['qat_size_ratio']:.2f}× the FP32 size, "
                  f"{case['qat_speedup']:.2f}× its speed on ONNX Runtime CPU", highlight=False)


def measure(paths: dict[str, Path], val, summaries: dict[str, dict]) -> dict:
    """Benchmark, validate and compare every model against FP32; assemble the report."""
    import onnxruntime

    from edgeq.bench import BenchConfig, benchmark
    from edgeq.decide import DecisionRule
    from edgeq.evaluate import compare, validate
    from edgeq.report import tradeoff_svg

    names = list(paths)
    bench = benchmark([paths[n] for n in names], BenchConfig(threads=1, runs=30, warmup=5, batch=BENCH_BATCH))
    bench_dicts = {n: r.to_dict() for n, r in zip(names, bench)}
    results = {n: validate(paths[n], val, batch_size=BENCH_BATCH).to_dict() for n in names}
    rule = DecisionRule()
    base = results["fp32"]
    rows = []
    for n in names:
        b = bench_dicts[n]
        row = {
            "name": n, "path": str(paths[n]), "size_mb": b["size_bytes"] / 1e6,
            "size_ratio": b["size_bytes"] / bench_dicts["fp32"]["size_bytes"],
            "p50_ms": b["latency_ms"]["p50"], "p90_ms": b["latency_ms"]["p90"], "p99_ms": b["latency_ms"]["p99"],
            "speedup": bench_dicts["fp32"]["latency_ms"]["p50"] / b["latency_ms"]["p50"], "peak_rss_mb": b["peak_rss_mb"],
            "metric": results[n]["metric"], "metric_value": results[n]["value"], "metric_ci95": results[n]["ci95"],
            "bench": b, "validation": {k: v for k, v in results[n].items() if k not in ("per_sample", "predictions")},
        }
        if n != "fp32":
            comparison = compare(base, results[n], rule).to_dict()
            row.update(drop=comparison["drop"], drop_ci95=comparison["drop_ci95"], verdict=comparison["verdict"], comparison=comparison)
            summary = summaries[n]
            row["summary"] = summary
            row["details"] = ([f"quantized: {', '.join(f'{k} ×{v}' for k, v in summary['quantized'].items()) or 'none'}"]
                              + summary["notes"] + [f"warning: {w}" for w in summary["warnings"]] + comparison["reasons"])
        rows.append(row)
    static = next(r for r in rows if r["name"] == "int8-static")
    return {
        "title": "edgeq demo: digits CNN, FP32 vs FP16 vs INT8",
        "headline": {"model": "int8-static", "verdict": static["verdict"], "reasons": static["comparison"]["reasons"]},
        "models": rows,
        "decision_rule": {"ship_below": rule.ship_below, "qat_up_to": rule.qat_up_to},
        "environment": {"onnxruntime": onnxruntime.__version__, "machine": platform.machine(), "processor": platform.processor() or "unknown",
                        "threads": 1, "batch": BENCH_BATCH, "validation samples": base["samples"]},
        "plot_svg": tradeoff_svg(rows),
    }


def print_demo_table(console: Console, report: dict) -> None:
    table = Table(title=report["title"])
    for col in ("model", "size MB", "size ratio", "p50 ms (1 thread)", "speed-up", f"{report['models'][0]['metric']} [95% CI]", "drop [paired 95% CI]", "verdict"):
        table.add_column(col, justify="right" if col != "model" else "left", no_wrap=col == "model")
    for m in report["models"]:
        drop = "—" if m.get("drop") is None else f"{m['drop']:+.2f} [{m['drop_ci95'][0]:+.2f}, {m['drop_ci95'][1]:+.2f}]"
        table.add_row(m["name"], f"{m['size_mb']:.2f}", f"{m['size_ratio']:.2f}×", f"{m['p50_ms']:.2f}", f"{m['speedup']:.2f}×",
                      f"{m['metric_value']:.2f} [{m['metric_ci95'][0]:.2f}, {m['metric_ci95'][1]:.2f}]", drop, m.get("verdict", "baseline"))
    console.print(table)
    head = report["headline"]
    console.print(f"[bold]verdict for {head['model']}: {head['verdict']}[/]")
    for reason in head["reasons"]:
        console.print(f"  • {reason}", highlight=False)
