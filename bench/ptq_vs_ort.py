"""edgeq INT8 static vs ONNX Runtime's own quantize_static (MinMax) and quantize_dynamic, in one run.

Models: the demo's digits CNN (trained here, seeded) and PP-OCRv4 text detection (shipped by rapidocr-onnxruntime),
fed with text images rendered by edgeq.testing.zoo. Per variant: quality (top-1, or probability-map agreement with FP32),
file size, p50 latency at 1 and 2 threads (edgeq.bench: one process per model), quantization wall time and peak
memory (each quantization runs in its own process).

    .venv/bin/python bench/ptq_vs_ort.py            # prints markdown for bench/RESULTS.md
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import child_or_parse, cost_cells, emit, markdown_table, npz_reader, ort_preprocess, peak_rss_mb, quantize_and_time  # noqa: E402

OCR_CALIB, OCR_VAL = 8, 8
OCR_SHAPE = (1, 3, 736, 992)


def child_quantize(variant: str, model: str, calib: str, out: str) -> None:
    """Runs in a fresh process so that wall time and peak memory are the quantizer's alone."""
    import time

    start = time.perf_counter()
    if variant == "edgeq":
        import edgeq

        q = edgeq.quantize(edgeq.load(model), edgeq.Int8Static(batch_size=1), calib=edgeq.Dataset.from_npz(calib))
        q.save(out, force=True)
    else:
        model = ort_preprocess(model, out)
        if variant.startswith("ort-static"):
            from onnxruntime.quantization import QuantFormat, quantize_static

            quantize_static(model, out, npz_reader(Path(calib)), quant_format=QuantFormat.QDQ, per_channel=variant.endswith("per-channel"))
        else:
            from onnxruntime.quantization import quantize_dynamic

            quantize_dynamic(model, out)
    emit({"seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb()})


def digits_case(work: Path) -> dict:
    import edgeq
    from edgeq.demo import export_onnx, load_digits_split, train_cnn

    split = load_digits_split()
    fp32 = export_onnx(train_cnn(split), work / "digits_fp32.onnx")
    calib = work / "digits_calib.npz"
    np.savez(calib, input=split.train_x[:512])
    val = edgeq.Dataset.from_arrays({"input": split.val_x}, labels=split.val_y)
    return {"name": "digits CNN", "fp32": fp32, "calib": calib, "val": val, "reference": False,
            "variants": ["edgeq", "ort-static-per-channel", "ort-dynamic"], "bench": {"batch": 64, "shapes": {}}}


def ocr_case(work: Path) -> dict:
    import edgeq
    from edgeq.testing import zoo

    fp32 = work / "ppocr_det_fp32.onnx"
    fp32.write_bytes(zoo.ppocr_det_path().read_bytes())
    calib = work / "ocr_calib.npz"
    np.savez(calib, x=zoo.render_text_images(OCR_CALIB, seed=0))
    val = edgeq.Dataset.from_arrays({"x": zoo.render_text_images(OCR_VAL, seed=1)})
    # ORT's per-channel QDQ fails to load on this model (ANCHORS.md): its default per-tensor recipe is the anchor.
    return {"name": "PP-OCRv4 det", "fp32": fp32, "calib": calib, "val": val, "reference": True,
            "variants": ["edgeq", "ort-static", "ort-dynamic"], "bench": {"batch": 1, "shapes": {"x": OCR_SHAPE}}}


def measure_case(case: dict, work: Path, runs: int) -> list[dict]:
    from edgeq.evaluate import validate

    measured = quantize_and_time(__file__, case["fp32"], case["calib"], case["variants"], work, runs,
                                 batch=case["bench"]["batch"], shapes=case["bench"]["shapes"])
    rows = []
    for name, costs in measured.items():
        reference = case["fp32"] if case["reference"] else None
        record = validate(costs["path"], case["val"], reference=reference, batch_size=16).to_dict()
        rows.append({"model": case["name"], "variant": name, "quality": _quality(record), **costs})
    return rows


def _quality(record: dict) -> str:
    metrics = record["metrics"]
    if "top1" in metrics:
        return f"top-1 {metrics['top1']['value']:.2f}%"
    parts = [f"map MAD {metrics['mean_abs_diff']['value']:.4f}"] if "mean_abs_diff" in metrics else []
    if "iou@0.3" in metrics:
        parts.append(f"IoU@0.3 {metrics['iou@0.3']['value']:.3f}")
    parts.append(f"cos {metrics['cosine']['value']:.4f}")
    return ", ".join(parts)


def report(rows: list[dict]) -> str:
    table = []
    for model in dict.fromkeys(r["model"] for r in rows):
        group = [r for r in rows if r["model"] == model]
        fp32 = group[0]
        for r in group:
            table.append([model, r["variant"], r["quality"], *cost_cells(r, fp32, speed_up=True)])
    headers = ["model", "variant", "quality vs FP32", "size MB (vs FP32)", "p50 ms 1 thread (speed-up)", "p50 ms 2 threads (speed-up)",
               "quantize s", "quantize peak MB"]
    lines = [markdown_table(headers, table), ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        group = {r["variant"]: r for r in rows if r["model"] == model}
        ours = group["edgeq"]
        anchor = next(v for k, v in group.items() if k.startswith("ort-static"))
        lines.append(f"- {model}: edgeq vs ONNX Runtime static — p50 1 thread {anchor['p50_1t'] / ours['p50_1t']:.2f}× faster, "
                     f"2 threads {anchor['p50_2t'] / ours['p50_2t']:.2f}×, size {ours['size_mb'] / anchor['size_mb']:.2f}×, "
                     f"quantize time {ours['quant_s'] / anchor['quant_s']:.2f}×, quantize peak memory {ours['quant_peak_mb'] / anchor['quant_peak_mb']:.2f}×")
    return "\n".join(lines)


def main() -> None:
    args = child_or_parse(child_quantize, __doc__.splitlines()[0])
    if args is None:
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = []
        for make in (digits_case, ocr_case):
            rows += measure_case(make(work), work, args.runs)
    print(report(rows))


if __name__ == "__main__":
    main()
