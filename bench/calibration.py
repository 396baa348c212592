"""Calibration: edgeq's streaming observers vs ONNX Runtime's MinMax, Entropy and Percentile calibrators, in one run.

Two models. The demo's digits CNN (trained here, seeded): calibration on digits training images plus deterministic
1-2 pixel shifts (so that 2000 different samples exist), per-channel int8 weights and uint8 activations for both,
100 / 500 / 2000 samples; top-1 on the held-out digits, agreement with FP32 and logit SQNR. PP-OCRv4 det (the
rapidocr package's): rendered text pages, 16 / 64 samples (ONNX Runtime keeps every activation of every sample in
memory: 64 pages already take GBs); probability-map MAD, text-region IoU and cosine against FP32.
Per variant: wall time of the whole quantizing process and of its calibration phase alone (running the model over
the data and computing ranges), and peak memory (each quantization in its own process, VmHWM; digits: the median
time of 5 processes).

    PYTHONPATH=. .venv/bin/python bench/calibration.py          # prints markdown for bench/RESULTS.md
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, markdown_table, ort_preprocess, peak_rss_mb, run_child  # noqa: E402

SIZES = (100, 500, 2000)
EDGEQ = ("minmax", "percentile", "entropy", "mse", "auto")
ORT = ("MinMax", "Entropy", "Percentile")
BATCH = 20  # divides every size: ONNX Runtime's histogram calibrators crash on a smaller last batch
OCR_SIZES, OCR_SIDE, OCR_VAL, OCR_BATCH = (16, 64), 256, 8, 4
DIGITS_REPEATS = 5  # the digits runs take tenths of a second: the median of 5 processes steadies the ratios


def child(variant: str, model: str, calib: str, out: str, ort_per_channel: str = "1") -> None:
    """Quantize once; report the whole wall time (imports included, as a user's process pays them), the calibration
    phase alone (running the model over the data and computing the ranges) and the peak memory."""
    import time

    start = time.perf_counter()
    if variant.startswith("edgeq-"):
        import edgeq

        batch = len(np.load(min(Path(calib).glob("*.npy")), mmap_mode="r"))  # the batch the files hold, as ORT reads them
        config = edgeq.Int8Static(method=variant.removeprefix("edgeq-"), batch_size=batch)
        quantized = edgeq.quantize(edgeq.load(model), config, calib=edgeq.Dataset.from_npy_dir(calib))
        quantized.save(out, force=True)
        calibration_seconds = quantized.summary.calibration["seconds"]
        chosen = quantized.summary.calibration.get("chosen")
    else:
        import onnx
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        pre = ort_preprocess(model, out)
        phase = timed_ort_calibration()
        method = getattr(CalibrationMethod, variant.removeprefix("ort-"))
        # the same batches for ONNX Runtime (its histogram calibrators crash when the last batch is smaller)
        quantize_static(pre, out, npy_dir_reader(Path(calib), onnx.load(model, load_external_data=False).graph.input[0].name), quant_format=QuantFormat.QDQ, per_channel=ort_per_channel == "1",
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=method)
        calibration_seconds, chosen = phase["end"] - phase["start"], None
    emit({"seconds": time.perf_counter() - start, "calibration_seconds": calibration_seconds, "peak_rss_mb": peak_rss_mb(),
          "chosen": chosen})


def timed_ort_calibration() -> dict:
    """Time ONNX Runtime's calibration phase inside quantize_static: from building the calibrator (graph
    augmentation, session) to the end of compute_data (the ranges), the same span edgeq reports."""
    import time

    import onnxruntime.quantization  # noqa: F401 - loads the module whose name the package's quantize() shadows

    ort_quantize = sys.modules["onnxruntime.quantization.quantize"]
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


def npy_dir_reader(folder: Path, input_name: str):
    """An ONNX Runtime CalibrationDataReader over the same files, one batch per file, read as it goes."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.files = iter(sorted(folder.glob("*.npy")))

        def get_next(self):
            path = next(self.files, None)
            return None if path is None else {input_name: np.load(path, allow_pickle=False)}

    return Reader()


def write_batches(images: np.ndarray, folder: Path, batch: int = BATCH) -> Path:
    """The calibration set as one .npy file per batch of BATCH images: both quantizers stream it from disk, so a
    process's peak memory is its calibrator's, not a copy of the whole set."""
    folder.mkdir()
    for i in range(0, len(images), batch):
        np.save(folder / f"{i // batch:05d}.npy", images[i:i + batch])
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
        child(*sys.argv[2:7])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="digits CNN calibration sizes")
    parser.add_argument("--ocr-sizes", default=",".join(map(str, OCR_SIZES)), help="PP-OCR det calibration sizes ('' skips it)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        parts = [digits_part(work, [int(s) for s in args.sizes.split(",")])]
        if args.ocr_sizes:
            parts.append(ocr_part(work, [int(s) for s in args.ocr_sizes.split(",")]))
    print("\n\n".join(parts))


def quantize_all(fp32: Path, calib: Path, n: int, work: Path, ort_per_channel: bool = True, repeats: int = 1) -> list[tuple[dict, Path]]:
    """Every variant on the same files, each in its own process, `repeats` times (times: the median run; peak
    memory: the largest): (figures, quantized model path)."""
    done = []
    for variant in [f"edgeq-{m}" for m in EDGEQ] + [f"ort-{m}" for m in ORT]:
        out = work / f"{fp32.stem}_{variant}_{n}.onnx"
        runs = [run_child([__file__, "_child", variant, str(fp32), str(calib), str(out), "1" if ort_per_channel else "0"])
                for _ in range(repeats)]
        row = {"samples": n, "variant": variant, "seconds": float(np.median([r["seconds"] for r in runs])),
               "calibration_seconds": float(np.median([r["calibration_seconds"] for r in runs])),
               "peak_mb": max(r["peak_rss_mb"] for r in runs)}
        if runs[0]["chosen"]:
            row["chosen"] = runs[0]["chosen"]
        done.append((row, out))
    return done


def digits_part(work: Path, sizes: list[int]) -> str:
    import edgeq
    from edgeq.demo import export_onnx, load_digits_split, train_cnn
    from edgeq.quantize.int8 import output_sqnr

    split = load_digits_split()
    fp32 = export_onnx(train_cnn(split), work / "digits_fp32.onnx")
    fp32_logits = edgeq.load(fp32).session(threads=2).run(None, {"input": split.val_x})[0]
    reference = fp32_logits.argmax(1)
    rows = []
    for n in sizes:
        calib = write_batches(calibration_pool(split, n), work / f"calib_{n}")
        for row, out in quantize_all(fp32, calib, n, work, repeats=DIGITS_REPEATS):
            logits = edgeq.load(out).session(threads=2).run(None, {"input": split.val_x})[0]
            pred = logits.argmax(1)
            row.update(quality=f"{(pred == split.val_y).mean() * 100:.2f}", agree=f"{(pred == reference).mean() * 100:.2f}",
                       sqnr=output_sqnr([[fp32_logits]], [[logits]]), score=float((pred == split.val_y).mean() * 100))
            rows.append(row)
            print(row, file=sys.stderr, flush=True)
    heading = (f"**digits CNN** — FP32 top-1 {(reference == split.val_y).mean() * 100:.2f}% on {len(split.val_y)} held-out digits; "
               "both quantizers per-channel int8 weights, uint8 activations.")
    return report(rows, heading, ["top-1 %", "agrees with FP32 %", "logit SQNR vs FP32 dB"], ["quality", "agree", "sqnr"], "top-1")


def ocr_part(work: Path, sizes: list[int]) -> str:
    """PP-OCRv4 det (a real model: where methods differ): rendered text pages, probability map vs FP32."""
    import edgeq
    from edgeq.testing import zoo
    from edgeq.evaluate import validate

    fp32 = work / "ppocr_det.onnx"
    fp32.write_bytes(zoo.ppocr_det_path().read_bytes())
    val = edgeq.Dataset.from_arrays({"x": zoo.render_text_images(OCR_VAL, height=OCR_SIDE, width=OCR_SIDE, seed=1)})
    rows = []
    for n in sizes:
        pages = zoo.render_text_images(n, height=OCR_SIDE, width=OCR_SIDE, seed=0)
        calib = write_batches(pages, work / f"ocr_calib_{n}", batch=OCR_BATCH)
        # ONNX Runtime's per-channel QDQ model fails to load on PP-OCR (ANCHORS.md): its per-tensor weights are used
        for row, out in quantize_all(fp32, calib, n, work, ort_per_channel=False):
            metrics = validate(out, val, reference=fp32, batch_size=4).to_dict()["metrics"]
            row.update(quality=f"{metrics['mean_abs_diff']['value']:.4f}", agree=f"{metrics['iou@0.3']['value']:.3f}",
                       sqnr=metrics["cosine"]["value"], score=metrics["iou@0.3"]["value"])
            rows.append(row)
            print(row, file=sys.stderr, flush=True)
    heading = (f"**PP-OCRv4 det** — {OCR_SIDE}×{OCR_SIDE} rendered text pages (calibration seed 0, {OCR_VAL} validation pages seed 1); "
               "edgeq per-channel int8 weights, ONNX Runtime per-tensor (its per-channel model does not load); uint8 activations.")
    return report(rows, heading, ["map MAD vs FP32", "text-region IoU@0.3 vs FP32", "map cosine"], ["quality", "agree", "sqnr"], "IoU@0.3")


def report(rows: list[dict], heading: str, quality_headers: list[str], quality_keys: list[str], score_name: str) -> str:
    """The table, then per variant how memory and time grow with the calibration size, then per size the entropy
    speed ratio and each tool's best score (`score`, higher is better)."""
    table = [[r["samples"], r["variant"] + (f" (chose {r['chosen']})" if r.get("chosen") else ""), f"{r['seconds']:.2f}",
              f"{r['calibration_seconds']:.3f}", f"{r['peak_mb']:.0f}"]
             + [f"{r[k]:.4f}" if isinstance(r[k], float) else r[k] for k in quality_keys] for r in rows]
    lines = [heading, "", markdown_table(["calibration samples", "variant", "quantize s (whole process)", "calibration s", "peak MB"]
                                         + quality_headers, table), ""]
    by = {(r["variant"], r["samples"]): r for r in rows}
    sizes = sorted({r["samples"] for r in rows})
    lo, hi = sizes[0], sizes[-1]
    for variant in dict.fromkeys(r["variant"] for r in rows):
        a, b = by[(variant, lo)], by[(variant, hi)]
        lines.append(f"- {variant}: peak memory {a['peak_mb']:.0f} → {b['peak_mb']:.0f} MB from {lo} to {hi} samples "
                     f"({(b['peak_mb'] / a['peak_mb'] - 1) * 100:+.1f}%), time {a['seconds']:.1f} → {b['seconds']:.1f} s")
    for n in sizes:
        ours, theirs = by[("edgeq-entropy", n)], by[("ort-Entropy", n)]
        best_ours = max(EDGEQ, key=lambda m: by[(f"edgeq-{m}", n)]["score"])
        best_theirs = max(ORT, key=lambda m: by[(f"ort-{m}", n)]["score"])
        lines.append(f"- {n} samples: edgeq entropy calibration {theirs['calibration_seconds'] / ours['calibration_seconds']:.1f}× faster "
                     f"than ONNX Runtime's Entropy ({theirs['seconds'] / ours['seconds']:.1f}× for the whole process); best {score_name}: "
                     f"edgeq {best_ours} {by[(f'edgeq-{best_ours}', n)]['score']:.4g} vs ONNX Runtime {best_theirs} "
                     f"{by[(f'ort-{best_theirs}', n)]['score']:.4g}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
