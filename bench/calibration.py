"""Calibration: edgeq's streaming observers vs ONNX Runtime's MinMax, Entropy and Percentile calibrators, in one run.

Same model (the demo's digits CNN, trained here, seeded), same calibration data (digits training images plus
deterministic 1-2 pixel shifts, so that 2000 different samples exist), same quantization types (per-channel int8
weights, uint8 activations, QDQ). Per calibration size (100, 500, 2000) and method: wall time and peak memory of the
quantization (each in its own process, VmHWM), top-1 on the held-out digits and agreement with FP32's top-1.

    PYTHONPATH=. .venv/bin/python bench/calibration.py          # prints markdown for bench/RESULTS.md
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, markdown_table, peak_rss_mb, run_child  # noqa: E402

SIZES = (100, 500, 2000)
EDGEQ = ("minmax", "percentile", "entropy", "mse", "auto")
ORT = ("MinMax", "Entropy", "Percentile")
BATCH = 20  # divides every size: ONNX Runtime's histogram calibrators crash on a smaller last batch


def child(variant: str, model: str, calib: str, out: str) -> None:
    """Quantize once; report the whole wall time (imports included, as a user's process pays them), the calibration
    phase alone (running the model over the data and computing the ranges) and the peak memory."""
    import time

    start = time.perf_counter()
    if variant.startswith("edgeq-"):
        import edgeq

        config = edgeq.Int8Static(method=variant.removeprefix("edgeq-"), batch_size=BATCH)
        quantized = edgeq.quantize(edgeq.load(model), config, calib=edgeq.Dataset.from_npy_dir(calib))
        quantized.save(out, force=True)
        calibration_seconds = quantized.summary.calibration["seconds"]
        chosen = quantized.summary.calibration.get("chosen")
    else:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        phase = timed_ort_calibration()
        method = getattr(CalibrationMethod, variant.removeprefix("ort-"))
        # the same batches for ONNX Runtime (its histogram calibrators crash when the last batch is smaller)
        quantize_static(model, out, npy_dir_reader(Path(calib)), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=method)
        calibration_seconds, chosen = phase["end"] - phase["start"], None
    emit({"seconds": time.perf_counter() - start, "calibration_seconds": calibration_seconds, "peak_rss_mb": peak_rss_mb(),
          "chosen": chosen})


def timed_ort_calibration() -> dict:
    """Time ONNX Runtime's calibration phase inside quantize_static: from building the calibrator (graph
    augmentation, session) to the end of compute_data (the ranges), the same span edgeq reports."""
    import time

    from onnxruntime.quantization import quantize as ort_quantize

    phase: dict = {}
    build = ort_quantize.create_calibrator

    def create_calibrator(*args, **kwargs):
        phase["start"] = time.perf_counter()
        calibrator = build(*args, **kwargs)
        compute = calibrator.compute_data

        def compute_data():
            ranges = compute()
            phase["end"] = time.perf_counter()
            return ranges

        calibrator.compute_data = compute_data
        return calibrator

    ort_quantize.create_calibrator = create_calibrator
    return phase


def npy_dir_reader(folder: Path):
    """An ONNX Runtime CalibrationDataReader over the same files, one batch per file, read as it goes."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.files = iter(sorted(folder.glob("*.npy")))

        def get_next(self):
            path = next(self.files, None)
            return None if path is None else {"input": np.load(path, allow_pickle=False)}

    return Reader()


def write_batches(images: np.ndarray, folder: Path) -> Path:
    """The calibration set as one .npy file per batch of BATCH images: both quantizers stream it from disk, so a
    process's peak memory is its calibrator's, not a copy of the whole set."""
    folder.mkdir()
    for i in range(0, len(images), BATCH):
        np.save(folder / f"{i // BATCH:05d}.npy", images[i:i + BATCH])
    return folder


def calibration_pool(split, n: int) -> np.ndarray:
    """n different images: the training split, then copies shifted by one or two pixels (deterministic)."""
    images = [split.train_x]
    shifts = [(dy, dx) for dy in (-2, -1, 0, 1, 2) for dx in (-2, -1, 0, 1, 2) if (dy, dx) != (0, 0)]
    for dy, dx in shifts:
        if sum(len(i) for i in images) >= n:
            break
        images.append(np.roll(split.train_x, (dy, dx), axis=(2, 3)))
    pool = np.concatenate(images)
    return pool[np.random.default_rng(0).permutation(len(pool))[:n]]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        child(*sys.argv[2:6])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    import edgeq
    from edgeq.demo import export_onnx, load_digits_split, train_cnn
    from edgeq.quantize.int8 import output_sqnr

    split = load_digits_split()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        fp32 = export_onnx(train_cnn(split), work / "digits_fp32.onnx")
        fp32_logits = edgeq.load(fp32).session(threads=2).run(None, {"input": split.val_x})[0]
        reference = fp32_logits.argmax(1)
        fp32_top1 = float((reference == split.val_y).mean() * 100)
        for n in sizes:
            calib = write_batches(calibration_pool(split, n), work / f"calib_{n}")
            for variant in [f"edgeq-{m}" for m in EDGEQ] + [f"ort-{m}" for m in ORT]:
                out = work / f"{variant}_{n}.onnx"
                stats = run_child([__file__, "_child", variant, str(fp32), str(calib), str(out)])
                logits = edgeq.load(out).session(threads=2).run(None, {"input": split.val_x})[0]
                pred = logits.argmax(1)
                row = {"samples": n, "variant": variant, "seconds": stats["seconds"], "calibration_seconds": stats["calibration_seconds"],
                       "peak_mb": stats["peak_rss_mb"],
                       "sqnr": output_sqnr([[fp32_logits]], [[logits]]),
                       "top1": float((pred == split.val_y).mean() * 100), "agree": float((pred == reference).mean() * 100)}
                if stats["chosen"]:
                    row["chosen"] = stats["chosen"]
                rows.append(row)
                print(row, file=sys.stderr, flush=True)
    print(report(rows, fp32_top1, len(split.val_y)))


def report(rows: list[dict], fp32_top1: float, val: int) -> str:
    table = [[r["samples"], r["variant"] + (f" (chose {r['chosen']})" if r.get("chosen") else ""), f"{r['seconds']:.2f}",
              f"{r['calibration_seconds']:.2f}", f"{r['peak_mb']:.0f}", f"{r['top1']:.2f}", f"{r['agree']:.2f}", f"{r['sqnr']:.1f}"] for r in rows]
    lines = [f"FP32 top-1 {fp32_top1:.2f}% on {val} held-out digits.", "",
             markdown_table(["calibration samples", "variant", "quantize s (whole process)", "calibration s", "peak MB", "top-1 %", "agrees with FP32 %",
                                   "logit SQNR vs FP32 dB"], table), ""]
    by = {(r["variant"], r["samples"]): r for r in rows}
    sizes = sorted({r["samples"] for r in rows})
    lo, hi = sizes[0], sizes[-1]
    for variant in dict.fromkeys(r["variant"] for r in rows):
        a, b = by[(variant, lo)], by[(variant, hi)]
        lines.append(f"- {variant}: peak memory {a['peak_mb']:.0f} → {b['peak_mb']:.0f} MB from {lo} to {hi} samples "
                     f"({(b['peak_mb'] / a['peak_mb'] - 1) * 100:+.1f}%), time {a['seconds']:.1f} → {b['seconds']:.1f} s")
    for n in sizes:
        ours, theirs = by[("edgeq-entropy", n)], by[("ort-Entropy", n)]
        lines.append(f"- {n} samples: edgeq entropy calibration {theirs['calibration_seconds'] / ours['calibration_seconds']:.1f}× faster "
                     f"than ONNX Runtime's Entropy ({theirs['seconds'] / ours['seconds']:.1f}× for the whole process); "
                     f"best edgeq top-1 {max(by[(f'edgeq-{m}', n)]['top1'] for m in EDGEQ):.2f}% vs best ONNX Runtime "
                     f"{max(by[(f'ort-{m}', n)]['top1'] for m in ORT):.2f}%; best logit SQNR edgeq "
                     f"{max(by[(f'edgeq-{m}', n)]['sqnr'] for m in EDGEQ):.1f} dB vs ONNX Runtime {max(by[(f'ort-{m}', n)]['sqnr'] for m in ORT):.1f} dB")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
