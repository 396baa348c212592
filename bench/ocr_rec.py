"""PP-OCRv4 text recognition (SVTR-style transformer, CTC head, opset 12, dynamic width): edgeq static INT8 vs ONNX
Runtime's quantize_static on the same model and the same rendered text lines, in one run.

Per variant: per-step agreement with FP32 (argmax per CTC time step, the labels greedy decoding reads), lines read
exactly as FP32 reads them, file size, p50 latency at 1 and 2 threads (edgeq.bench, batch 1, 48×320).

    PYTHONPATH=. .venv/bin/python bench/ocr_rec.py            # prints markdown for bench/RESULTS.md
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, npz_reader, ort_preprocess  # noqa: E402

CALIB, VAL, WIDTH = 64, 128, 320
VARIANTS = ("edgeq default (--method auto)", "edgeq --method mse", "ort-static (QDQ, MinMax, per-tensor)", "ort-static per-channel")


def quantize(variant: str, fp32: Path, calib: Path, out: Path) -> str | None:
    """Writes OUT; returns the method `--method auto` chose (None for the others)."""
    import edgeq

    if variant.startswith("edgeq"):
        config = edgeq.Int8Static(method="mse") if "mse" in variant else edgeq.Int8Static()
        q = edgeq.quantize(edgeq.load(fp32), config, calib=edgeq.Dataset.from_npz(calib))
        q.save(out, force=True)
        return q.summary.calibration.get("chosen")
    from onnxruntime.quantization import QuantFormat, quantize_static

    quantize_static(ort_preprocess(fp32, out), str(out), npz_reader(calib, batch=8), quant_format=QuantFormat.QDQ, per_channel="per-channel" in variant)
    return None


def measure(work: Path, runs: int) -> list[dict]:
    from edgeq.bench import BenchConfig, benchmark
    from edgeq.model import make_session
    from edgeq.testing import zoo
    import onnx

    fp32 = work / "rec_fp32.onnx"
    fp32.write_bytes(zoo.ppocr_rec_path().read_bytes())
    calib = work / "calib.npz"
    np.savez(calib, x=zoo.render_text_lines(CALIB, WIDTH, seed=0))
    val = zoo.render_text_lines(VAL, WIDTH, seed=1)
    paths, failed, variant_label = {"FP32": fp32}, {}, {}
    for i, variant in enumerate(VARIANTS):
        path = work / f"rec_{i}.onnx"
        chosen = quantize(variant, fp32, calib, path)
        if chosen:
            variant_label[variant] = f"{variant}, chose {chosen}"
        try:
            onnx.checker.check_model(str(path))
            paths[variant] = path
        except onnx.checker.ValidationError as e:  # ORT's per-channel QDQ on an opset-12 model (DequantizeLinear axis)
            failed[variant] = str(e).splitlines()[0]
    reference = zoo.ctc_steps(make_session(onnx.load(fp32), threads=2).run(None, {"x": val})[0])
    text = zoo.ctc_decode(reference)
    latency = {}
    for threads in (1, 2):
        config = BenchConfig(threads=threads, runs=runs, warmup=3, batch=1, shapes={"x": (1, 3, 48, WIDTH)})
        latency[threads] = dict(zip(paths, benchmark(list(paths.values()), config)))
    rows = []
    for name, path in paths.items():
        steps = zoo.ctc_steps(make_session(onnx.load(path), threads=2).run(None, {"x": val})[0])
        rows.append({"variant": variant_label.get(name, name), "agreement": float(np.mean(steps == reference)),
                     "lines": float(np.mean([a == b for a, b in zip(zoo.ctc_decode(steps), text)])),
                     "size_mb": path.stat().st_size / 1e6,
                     "p50_1t": latency[1][name].latency_ms.p50, "p50_2t": latency[2][name].latency_ms.p50})
    return rows + [{"variant": name, "failed": why} for name, why in failed.items()]


def report(rows: list[dict]) -> str:
    fp32, failed = rows[0], [r for r in rows if "failed" in r]
    rows = [r for r in rows if "failed" not in r]
    table = [[r["variant"], f"{100 * r['agreement']:.2f} %", f"{100 * r['lines']:.1f} %",
              f"{r['size_mb']:.2f} ({r['size_mb'] / fp32['size_mb']:.2f}×)",
              f"{r['p50_1t']:.2f} ({r['p50_1t'] / fp32['p50_1t']:.2f}×)", f"{r['p50_2t']:.2f} ({r['p50_2t'] / fp32['p50_2t']:.2f}×)"]
             for r in rows]
    headers = ["variant", "per-step agreement", "lines decoded as FP32", "size MB (vs FP32)", "p50 ms 1 thread (vs FP32)",
               "p50 ms 2 threads (vs FP32)"]
    return "\n".join([markdown_table(headers, table), ""] + [f"- {r['variant']}: invalid model ({r['failed']})" for r in failed])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(report(measure(Path(tmp), args.runs)))


if __name__ == "__main__":
    main()
